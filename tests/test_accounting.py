"""Bit accounting (lqjax.accounting), library only: a group's width against Python's own
integer bit length, in numpy and in jax, over the whole int32 code range."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqjax import accounting

I32 = st.integers(-2 ** 31, 2 ** 31 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(I32, I32), min_size=1, max_size=20))
def test_code_bits_is_the_bit_length_of_the_code_range(pairs):
  lo = np.array([min(a, b) for a, b in pairs], np.int64)
  hi = np.array([max(a, b) for a, b in pairs], np.int64)
  want = [int(h - l).bit_length() for l, h in zip(lo, hi)]  # ceil(log2(h - l + 1))
  np.testing.assert_array_equal(accounting.code_bits(lo, hi), want)
  got = accounting.code_bits(jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_code_bits_at_the_powers_of_two():
  """2^k codes need k bits, 2^k + 1 need k + 1: where a float log2 with an epsilon fails."""
  for k in range(0, 32):
    for span, bits in ((2 ** k, k), (2 ** k + 1, k + 1)):
      if span - 1 > 2 ** 32 - 1:
        continue
      lo, hi = -(2 ** 31), -(2 ** 31) + span - 1
      assert int(accounting.code_bits(lo, hi)) == bits, (k, span)
      assert int(accounting.code_bits(jnp.int32(lo), jnp.int32(hi))) == bits, (k, span)


def test_group_bits_hand_example():
  codes = jnp.array([[0, 5], [1, -3], [3, 4]])  # per column: spans 4 and 9 -> 2 and 4 bits
  np.testing.assert_array_equal(accounting.group_bits(codes, (1, 2)), [[2.0, 4.0]])
  np.testing.assert_array_equal(accounting.group_bits(jnp.zeros((3,), jnp.int32), (1,)), [0.0])


def test_report_shows_the_recipe_asked_the_bits_learned_both_averages_and_the_file(tmp_path):
  import flax.linen as nn
  import jax
  import re
  import lqjax

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="head")(nn.relu(nn.Dense(64, name="fc1")(x)))

  m = lqjax.quantize(MLP(), [lqjax.Rule("head", lqjax.QuantConfig(rule="fixed", bits=8)),
                             lqjax.Rule(".*", lqjax.QuantConfig(granularity="row"))])
  v = m.init(jax.random.key(0), jnp.ones((1, 32)))
  meta = {"config": {"model": "mine"}}
  text = lqjax.report(v, meta)
  rows = {line.split()[0]: line.split() for line in text.splitlines()[2:6]}
  assert rows["params/fc1/kernel"][3:5] == ["ratio/free", "row"]  # as asked, not "axes1"
  assert rows["params/head/kernel"][3:5] == ["fixed/8b", "tensor"]
  head_bits = int(rows["params/head/kernel"][5].split("/")[0])
  assert head_bits <= 8  # the bits its codes need, at most the width asked
  # averages: 64*32 + 10*64 quantized weights, 64 + 10 float biases at 32 bits
  s = lqjax.summarize(lqjax.model_report(v))
  n_q, n_f = 32 * 64 + 64 * 10, 64 + 10
  assert s["avg_bits_all"] == pytest.approx((s["avg_bits"] * n_q + 32 * n_f) / (n_q + n_f))
  assert f"{s['avg_bits']:.2f} on average over the {n_q} quantized weights, " \
         f"{s['avg_bits_all']:.2f} over all weights" in text
  stated = int(re.search(r"packed file \(lqjax.save\): (\d+) bytes", text).group(1))
  assert lqjax.save(tmp_path / "m.lqz", v, meta) == stated == (tmp_path / "m.lqz").stat().st_size
