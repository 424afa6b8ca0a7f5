"""lqjax.quantize on unchanged Linen and NNX models: every supported layer, per-tensor
recipes through accounting, the file and ONNX, your own loop, and bad input."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lqjax
from lqjax import accounting, compress, linen_quant, nnx_quant, optim, qconfig, quant, tree

CFG = qconfig.QuantConfig(rule="lsq", bits=4, granularity="row", rounding="round")
BIAS = qconfig.QuantConfig(rule="ratio", threshold=0.3, granularity="tensor")
X2 = jax.random.normal(jax.random.key(7), (3, 6))
X4 = jax.random.normal(jax.random.key(8), (2, 5, 5, 4))
IDS = jnp.array([[0, 3, 5], [7, 1, 2]])

# (name, float layer, input, method): each is also built as quantized(cls) by hand.
LINEN = [
    ("Dense", lambda c=nn.Dense: c(5), X2, None),
    ("DenseGeneral", lambda c=nn.DenseGeneral: c((2, 3)), X2, None),
    ("Conv", lambda c=nn.Conv: c(4, (3, 3)), X4, None),
    ("ConvDepthwise", lambda c=nn.Conv: c(4, (3, 3), feature_group_count=4), X4, None),
    ("ConvTranspose", lambda c=nn.ConvTranspose: c(3, (2, 2)), X4, None),
    ("Embed", lambda c=nn.Embed: c(8, 6), IDS, None),
    ("EmbedAttend", lambda c=nn.Embed: c(8, 6), X2, "attend"),
    ("Einsum", lambda c=nn.Einsum: c((6, 4), "bi,ij->bj"), X2, None),
]


def _linen_reference(make, x, method):
  """Today's hand-built path: quantized(cls) with the same configs."""
  float_layer = make()
  cls = type(float_layer)
  fields = {k: getattr(float_layer, k) for k in float_layer.__dataclass_fields__
            if k not in ("parent", "name")}
  return linen_quant.quantized(cls)(**fields, quant={"kernel": CFG, "embedding": CFG,
                                                     "bias": BIAS})


@pytest.mark.parametrize("name,make,x,method", LINEN, ids=[c[0] for c in LINEN])
def test_linen_layer_equals_the_hand_built_quantized_layer(name, make, x, method):
  q = lqjax.quantize(make(), lqjax.Rule(config=CFG, bias=BIAS))
  ref = _linen_reference(make, x, method)
  kw = {"method": method} if method else {}
  if method == "attend":
    kw_init = {"method": lambda m, z: m.attend(z)}
    v = ref.init(jax.random.key(0), x, **kw_init)
    assert jax.tree_util.tree_structure(q.init(jax.random.key(0), x, **kw_init)) == \
        jax.tree_util.tree_structure(v)
    fq = lambda v: q.apply(v, x, method=lambda m, z: m.attend(z))
    fr = lambda v: ref.apply(v, x, method=lambda m, z: m.attend(z))
  else:
    v = ref.init(jax.random.key(0), x)
    vq = q.init(jax.random.key(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tree.unbox(vq), tree.unbox(v))
    fq, fr = (lambda v: q.apply(v, x, **kw)), (lambda v: ref.apply(v, x, **kw))
  # Spread the scales so codes are non-trivial, then compare outputs and gradients.
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a - 1.5 if tree.is_scale_path(p) else a, v)
  np.testing.assert_array_equal(jax.jit(fq)(v), jax.jit(fr)(v))
  loss = lambda f: (lambda v: jnp.sum(jnp.sin(f(v))))
  gq, gr = jax.grad(loss(fq))(v), jax.grad(loss(fr))(v)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         tree.unbox(gq), tree.unbox(gr))
  found = {t.path[-1] for t in tree.quantized_tensors(v)}
  assert found <= {"kernel", "embedding", "bias"} and found & {"kernel", "embedding"}


def test_linen_attention_projections_and_layer_reuse():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(6)
      x = d(d(x))  # one layer called twice
      x = nn.LayerNorm()(x)
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x[:, None, :])

  q = lqjax.quantize(Net(), lqjax.Rule(config=CFG))
  v = q.init(jax.random.key(0), X2)
  names = sorted(t.name for t in tree.quantized_tensors(v))
  assert names == ["params/Dense_0/kernel"] + [
      f"params/MultiHeadDotProductAttention_0/{p}/kernel" for p in ("key", "out", "query", "value")]
  assert "LayerNorm_0" in v["params"] and "scale_quant" not in v["params"]["LayerNorm_0"]
  jax.jit(jax.grad(lambda v: jnp.sum(q.apply(v, X2))))(v)


def test_linen_scan_over_layers_stacks_the_scales():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return nn.relu(nn.Dense(6)(c)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)()(x, None)[0]

  q = lqjax.quantize(Stack(), lqjax.Rule(config=CFG))
  v = q.init(jax.random.key(0), X2)
  (t,) = tree.quantized_tensors(v)
  assert t.p.shape == (3, 6, 6) and t.log_scale.shape == (3, 1, 6)
  g = jax.jit(jax.grad(lambda v: jnp.sum(q.apply(v, X2) ** 2)))(v)
  assert np.all(np.isfinite(tree.unbox(g)["params"]["ScanBlock_0"]["Dense_0"]["kernel"]))


# ------------------------------------------------------------ NNX

RNGS = lambda: nnx.Rngs(0)
NNX = [
    ("Linear", lambda: nnx.Linear(6, 5, rngs=RNGS()), X2, "__call__"),
    ("LinearGeneral", lambda: nnx.LinearGeneral(6, (2, 3), rngs=RNGS()), X2, "__call__"),
    ("Conv", lambda: nnx.Conv(4, 3, (3, 3), rngs=RNGS()), X4, "__call__"),
    ("ConvDepthwise", lambda: nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=RNGS()), X4,
     "__call__"),
    ("ConvTranspose", lambda: nnx.ConvTranspose(4, 3, (2, 2), rngs=RNGS()), X4, "__call__"),
    ("Embed", lambda: nnx.Embed(8, 6, rngs=RNGS()), IDS, "__call__"),
    ("EmbedAttend", lambda: nnx.Embed(8, 6, rngs=RNGS()), X2, "attend"),
    ("Einsum", lambda: nnx.Einsum("bi,ij->bj", (6, 4), (4,), rngs=RNGS()), X2, "__call__"),
]


def _fq(p, log_scale, cfg):
  return quant.fake_quant(p, quant.scale_from_log(log_scale), rule=cfg.rule,
                          threshold=cfg.threshold, rounding=cfg.rounding, bits=cfg.bits)


@pytest.mark.parametrize("name,make,x,method", NNX, ids=[c[0] for c in NNX])
def test_nnx_layer_equals_the_float_layer_on_fake_quantized_weights(name, make, x, method):
  q = lqjax.quantize(make(), lqjax.Rule(config=CFG, bias=BIAS))
  qt = tree.quantized_tensors(q)
  assert {t.path[-1] for t in qt} & {"kernel", "embedding"}
  for t in qt:  # spread the scales
    getattr(q, t.path[0] + tree.QUANT_SUFFIX).log_scale[...] = t.log_scale - 1.5
  qt = {t.path: t for t in tree.quantized_tensors(q)}
  graphdef, state, rest = nnx.split(q, nnx.Param, ...)
  ref_def, ref_state = nnx.split(make())

  def run_q(state):
    return getattr(nnx.merge(graphdef, state, rest), method)(x)

  def run_ref(state):
    flat = tree.flat_leaves(state)
    values = {path: val for path, (val, _) in flat.items() if len(path) == 1}
    values.update({path: _fq(flat[path][0], flat[t.scale_path][0], t.config)
                   for path, t in qt.items()})
    # The float layer's own parameters replaced, functionally, by Q(P) (and the rest).
    new = jax.tree_util.tree_map_with_path(
        lambda kp, a: values.get(tuple(tree._key_str(k) for k in kp if tree._key_str(k) !=
                                       "value"), a), ref_state)
    return getattr(nnx.merge(ref_def, new), method)(x)

  # Both jitted: XLA may fuse the same arithmetic differently in and out of jit.
  np.testing.assert_allclose(jax.jit(run_q)(state), jax.jit(run_ref)(state), rtol=1e-6,
                             atol=1e-6)
  loss = lambda f: (lambda s: jnp.sum(jnp.sin(f(s))))
  gq = jax.grad(loss(run_q))(state)
  gr = jax.grad(loss(run_ref))(state)
  for path, (a, _) in tree.flat_leaves(gq).items():
    np.testing.assert_allclose(a, tree.flat_leaves(gr)[path][0], rtol=1e-6, atol=1e-7)
  # The scale gradient is really there (not the zero of a detached scale).
  assert any(np.any(tree.flat_leaves(gq)[t.scale_path][0] != 0) for t in qt.values())


def test_nnx_attention_optimizer_and_scan():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(6, rngs=rngs)
      self.att = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=4,
                                        decode=False, rngs=rngs)

    def __call__(self, x):
      return self.att(self.norm(x)[:, None, :])

  q = lqjax.quantize(Net(nnx.Rngs(0)), lqjax.Rule(config=CFG))
  assert sorted(t.name for t in tree.quantized_tensors(q)) == [
      f"att/{p}/kernel" for p in ("key", "out", "query", "value")]
  opt = nnx.Optimizer(q, optim.split(optax.adam(1e-2), optax.sgd(0.1)), wrt=nnx.Param)
  before = q.att.value.kernel_quant.log_scale[...]

  @nnx.jit
  def step(m, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(X2) ** 2))(m)
    opt.update(m, g)
    return loss

  step(q, opt)
  assert not np.array_equal(before, q.att.value.kernel_quant.log_scale[...])
  # Plain jax.jit closing over the model works too (nothing is mutated while it runs).
  np.testing.assert_allclose(jax.jit(lambda x: q(x))(X2), q(X2), rtol=1e-6, atol=1e-6)

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.lin(x))

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return lqjax.quantize(Block(nnx.Rngs(key)), lqjax.Rule(config=CFG))

  stack = make(jax.random.split(jax.random.key(0), 3))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def run(block, c):
    return block(c)

  assert run(stack, X2).shape == X2.shape
  (t,) = tree.quantized_tensors(stack)
  assert t.log_scale.shape == (3, 1, 6)


# ------------------------------------------------------------ per-tensor recipes end to end


class MixedCNN(nn.Module):
  """A user's model: plain flax layers, first and last fixed 8-bit, ratio in between."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32, name="fc")(x))
    return nn.Dense(10, name="head")(x)


MIXED_RULES = [
    lqjax.Rule("stem|head", qconfig.QuantConfig(rule="fixed", bits=8, rounding="round"),
               bias=qconfig.QuantConfig(rule="fixed", bits=8, rounding="round", grid="midrise")),
    lqjax.Rule(".*", qconfig.QuantConfig(rule="ratio", granularity="row", rounding="floor"),
               bias=qconfig.QuantConfig(rule="lsq", bits=2, granularity="tensor")),
]


def _mixed(seed=0):
  m = lqjax.quantize(MixedCNN(), MIXED_RULES)
  x = jax.random.uniform(jax.random.key(seed), (4, 12, 12, 1))
  v = m.init(jax.random.key(0), x)
  v = jax.tree_util.tree_map_with_path(  # spread the scales: groups of many bit widths
      lambda p, a: a + jax.random.uniform(jax.random.key(len(str(p))), a.shape, minval=-2,
                                          maxval=1) if tree.is_scale_path(p) else a, v)
  v = jax.tree_util.tree_map_with_path(  # non-zero biases
      lambda p, a: jax.random.normal(jax.random.key(3), a.shape)
      if tree._key_str(p[-1]) == "bias" and p[0].key == "params" else a, v)
  return m, v, x


def test_mixed_configs_account_save_and_reload_exactly(tmp_path):
  m, v, x = _mixed()
  recipes = {t.name: (t.config.rule, t.config.bits) for t in tree.quantized_tensors(v)}
  assert recipes["params/stem/kernel"] == ("fixed", 8) and recipes["params/fc/kernel"] == \
      ("ratio", None) and recipes["params/fc/bias"] == ("lsq", 2)
  rows = lqjax.model_report(v)
  by = {r.path: r for r in rows}
  assert by["params/stem/kernel"].bits_max <= 8 and by["params/fc/bias"].bits_max <= 2
  # The 2-bit LSQ bias is accounted with its own clip: unclipped it would need more bits.
  (fc_bias,) = [t for t in tree.quantized_tensors(v) if t.name == "params/fc/bias"]
  free = quant.quantize_codes(fc_bias.p, quant.scale_from_log(fc_bias.log_scale))
  assert int(free.max() - free.min()) + 1 > 4
  path = tmp_path / "m.lqz"
  size = lqjax.save(path, v)
  blob = path.read_bytes()
  hlen = compress._PREFIX.unpack_from(blob)[3]
  assert size == path.stat().st_size == lqjax.summarize(rows)["packed_bytes_accounted"] + \
      compress._PREFIX.size + hlen + 32
  v2 = lqjax.load(path, v)
  assert jax.tree_util.tree_structure(v2) == jax.tree_util.tree_structure(v)
  f = jax.jit(m.apply)
  np.testing.assert_array_equal(f(v2, x), f(v, x))
  # The header records each tensor's recipe.
  header, _ = compress.read(path)
  cfgs = {"/".join(t["path"]): t.get("config") for t in header["tensors"]}
  assert cfgs["params/head/kernel"]["bits"] == 8 and cfgs["params/fc/kernel"]["rule"] == "ratio"
  assert cfgs["params/stem/bias"]["grid"] == "midrise" and "grid" not in cfgs["params/fc/kernel"]
  table = {line.split()[0]: line.split()[-5] for line in lqjax.report(v).splitlines()[2:]
           if line.startswith("params/")}
  assert table["params/stem/bias"] == "fixed/8b/midrise" and table["params/stem/kernel"] == \
      "fixed/8b" and table["params/fc/kernel"] == "ratio/free"


def test_nnx_save_and_load_into_a_module(tmp_path):
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(6, 16, rngs=rngs)
      self.b = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  binary = qconfig.QuantConfig(rule="lsq", bits=1, grid="midrise")  # weights +-s/2
  rules = [lqjax.Rule("b", binary), lqjax.Rule(config=CFG)]
  q = lqjax.quantize(MLP(nnx.Rngs(0)), rules)
  lqjax.save(tmp_path / "m.lqz", q)
  fresh = lqjax.quantize(MLP(nnx.Rngs(1)), rules)
  lqjax.load(tmp_path / "m.lqz", fresh)
  f = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(f(fresh, X2), f(q, X2))
  (kb,) = [t for t in tree.quantized_tensors(nnx.state(fresh)) if t.name.endswith("b/kernel")]
  np.testing.assert_allclose(np.abs(np.asarray(kb.p)), np.broadcast_to(
      np.exp(np.asarray(kb.log_scale)) / 2, kb.p.shape), rtol=1e-6)
  other = lqjax.quantize(
      type("Wide", (nnx.Module,), {"__init__": lambda s, r: (
          setattr(s, "a", nnx.Linear(6, 8, rngs=r)), setattr(s, "b", nnx.Linear(8, 3, rngs=r)))
          and None})(nnx.Rngs(0)), rules)
  with pytest.raises(compress.CorruptFileError, match=r"tensor a/bias has shape \[16\] in the "
                                                      r"file, \[8\] in the model"):
    lqjax.load(tmp_path / "m.lqz", other)


def test_onnx_of_a_user_model_matches_jax(tmp_path, capfd):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  import onnx
  from lqjax import onnx_export
  m, v, x = _mixed()
  path = tmp_path / "m.onnx"
  lqjax.export_onnx(path, lambda v, x: m.apply(v, x), v, x)
  got = onnx_export.run_onnx(path, np.asarray(jax.random.uniform(jax.random.key(3),
                                                                 (7, 12, 12, 1))))
  ref = jax.jit(m.apply)(v, jax.random.uniform(jax.random.key(3), (7, 12, 12, 1)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  proto = onnx.load(str(path))
  codes = {t.name: t for t in proto.graph.initializer if t.name.endswith("_codes")}
  assert len(codes) == len(tree.quantized_tensors(v))
  bias = codes["w_params_fc_bias_codes"]  # 2-bit LSQ codes in -2..1: INT2, four a byte
  assert bias.data_type == onnx.TensorProto.INT2
  assert len(bias.raw_data) == -(-bias.dims[0] // 4)
  stem = [t for t in tree.quantized_tensors(v) if t.name == "params/stem/kernel"][0]
  q = quant.tensor_codes(stem.p, stem.log_scale, stem.config)[0]  # 8-bit recipe
  assert codes["w_params_stem_kernel_codes"].data_type == (
      onnx.TensorProto.INT4 if q.min() >= -8 and q.max() <= 7 else onnx.TensorProto.INT8)
  # A user's own session, at onnxruntime's default log level, drops nothing with a warning
  import onnxruntime as ort
  capfd.readouterr()
  ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  assert "Removing initializer" not in capfd.readouterr().err
  # The converter leaves the libraries as they were (jax2onnx 0.17 alone leaves
  # jnp.cumsum patched to refuse an axis).
  np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 3)), 1), [[1, 2, 3], [1, 2, 3]])


def test_own_loop_pieces_on_linen_params():
  m, v, x = _mixed()
  params = v["params"]
  labels = optim.labels(params)
  assert labels["fc"]["kernel_quant"]["log_scale"].value == "scale"
  assert labels["fc"]["kernel"] == "weight"
  tx = optim.split(optax.sgd(0.0), optax.sgd(1.0))  # weights frozen, scales move
  st = tx.init(params)

  def loss(p):
    return jnp.mean(m.apply({"params": p, "batch_stats": v["batch_stats"]}, x) ** 2)

  g = jax.grad(loss)(params)
  u, st = tx.update(g, st, params)
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new["fc"]["kernel"], params["fc"]["kernel"])
  assert not np.array_equal(new["fc"]["kernel_quant"]["log_scale"].value,
                            params["fc"]["kernel_quant"]["log_scale"].value)
  stats = optim.ratio_stats(params, g)
  assert set(stats) == {t.name for t in tree.quantized_tensors(params)}
  gflat = tree.flat_leaves(g)
  for t in tree.quantized_tensors(params):  # r_G = ||g||_G / ||P||_G by hand, per group
    gv = accounting.group_view(np.asarray(gflat[t.path][0], np.float64), t.log_scale.shape)
    pv = accounting.group_view(np.asarray(t.p, np.float64), t.log_scale.shape)
    r = np.linalg.norm(gv, axis=1) / (np.linalg.norm(pv, axis=1) + 1e-12)
    got = stats[t.name]
    np.testing.assert_allclose(float(got["frac_below"]), np.mean(r < t.config.threshold))
    for q in (10, 50, 90):
      np.testing.assert_allclose(float(got[f"p{q}"]), np.percentile(r, q), rtol=1e-4)
  # The brake: a drop rolls the scales back and halves their step.
  brake = optim.Brake(tolerance=0.01)
  bs = optim.brake_init(params)
  bs, p1, st, ev = optim.brake_update(brake, bs, params, st, 0.9)
  bs, p2, st, ev = optim.brake_update(brake, bs, new, st, 0.8)
  assert ev and float(optim.scale_mult(st)) == 0.5
  np.testing.assert_array_equal(p2["fc"]["kernel_quant"]["log_scale"].value,
                                params["fc"]["kernel_quant"]["log_scale"].value)
  assert "params/fc/kernel" in lqjax.report(v) and "ratio" in lqjax.report(v)


# ------------------------------------------------------------ bad input, one line each


@pytest.mark.parametrize("make,needle", [
    (lambda: lqjax.quantize(MixedCNN(), [lqjax.Rule("nope", CFG)]).init(
        jax.random.key(0), jnp.zeros((1, 12, 12, 1))), "rule 0 (module_path='nope') matches no"),
    (lambda: lqjax.quantize(lqjax.quantize(MixedCNN())), "quantized already"),
    (lambda: lqjax.quantize(MixedCNN(), lqjax.Rule(config=CFG, bias=qconfig.QuantConfig(
        granularity="column"))).init(jax.random.key(0), jnp.zeros((1, 12, 12, 1))),
     "stem/bias: granularity 'column' needs"),
    (lambda: lqjax.quantize(MixedCNN(), [lqjax.Rule("(", CFG)]), "not a regular expression"),
    (lambda: lqjax.quantize(object()), "takes a flax.linen or flax.nnx Module"),
])
def test_bad_rules_fail_with_one_line(make, needle):
  with pytest.raises(lqjax.QuantizeError) as e:
    make()
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_unsupported_layers_are_named():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.ones, (x.shape[-1], 2))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Custom(name="mine")(nn.Dense(4)(x))

  with pytest.raises(lqjax.QuantizeError, match=re.escape("module 'mine' is a Custom")):
    lqjax.quantize(Net()).init(jax.random.key(0), X2)
  v = lqjax.quantize(Net(), [lqjax.Rule("mine", None), lqjax.Rule()]).init(
      jax.random.key(0), X2)
  assert [t.name for t in tree.quantized_tensors(v)] == ["params/Dense_0/kernel"]

  class NCustom(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.ones((6, 2)))

  with pytest.raises(lqjax.QuantizeError, match="is a NCustom"):
    lqjax.quantize(NCustom())
  assert nnx_quant.is_quantized_layer(
      lqjax.quantize(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))


def test_damaged_and_mismatched_files_fail_with_one_line(tmp_path):
  m, v, x = _mixed()
  path = tmp_path / "m.lqz"
  lqjax.save(path, v)
  blob = path.read_bytes()
  (tmp_path / "bad.lqz").write_bytes(blob[:-5])
  for target, needle, err in ((tmp_path / "bad.lqz", "checksum", compress.CorruptFileError),
                              (tmp_path / "none.lqz", "No such", FileNotFoundError),
                              (tmp_path, "is a directory", compress.CorruptFileError)):
    with pytest.raises(err, match=needle) as e:
      lqjax.load(target)
    assert "\n" not in str(e.value)
  small = lqjax.quantize(MixedCNN(), MIXED_RULES).init(jax.random.key(0),
                                                       jnp.zeros((1, 10, 10, 1)))
  with pytest.raises(compress.CorruptFileError, match="tensor params/fc/kernel has shape"):
    lqjax.load(path, small)


@pytest.mark.parametrize("header,needle", [
    ({}, "no list of tensors"), ([], "JSON list"),
    ({"tensors": [{"path": ["a"], "kind": "float", "shape": [2], "offset": 0, "nbytes": 99}],
      "payload_bytes": 8}, "outside the payload"),
    ({"tensors": [{"path": ["a"], "kind": "float", "shape": [3], "offset": 0, "nbytes": 8}],
      "payload_bytes": 8}, "does not match shape"),
])
def test_handmade_headers_with_valid_checksums_are_refused(header, needle):
  import hashlib
  import json
  h = json.dumps(header).encode()
  body = compress._PREFIX.pack(compress.MAGIC, compress.VERSION, 0, len(h)) + h + bytes(8)
  with pytest.raises(compress.CorruptFileError, match=needle):
    compress.parse(body + hashlib.sha256(body).digest())


class _RNNModel(nn.Module):
  carry: bool = False

  @nn.compact
  def __call__(self, x):
    cell = nn.LSTMCell(8)
    carry = ((jnp.zeros((x.shape[0], 8)),) * 2) if self.carry else None
    return nn.Dense(3)(nn.RNN(cell)(x, initial_carry=carry)[:, -1])


def test_onnx_of_a_linen_rnn_names_its_random_carry_and_exports_with_one_given(tmp_path):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  from lqjax import onnx_export
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  rules = lqjax.Rule("Dense_0", lqjax.QuantConfig(rule="lsq", bits=4))
  m = lqjax.quantize(_RNNModel(), rules)
  v = m.init(jax.random.key(0), x)
  path = tmp_path / "rnn.onnx"
  with pytest.raises(onnx_export.ExportError, match=r"random_split.*pass initial_carry=") as e:
    lqjax.export_onnx(path, lambda v, x: m.apply(v, x), v, x)
  assert "\n" not in str(e.value) and "versions" not in str(e.value) and not path.exists()
  m = lqjax.quantize(_RNNModel(carry=True), rules)  # the same weights, a carry given
  lqjax.export_onnx(path, lambda v, x: m.apply(v, x), v, x)
  np.testing.assert_allclose(onnx_export.run_onnx(path, np.asarray(x)),
                             jax.jit(m.apply)(v, x), rtol=1e-5, atol=1e-5)


def test_a_primitive_the_converter_lacks_is_named_in_one_line(tmp_path, monkeypatch):
  jax2onnx = pytest.importorskip("jax2onnx")
  from lqjax import onnx_export

  def lacking(*a, **k):
    raise NotImplementedError("[converter] No plugins registered for primitive 'cumlogsumexp'")
  monkeypatch.setattr(jax2onnx, "to_onnx", lacking)
  m, v, x = _mixed()
  with pytest.raises(onnx_export.ExportError, match=r"no ONNX conversion for the JAX "
                                                    r"primitive 'cumlogsumexp'") as e:
    lqjax.export_onnx(tmp_path / "m.onnx", lambda v, x: m.apply(v, x), v, x)
  assert "\n" not in str(e.value) and not (tmp_path / "m.onnx").exists()


def test_an_onnx_without_opset_25_gets_int4_for_2_bit_codes(tmp_path, monkeypatch):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  import onnx
  from lqjax import onnx_export
  monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 23)
  m, v, x = _mixed()
  blob = onnx_export.to_bytes(lambda v, x: m.apply(v, x), v, x)
  proto = onnx.load_from_string(blob)
  assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [23]
  (bias,) = [t for t in proto.graph.initializer if t.name == "w_params_fc_bias_codes"]
  assert bias.data_type == onnx.TensorProto.INT4
  np.testing.assert_allclose(onnx_export.run_onnx(blob, np.asarray(x)), jax.jit(m.apply)(v, x),
                             rtol=1e-5, atol=1e-5)


def test_onnx_with_float_weights_computes_the_same_without_dequantization(tmp_path):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  import onnx
  from lqjax import onnx_export
  m, v, x = _mixed()
  fn = lambda v, x: m.apply(v, x)  # noqa: E731
  ints, floats = (onnx_export.to_bytes(fn, v, x, weights=w) for w in ("int", "float"))
  proto = onnx.load_from_string(floats)
  assert not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
  assert all(t.data_type not in (onnx.TensorProto.INT2, onnx.TensorProto.INT4,
                                 onnx.TensorProto.INT8) for t in proto.graph.initializer)
  assert len(floats) > len(ints)
  xs = np.asarray(jax.random.uniform(jax.random.key(3), (7, 12, 12, 1)))
  np.testing.assert_allclose(onnx_export.run_onnx(floats, xs), onnx_export.run_onnx(ints, xs),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="weights must be 'int' or 'float', got 'fp16'"):
    onnx_export.to_bytes(fn, v, x, weights="fp16")


@pytest.mark.parametrize("bits", [2, 4])
def test_block_scales_export_as_one_blocked_dequantize(bits):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  import onnx
  from lqjax import onnx_export
  m = lqjax.quantize(nn.Dense(32), lqjax.Rule(config=lqjax.QuantConfig(
      rule="lsq", bits=bits, granularity="block", block_size=16)))
  x = jax.random.normal(jax.random.key(1), (3, 5, 64))  # (batch, sequence, features)
  v = m.init(jax.random.key(0), x)
  blob = onnx_export.to_bytes(lambda v, x: m.apply(v, x), v, x)
  proto = onnx.load_from_string(blob)
  (dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
  attrs = {a.name: a.i for a in dq.attribute}
  assert attrs == {"axis": 0, "block_size": 16}
  scale = [t for t in proto.graph.initializer if t.name == dq.input[1]][0]
  assert list(scale.dims) == [4, 32]  # one scale per 16 inputs and output
  np.testing.assert_allclose(onnx_export.run_onnx(blob, np.asarray(x)), jax.jit(m.apply)(v, x),
                             rtol=1e-5, atol=1e-5)
