"""Accounting, bit packing, the packed file, and the ONNX export."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqjax import accounting, compress, qconfig, quant, tree

from lqlab import data, export
from lqlab.config import TrainConfig
from lqlab.step import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_pack_unpack_roundtrip(d):
  n_groups = d.draw(st.integers(1, 7))
  sizes = d.draw(st.lists(st.integers(1, 13), min_size=n_groups, max_size=n_groups))
  widths_g = d.draw(st.lists(st.integers(0, 16), min_size=n_groups, max_size=n_groups))
  widths = np.repeat(widths_g, sizes)
  vals = np.array([d.draw(st.integers(0, (1 << int(w)) - 1)) for w in widths], np.uint64)
  buf = compress.pack_bits(vals, widths)
  assert len(buf) == (int(widths.sum()) + 7) // 8
  np.testing.assert_array_equal(compress.unpack_bits(buf, widths), vals)


def test_pack_rejects_overflow():
  with pytest.raises(ValueError, match="fit"):
    compress.pack_bits(np.array([4]), np.array([2]))


def _random_model_params(granularity, model="lenet300", dataset="mnist", bits=None, rule="ratio",
                         grid="midtread"):
  cfg = TrainConfig(dataset=dataset, model=model, granularity=granularity, bits=bits,
                          rule=rule, rounding="round", bias_granularity="row", grid=grid)
  m = build_model(cfg, 10)
  shape = {"mnist": (2, 28, 28, 1), "cifar10": (2, 32, 32, 3)}[dataset]
  v = m.init(jax.random.key(0), jnp.zeros(shape))
  # Spread the scales so groups get different bit widths (and some >8 bits).
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + jax.random.uniform(jax.random.key(len(str(p))), x.shape, minval=-3, maxval=2)
      if tree.is_scale_path(p) else x, v["params"])
  return cfg, m, params, v.get("batch_stats", {})


@pytest.mark.parametrize("granularity", ["tensor", "row", "column", "element", (0,)])
@pytest.mark.parametrize("codec", [compress.CODEC_FIXED, compress.CODEC_ZSTD])
def test_file_roundtrip_and_size(tmp_path, granularity, codec):
  cfg, m, params, bs = _random_model_params(granularity)
  path = tmp_path / "m.lqz"
  size = export.export(path, cfg, 10, ((0.1,), (0.3,)), params, bs, codec=codec)
  assert size == path.stat().st_size
  blob = path.read_bytes()
  before = {k: v for k, v in compress.read_codes(blob).items()}
  for t in tree.quantized_tensors(params):
    np.testing.assert_array_equal(before[t.path], quant.tensor_codes(t.p, t.log_scale, qconfig.QuantConfig(rounding="round"))[0])
  if codec == compress.CODEC_FIXED:
    rows = accounting.model_report(params)
    hlen = compress._PREFIX.unpack_from(blob)[3]
    assert size == accounting.summarize(rows)["packed_bytes_accounted"] + compress._PREFIX.size \
        + hlen + 32
  _reload_gives_the_same_logits(path, m, params)


def _reload_gives_the_same_logits(path, m, params):
  """(reloaded variables, test inputs, logits) after checking the reloaded file's logits."""
  model, variables, header = export.load(path)
  x = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  got = export.predict(model, variables, header, x)
  ref = np.asarray(jax.jit(lambda v, x: m.apply(v, data.normalize(x, (0.1,), (0.3,))))(
      {"params": params}, jnp.asarray(x)))
  # Same jitted program, same codes: the reloaded model's logits are bit-identical.
  np.testing.assert_array_equal(got, ref)
  return variables, x, ref


def test_fixed_bits_model_is_small(tmp_path):
  cfg, _, params, bs = _random_model_params("row", bits=2, rule="lsq")
  rows = accounting.model_report(params)
  assert all(r.bits_max <= 2 for r in rows if r.quantized)
  s = accounting.summarize(rows)
  assert s["ratio_accounted"] > 14  # 32 / 2 bits, less the per-group overhead


def test_midrise_binary_model_file_and_onnx(tmp_path):
  """A 1-bit midrise (binary) model: 1 bit per weight on disk, reloaded and exported to
  the same logits, its ONNX codes the odd integers 2q + 1 = -1, +1."""
  cfg, m, params, bs = _random_model_params("row", bits=1, rule="lsq", grid="midrise")
  path = tmp_path / "m.lqz"
  export.export(path, cfg, 10, ((0.1,), (0.3,)), params, bs)
  for t in tree.quantized_tensors(params):
    assert t.config.grid == "midrise"
  rows = accounting.model_report(params)
  assert all(r.bits_max <= 1 for r in rows if r.quantized)
  assert accounting.summarize(rows)["ratio_accounted"] > 25  # 32 / 1 bit, less the overhead
  variables, x, ref = _reload_gives_the_same_logits(path, m, params)
  # Every reloaded weight is +-s/2: no zeros.
  for t in tree.quantized_tensors(variables["params"]):
    s = np.exp(np.asarray(t.log_scale))
    np.testing.assert_allclose(np.abs(np.asarray(t.p)), np.broadcast_to(s / 2, t.p.shape),
                               rtol=1e-6)
  pytest.importorskip("onnxruntime", reason="install lqjax[export]")
  import onnx
  from lqjax import onnx_export
  onnx_path = tmp_path / "m.onnx"
  meta = {"mean": (0.1,), "std": (0.3,)}
  export.export_onnx(onnx_path, m, {"params": params}, meta, data.image_shape("mnist"))
  np.testing.assert_allclose(onnx_export.run_onnx(onnx_path, x), ref, rtol=1e-4, atol=1e-4)
  protos = [t for t in onnx.load(str(onnx_path)).graph.initializer if t.name.endswith("_codes")]
  codes = [onnx.numpy_helper.to_array(t).astype(np.int8) for t in protos]
  assert len(codes) == len(tree.quantized_tensors(params))
  # the odd codes -1, +1, four a byte as ONNX INT2
  assert all(set(np.unique(c)) <= {-1, 1} for c in codes)
  assert all(t.data_type == onnx.TensorProto.INT2 for t in protos)


@pytest.fixture
def packed(tmp_path):
  cfg, _, params, bs = _random_model_params("row")
  path = tmp_path / "m.lqz"
  export.export(path, cfg, 10, ((0.1,), (0.3,)), params, bs)
  return path


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b[: len(b) // 2], "checksum"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + (9).to_bytes(2, "little") + b[6:], "version"),
])
def test_corrupt_files(packed, damage, needle, tmp_path):
  bad = tmp_path / "bad.lqz"
  bad.write_bytes(damage(packed.read_bytes()))
  with pytest.raises(compress.CorruptFileError, match=needle):
    compress.parse(bad.read_bytes())
  r = subprocess.run([sys.executable, "-m", "lqlab.export", "--check", str(bad)], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
  ok = subprocess.run([sys.executable, "-m", "lqlab.export", "--check", str(packed)], cwd=ROOT,
                      capture_output=True, text=True)
  assert ok.returncode == 0 and ok.stdout.startswith("ok:")


# Only the ONNX tests need the export extra; the file-format tests run without it.
needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("jax2onnx") is None,
    reason="install lqjax[export]")


@needs_onnx
@pytest.mark.parametrize("model,dataset,granularity", [
    ("lenet300", "mnist", "row"), ("lenet300", "mnist", "element"),
    ("lenet5", "mnist", "channel"), ("lenet5", "mnist", "spatial"),
    ("resnet20", "cifar10", "channel"), ("resnet20", "cifar10", "tensor"),
])
def test_onnx_matches_jax(tmp_path, model, dataset, granularity):
  from lqjax import onnx_export
  cfg, m, params, bs = _random_model_params(granularity, model, dataset)
  if bs:  # non-trivial running statistics
    bs = jax.tree_util.tree_map(lambda v: v + 0.1 * jnp.abs(jax.random.normal(
        jax.random.key(v.size), v.shape)), bs)
  mean, std = (0.4, 0.5, 0.45), (0.2, 0.25, 0.3)
  if dataset == "mnist":
    mean, std = (0.13,), (0.3,)
  variables = {"params": params, **({"batch_stats": bs} if bs else {})}
  meta = {"mean": mean, "std": std}
  path = tmp_path / "m.onnx"
  shape = data.image_shape(dataset)
  export.export_onnx(path, m, variables, meta, shape)
  x = np.random.default_rng(1).integers(0, 256, (8,) + shape, dtype=np.uint8)
  got = onnx_export.run_onnx(path, x)
  ref = np.asarray(jax.jit(export.logits_fn(m, mean, std))(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  # Integer initializers are really there, one DequantizeLinear per quantized tensor.
  import onnx
  proto = onnx.load(str(path))
  T = onnx.TensorProto
  ints = [t for t in proto.graph.initializer if t.name.endswith("_codes") and t.data_type in
          (T.INT2, T.UINT2, T.INT4, T.UINT4, T.INT8, T.INT16, T.INT32)]
  assert len(ints) == len(tree.quantized_tensors(params))
  assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == len(ints)
  _every_initializer_is_read(proto)
  # each tensor's codes in the narrowest type that holds them, 2-bit ones four a byte and
  # 4-bit ones two a byte
  by_name = {t.name: t for t in ints}
  for t in tree.quantized_tensors(params):
    q = quant.tensor_codes(t.p, t.log_scale, t.config)[0]
    lo, hi = int(q.min()), int(q.max())
    want = (T.INT2 if -2 <= lo and hi <= 1 else T.UINT2 if 0 <= lo and hi <= 3 else
            T.INT4 if -8 <= lo and hi <= 7 else T.UINT4 if 0 <= lo and hi <= 15 else
            T.INT8 if -128 <= lo and hi <= 127 else T.INT16 if -2 ** 15 <= lo and
            hi < 2 ** 15 else T.INT32)
    init = by_name["w_params_" + "_".join(t.path) + "_codes"]
    assert init.data_type == want, (t.name, lo, hi)
    per_byte = {T.INT2: 4, T.UINT2: 4, T.INT4: 2, T.UINT4: 2}.get(want)
    if per_byte:
      assert len(init.raw_data) == -(-q.size // per_byte)


def _every_initializer_is_read(proto):
  """No initializer that no node reads (onnxruntime would drop each with a warning)."""
  def inputs(graph):
    for node in graph.node:
      yield from node.input
      for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
          yield from inputs(g)
  read = set(inputs(proto.graph))
  unread = [t.name for t in proto.graph.initializer if t.name not in read]
  assert not unread, unread
