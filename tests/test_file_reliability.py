"""The packed file's promise, library only: what loads is exactly what was saved, or one
``CorruptFileError`` line naming the tensor; `save` refuses what it could not reproduce;
rules and configs that would silently do something else are refused. Imports nothing
from the application."""

import hashlib
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lqjax
from lqjax import compress, qconfig, quant, tree


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(4, name="fc1")(x)))


def _params(**cfg):
  m = lqjax.quantize(MLP(), lqjax.Rule(config=lqjax.QuantConfig(**cfg)))
  return m, m.init(jax.random.key(0), jnp.ones((1, 5)))["params"]


def _set(params, path, value):
  return tree.replace_arrays(params, {path: value})


def _file(header, payload=b""):
  h = json.dumps(header).encode()
  body = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, 0, len(h)) + h + payload
  return body + hashlib.sha256(body).digest()


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# ------------------------------------------------------------ save refuses (items 1, 2)

@pytest.mark.parametrize("where,value,needle", [
    (("fc1", "kernel"), np.nan, "fc1/kernel: 1 of 20 weights are not finite"),
    (("fc1", "kernel"), np.inf, "fc1/kernel: 1 of 20 weights are not finite"),
    (("fc1", "kernel_quant", "log_scale"), np.nan,
     "fc1/kernel_quant/log_scale: 1 of 1 log scales are not finite"),
    (("fc1", "bias"), np.nan, "fc1/bias: 1 of 4 values are not finite"),
])
def test_save_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path, where, value, needle):
  _, params = _params()
  path = tmp_path / "m.lqz"
  lqjax.save(path, params)
  before = _digest(path)
  arr = np.array(tree.flat_leaves(params)[where][0])
  arr.reshape(-1)[1 if arr.size > 1 else 0] = value
  with pytest.raises(ValueError, match=needle) as e:
    lqjax.save(path, _set(params, where, jnp.asarray(arr)))
  assert "\n" not in str(e.value)
  assert _digest(path) == before
  assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("log_s", [np.inf, 55.0, 40.5])
def test_a_log_scale_beyond_the_clip_is_stored_as_the_forward_pass_uses_it(tmp_path, log_s):
  """Training clips log s to +-LOG_SCALE_MAX before exp; the file stores the clipped value,
  so the reloaded model is the one the forward pass computed."""
  m, params = _params()
  sp = ("fc1", "kernel_quant", "log_scale")
  params = _set(params, sp, jnp.full((1, 1), log_s, jnp.float32))
  x = jax.random.normal(jax.random.key(1), (7, 5))
  want = m.apply({"params": params}, x)
  path = tmp_path / "m.lqz"
  lqjax.save(path, params)
  loaded = lqjax.load(path)
  stored = float(loaded["fc1"]["kernel_quant"]["log_scale"].value.reshape(()))
  assert stored == float(np.clip(log_s, -quant.LOG_SCALE_MAX, quant.LOG_SCALE_MAX))
  np.testing.assert_array_equal(m.apply({"params": loaded}, x), want)


# ------------------------------------------------------------ the reader (items 3, 4, 5)

def test_a_nan_float_tensor_is_refused_by_load_and_check(tmp_path):
  _, params = _params()
  blob = compress.to_bytes(params)
  header_len = compress._PREFIX.unpack_from(blob)[3]
  header = json.loads(blob[compress._PREFIX.size:compress._PREFIX.size + header_len])
  payload = bytearray(blob[compress._PREFIX.size + header_len:-32])
  bias = next(t for t in header["tensors"] if t["path"] == ["fc1", "bias"])
  payload[bias["offset"]:bias["offset"] + 4] = np.float32(np.nan).tobytes()
  with pytest.raises(compress.CorruptFileError, match="^fc1/bias: values are not finite$"):
    compress.parse(_file(header, bytes(payload)))


def _float_entry(path, shape=(2,), offset=0, **kw):
  return {"path": path, "kind": "float", "shape": list(shape), "dtype": "float32",
          "offset": offset, "nbytes": 4 * math.prod(shape), **kw}


@pytest.mark.parametrize("tensors,payload,needle", [
    # item 4: a path listed twice, a path that is a folder of another (either order)
    ([_float_entry(["fc1", "w"]), _float_entry(["fc1", "w"], offset=8)], 16,
     "fc1/w: the path is listed twice"),
    ([_float_entry(["fc1", "w"]), _float_entry(["fc1"], offset=8)], 16,
     "fc1: a tensor's path is also a folder of fc1/w"),
    ([_float_entry(["fc1"]), _float_entry(["fc1", "w"], offset=8)], 16,
     "fc1: a tensor's path is also a folder of fc1/w"),
    # a float tensor where a quantized tensor's scale goes
    ([{"path": ["k"], "kind": "quantized", "shape": [2], "scale_shape": [1], "offset": 0,
       "nbytes": 10, "config": {}}, _float_entry(["k_quant"], offset=10)], 18,
     "k_quant: a tensor's path is also a folder of k_quant/log_scale"),
    # item 5: dtypes, JSON booleans, sizes beyond the payload
    ([_float_entry(["a"], dtype="V0")], 8, "a: unknown dtype 'V0'"),
    ([_float_entry(["a"], dtype="object")], 8, "a: unknown dtype 'object'"),
    ([{**_float_entry(["a"]), "shape": [True, 2]}], 8, r"a: shape \[True, 2\] is not a list"),
    ([{**_float_entry(["a"]), "offset": False}], 8, "a: offset/nbytes outside the payload"),
    ([{**_float_entry(["a"]), "shape": [2 ** 31, 2 ** 31]}], 9, "declares 4611686018427387904"),
    ([{**_float_entry(["a"]), "shape": [2 ** 17, 2 ** 16]}], 9, "a: nbytes 8 does not match"),
    ([{"path": ["k"], "kind": "quantized", "shape": [2 ** 31, 2 ** 31], "scale_shape": [1, 1],
       "offset": 0, "nbytes": 9, "config": {}}], 9, "k: shape .* declares"),
    ([{"path": ["k"], "kind": "quantized", "shape": [2 ** 16, 2 ** 16], "scale_shape": [1, 1],
       "offset": 0, "nbytes": 9, "config": {}, "symbol_bytes": 3}], 9,
     "k: symbol_bytes 3 is not one of"),
])
def test_crafted_headers_with_valid_checksums_give_one_line(tensors, payload, needle):
  blob = _file({"format": "lqjax-packed-model", "meta": {}, "tensors": tensors,
                "payload_bytes": payload}, bytes(payload))
  with pytest.raises(compress.CorruptFileError, match=needle) as e:
    compress.parse(blob)
  assert "\n" not in str(e.value)


def test_codes_that_the_widths_do_not_account_for_are_refused_before_allocation():
  """A 2^32-element tensor in one group 0 bits wide would decode from 9 bytes; its codes
  take 0 bytes, so a body of any other length is refused before anything is allocated,
  and one group of 1 bit over 2^32 elements needs 512 MiB of codes, not 1 byte."""
  ls = np.float32(0).tobytes() + np.int32(0).tobytes()
  for width, body in ((0, b"\0"), (1, b"\0")):
    raw = ls + bytes([width]) + body
    blob = _file({"format": "lqjax-packed-model", "meta": {}, "payload_bytes": len(raw),
                  "tensors": [{"path": ["k"], "kind": "quantized", "shape": [2 ** 16, 2 ** 16],
                               "scale_shape": [1, 1], "offset": 0, "nbytes": len(raw),
                               "config": {}}]}, raw)
    with pytest.raises(compress.CorruptFileError, match="k: the codes take 1 bytes"):
      compress.parse(blob)


def test_a_log_scale_outside_the_clip_in_a_file_is_refused():
  raw = np.float32(45.0).tobytes() + np.int32(0).tobytes() + bytes([0])
  blob = _file({"format": "lqjax-packed-model", "meta": {}, "payload_bytes": len(raw),
                "tensors": [{"path": ["k"], "kind": "quantized", "shape": [3],
                             "scale_shape": [1], "offset": 0, "nbytes": len(raw),
                             "config": {}}]}, raw)
  with pytest.raises(compress.CorruptFileError, match="k: a log scale is not finite or outside"):
    compress.parse(blob)


def test_every_array_dtype_round_trips(tmp_path):
  _, params = _params()
  extra = {"i8": jnp.arange(3, dtype=jnp.int8), "b": jnp.array([True, False]),
           "bf": jnp.arange(4, dtype=jnp.bfloat16), "h": jnp.arange(2, dtype=jnp.float16)}
  lqjax.save(tmp_path / "m.lqz", {**params, "extra": extra})
  got = lqjax.load(tmp_path / "m.lqz")["extra"]
  for k, v in extra.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


def test_a_missing_file_is_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="none.lqz: No such file"):
    lqjax.load(tmp_path / "none.lqz")


# ------------------------------------------------------------ ONNX (item 7)

def test_export_onnx_refuses_a_graph_onnxruntime_cannot_run_and_keeps_the_old_file(tmp_path):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  from lqjax import onnx_export
  m, params = _params()
  x = jnp.ones((2, 5))
  path = tmp_path / "m.onnx"
  lqjax.export_onnx(path, lambda v, x: m.apply(v, x), {"params": params}, x)
  before = _digest(path)
  with pytest.raises(onnx_export.ExportError) as e:
    lqjax.export_onnx(path, lambda v, x: jnp.fft.fft(m.apply(v, x)).real, {"params": params}, x)
  assert "\n" not in str(e.value)
  assert _digest(path) == before
  assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------ rules (item 8)

class Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="head")(nn.Dense(3, name="body")(x))


class NTwo(nnx.Module):
  def __init__(self):
    self.body = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.head(self.body(x))


def _quantize(kind, rules):
  if kind == "linen":
    lqjax.quantize(Two(), rules).init(jax.random.key(0), jnp.ones((1, 4)))
  else:
    lqjax.quantize(NTwo(), rules)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
@pytest.mark.parametrize("rules,needle", [
    ([lqjax.Rule(".*", params=("kernal",))],
     r"rule 0 \(module_path='.\*'\) names parameters kernal, which none of its modules .* "
     r"has; they have bias, kernel"),
    ([lqjax.Rule(".*"), lqjax.Rule("head", lqjax.QuantConfig(rule="fixed", bits=8))],
     r"rule 1 \(module_path='head'\) is shadowed: rule 0 \(module_path='.\*'\) comes first"),
    ([lqjax.Rule("nothing")], "rule 0 .* matches no module"),
    ([lqjax.Rule("haed")], r"matches no module of the model; closest: 'head'"),
])
def test_silent_no_op_rules_are_refused(kind, rules, needle):
  with pytest.raises(lqjax.QuantizeError, match=needle) as e:
    _quantize(kind, rules)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_rules_in_the_right_order_quantize(kind):
  _quantize(kind, [lqjax.Rule("head", lqjax.QuantConfig(rule="fixed", bits=8)), lqjax.Rule(".*")])
  # a catch-all left only parameterless containers by the rules before it is no typo
  _quantize(kind, [lqjax.Rule("head"), lqjax.Rule("body"), lqjax.Rule(".*")])


def test_a_rule_that_matches_nothing_names_the_paths_a_sequential_model_has():
  seq = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
  with pytest.raises(lqjax.QuantizeError, match="closest: 'layers_0', 'layers_2'") as e:
    lqjax.quantize(seq, lqjax.Rule("layer0")).init(jax.random.key(0), jnp.ones((1, 4)))
  assert "\n" not in str(e.value)


# ------------------------------------------------------------ configs (item 9)

@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 2.5}, "bits must be a whole number, got 2.5"),
    ({"bits": True}, "bits must be a whole number, got True"),
    ({"init_bits": 2.5}, "init_bits must be a whole number, got 2.5"),
    ({"threshold": True}, "threshold must be a number, got True"),
    ({"threshold": "0.2"}, "threshold must be a number"),
    ({"rule": "lsq"}, "rule 'lsq' needs bits"),
    ({"rule": "fixed"}, "rule 'fixed' needs bits"),
])
def test_quant_config_refuses_values_it_cannot_honour(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    qconfig.QuantConfig(**kwargs)


def test_free_widths_for_lsq_and_fixed_are_said_explicitly():
  import dataclasses
  cfg = qconfig.QuantConfig(rule="lsq", bits=None)
  assert cfg.bits is None and qconfig.QuantConfig.from_json(cfg.to_json()) == cfg
  assert dataclasses.replace(cfg, granularity="row").bits is None
  assert qconfig.QuantConfig().bits is None  # the ratio rules' width is free by default


def test_quant_config_takes_numpy_integers_as_ints():
  cfg = qconfig.QuantConfig(bits=np.int64(4), rule="lsq")
  assert type(cfg.bits) is int and cfg.to_json()["bits"] == 4


@pytest.mark.parametrize("cfg", [dict(), dict(granularity="row", rounding="round"),
                                 dict(rule="lsq", bits=3, granularity="row")])
def test_overhead_bytes_is_the_file_less_its_payload(cfg):
  """overhead_bytes computes the prefix, header and checksum without packing the codes."""
  _, params = _params(**cfg)
  meta = {"config": {"model": "mlp", "note": "x" * 37}}
  blob = compress.to_bytes(params, meta)
  header = json.loads(blob[compress._PREFIX.size:compress._PREFIX.size
                           + compress._PREFIX.unpack_from(blob)[3]])
  assert compress.overhead_bytes(params, meta) == len(blob) - header["payload_bytes"]


def test_loading_a_file_into_a_model_with_another_recipe_is_refused_on_linen_and_nnx(tmp_path):
  """An lsq-4 file into a fixed-8 model: the model would compute another function of the
  same weights, so both APIs refuse with one line naming the tensor and both recipes."""
  lsq4 = lqjax.Rule(config=lqjax.QuantConfig(rule="lsq", bits=4))
  fixed8 = lqjax.Rule(config=lqjax.QuantConfig(rule="fixed", bits=8))
  x = jnp.ones((1, 4))
  for kind in ("linen", "nnx"):
    if kind == "linen":
      saved = lqjax.quantize(Two(), lsq4).init(jax.random.key(0), x)["params"]
      target = lqjax.quantize(Two(), fixed8).init(jax.random.key(0), x)["params"]
      same = lqjax.quantize(Two(), lsq4).init(jax.random.key(1), x)["params"]
    else:
      saved, target, same = (lqjax.quantize(NTwo(), r) for r in (lsq4, fixed8, lsq4))
    path = tmp_path / f"{kind}.lqz"
    lqjax.save(path, saved)
    with pytest.raises(compress.CorruptFileError,
                       match=r"body/kernel was saved with the recipe \(rule='lsq', bits=4\), the "
                             r"model quantizes it with \(rule='fixed', bits=8\)") as e:
      lqjax.load(path, target)
    assert "\n" not in str(e.value)
    lqjax.load(path, same)  # the same recipe loads


# ------------------------------------------------------------ custom layers

class OwnDense(nn.Module):
  """A user's layer: its own param and jnp.dot, nothing lqjax knows."""

  @nn.compact
  def __call__(self, x):
    return jnp.dot(x, self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3)))


class OwnNNX(nnx.Module):
  def __init__(self):
    self.kernel = nnx.Param(jax.random.normal(jax.random.key(0), (4, 3)))

  def __call__(self, x):
    return x @ self.kernel[...]


def test_a_custom_layer_is_refused_with_the_way_to_opt_in():
  for make in (lambda: lqjax.quantize(OwnDense()).init(jax.random.key(0), jnp.ones((1, 4))),
               lambda: lqjax.quantize(OwnNNX())):
    with pytest.raises(lqjax.QuantizeError, match=r"granularity=\(-1,\) keeps the last axis.*"
                                                  r"lqjax.register_layer\(Own") as e:
      make()
    assert "\n" not in str(e.value)


def _fake_quantized(p, log_scale, cfg):
  return np.asarray(quant.quantize_param(jnp.asarray(p), jnp.asarray(log_scale), cfg))


def test_explicit_axes_quantize_a_custom_layer_on_linen_and_nnx():
  """With granularity=(-1,) the layer's kernel gets one scale per output column, and the
  layer computes with Q(kernel): the output is x @ Q(P), by hand."""
  cfg = lqjax.QuantConfig(granularity=(-1,), rounding="round")
  x = jax.random.normal(jax.random.key(2), (5, 4))
  m = lqjax.quantize(OwnDense(), lqjax.Rule(config=cfg))
  v = m.init(jax.random.key(0), x)
  (t,) = tree.quantized_tensors(v)
  assert t.log_scale.shape == (1, 3)
  np.testing.assert_allclose(m.apply(v, x), x @ _fake_quantized(t.p, t.log_scale, cfg),
                             rtol=1e-6)
  n = lqjax.quantize(OwnNNX(), lqjax.Rule(config=cfg))
  (t,) = tree.quantized_tensors(nnx.state(n))
  assert t.log_scale.shape == (1, 3)
  np.testing.assert_allclose(n(x), x @ _fake_quantized(t.p, t.log_scale, cfg), rtol=1e-6)


def test_a_registered_layer_takes_named_granularities():
  @lqjax.register_layer
  class Registered(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.dot(x, self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3)))

  v = lqjax.quantize(Registered(), lqjax.Rule(config=lqjax.QuantConfig(granularity="row"))).init(
      jax.random.key(0), jnp.ones((1, 4)))
  assert tree.quantized_tensors(v)[0].log_scale.shape == (1, 3)


def test_flax_lstm_cell_quantizes_with_explicit_axes():
  cell = nn.OptimizedLSTMCell(8)
  q = lqjax.quantize(cell, lqjax.Rule(config=lqjax.QuantConfig(granularity=(-1,))))
  x = jnp.ones((2, 5))
  carry = cell.initialize_carry(jax.random.key(0), x.shape)
  v = q.init(jax.random.key(1), carry, x)
  names = [t.name for t in tree.quantized_tensors(v)]
  assert names and all(n.endswith("kernel") for n in names)
  (c, h), y = q.apply(v, carry, x)
  assert y.shape == (2, 8) and np.all(np.isfinite(np.asarray(y)))


# ------------------------------------------------------------ the entropy-coded file (version 3)

class _TwoKernels(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(256, use_bias=False, name="a")(x) + nn.Dense(256, use_bias=False, name="b")(x)


def _coded_params():
  """Kernel ``a``: 2-bit LSQ codes -1, 0 (p = 0.45 each) and -2, 1 (p = 0.05 each): entropy
  1.47 bits, which Huffman over byte symbols can only code in 1.65 bits (code lengths 1, 2,
  3, 3) while Huffman over the bit-packed bytes (4 codes a byte) comes near 1.47. Kernel
  ``b``: 3-bit codes uniform over -2..2: 2.4 bits as symbols (lengths 2, 2, 2, 3, 3), near
  3 bits as bit-packed bytes whose codes straddle byte boundaries."""
  cfg = dict(rule="lsq", granularity="tensor", rounding="round")
  m = lqjax.quantize(_TwoKernels(), [lqjax.Rule("a", lqjax.QuantConfig(bits=2, **cfg)),
                                     lqjax.Rule("b", lqjax.QuantConfig(bits=3, **cfg))])
  params = m.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
  rng = np.random.default_rng(0)
  a = rng.choice([-1.0, 0.0, -2.0, 1.0], (256, 256), p=[0.45, 0.45, 0.05, 0.05])
  b = rng.integers(-2, 3, (256, 256)).astype(np.float64)
  by = {}
  for t in tree.quantized_tensors(params):
    by[t.path] = a if t.path[0] == "a" else b
    by[t.scale_path] = np.zeros(np.shape(t.log_scale))  # s = 1: the codes are the weights
  return tree.replace_arrays(params, {k: jnp.asarray(v, jnp.float32) for k, v in by.items()})


def _symbols_only(monkeypatch):
  """Every quantized tensor's codes as byte symbols (version 2's only form)."""
  monkeypatch.setattr(compress, "CODE_FORMS", ("symbols",))


def test_zstd_file_takes_the_smaller_code_form_per_tensor_and_compresses_its_header(monkeypatch):
  params = _coded_params()
  blob = compress.to_bytes(params, {"note": "x" * 2000}, codec=compress.CODEC_ZSTD)
  fixed = compress.to_bytes(params, {"note": "x" * 2000})
  header, loaded = compress.parse(blob)
  forms = {tuple(t["path"]): t["symbol_bytes"] for t in header["tensors"]}
  assert forms == {("a", "kernel"): None, ("b", "kernel"): 1}
  assert b"lqjax-packed-model" not in blob and b"x" * 100 not in blob  # the header is coded
  assert header["meta"] == {"note": "x" * 2000}
  for t in tree.quantized_tensors(params):  # reloads exactly
    got = tree.flat_leaves(loaded)[t.path][0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(t.p))
  with monkeypatch.context() as mp:
    _symbols_only(mp)
    symbols = compress.to_bytes(params, {"note": "x" * 2000}, codec=compress.CODEC_ZSTD)
  # a: 65536 codes, 1.47 bits against 1.65 bits and 2: about 1.5 KB apart from each form
  assert len(blob) < len(symbols) - 1000 and len(blob) < len(fixed) - 1000, (
      len(blob), len(symbols), len(fixed))


def _rehash(blob, header_bytes):
  hlen = compress._PREFIX.unpack_from(blob)[3]
  body = (compress._PREFIX.pack(compress.MAGIC, compress.VERSION, compress.CODEC_ZSTD,
                                len(header_bytes)) + header_bytes
          + blob[compress._PREFIX.size + hlen:-compress.CHECKSUM_BYTES])
  return body + hashlib.sha256(body).digest()


def test_a_damaged_or_oversized_coded_header_is_one_line(monkeypatch):
  _, params = _params(rule="lsq", bits=4)
  blob = compress.to_bytes(params, codec=compress.CODEC_ZSTD)
  hlen = compress._PREFIX.unpack_from(blob)[3]
  coded = blob[compress._PREFIX.size:compress._PREFIX.size + hlen]
  cases = [(_rehash(blob, b"{\"plain\": 1}"), "zstd header"),
           (_rehash(blob, coded[:len(coded) // 2]), "zstd header"),
           (_rehash(blob, compress._zstd(b"[1, 2]")), "header is a JSON list")]
  for bad, needle in cases:
    with pytest.raises(compress.CorruptFileError, match=needle) as e:
      compress.parse(bad)
    assert "\n" not in str(e.value)
  monkeypatch.setattr(compress, "MAX_HEADER_BYTES", 100)
  with pytest.raises(compress.CorruptFileError, match="zstd header declares .* more than"):
    compress.parse(blob)
  long = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, 0, 10 ** 6) + bytes(40)
  with pytest.raises(compress.CorruptFileError, match="runs past the end"):
    compress.parse(long + hashlib.sha256(long).digest())


def test_tensor_frames_that_do_not_fit_the_payload_are_one_line():
  params = _coded_params()
  blob = compress.to_bytes(params, codec=compress.CODEC_ZSTD)
  header, _ = compress.parse(blob)
  assert all(t["zstd_bytes"] for t in header["tensors"])  # both kernels shrink under zstd
  hlen = compress._PREFIX.unpack_from(blob)[3]
  payload = blob[compress._PREFIX.size + hlen:-compress.CHECKSUM_BYTES]

  def variant(edit, payload=payload):
    h = json.loads(json.dumps(header))
    edit(h["tensors"])
    coded = compress._zstd(json.dumps(h).encode())
    body = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, compress.CODEC_ZSTD,
                                 len(coded)) + coded + payload
    return body + hashlib.sha256(body).digest()

  def grow(ts):
    ts[-1]["zstd_bytes"] += 1

  def zero(ts):
    ts[0]["zstd_bytes"] = 0

  def shrink(ts):
    ts[-1]["nbytes"] -= 1
  for bad, needle in [(variant(grow), "b/kernel: its stored bytes run past the payload"),
                      (variant(zero), "a/kernel: zstd_bytes 0 is not a whole number"),
                      (variant(lambda ts: None, payload + b"\0"), "1 bytes more than"),
                      (variant(shrink), "zstd frame of b/kernel declares")]:
    with pytest.raises(compress.CorruptFileError, match=needle) as e:
      compress.parse(bad)
    assert "\n" not in str(e.value)
