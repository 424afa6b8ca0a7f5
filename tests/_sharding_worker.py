"""Run by test_sharding.py in its own process with 8 host devices (XLA_FLAGS must be set
before jax starts): every check prints one JSON line."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lqjax  # noqa: E402
from lqjax import accounting, rules as rules_lib  # noqa: E402

AUTO = (jax.sharding.AxisType.Auto,) * 2
LSQ = dict(rule="lsq", bits=4, rounding="round")
RATIO = dict(rule="ratio", threshold=0.2, rounding="round")


def out(**kw):
  print(json.dumps(kw), flush=True)


def spec_str(s):
  return None if s is None else [None if a is None else str(a) for a in tuple(s)]


class LinenMLP(nn.Module):
  logical: bool = False

  @nn.compact
  def __call__(self, x):
    ki = nn.initializers.lecun_normal()
    part = nn.with_logical_partitioning if self.logical else nn.with_partitioning
    a, b = (("embed", "mlp"), ("mlp", "embed")) if self.logical else \
        (("data", "model"), ("model", None))
    h = nn.Dense(32, kernel_init=part(ki, a), name="fc1")(x)
    h = nn.Dense(16, kernel_init=part(ki, b), name="fc2")(nn.relu(h))
    return nn.Dense(4, name="head")(h)


LINEN_RULES = [lqjax.Rule("fc1", lqjax.QuantConfig(**LSQ, granularity="row")),
               lqjax.Rule("fc2", lqjax.QuantConfig(**RATIO, granularity="block", block_size=8)),
               lqjax.Rule("head", lqjax.QuantConfig(**LSQ, granularity="row"))]


def linen_checks():
  q = lqjax.quantize(LinenMLP(), LINEN_RULES)
  x = jax.random.normal(jax.random.key(1), (16, 16))
  y = jax.random.randint(jax.random.key(2), (16,), 0, 4)
  abstract = jax.eval_shape(q.init, jax.random.key(0), x)
  spec = nn.get_partition_spec(abstract)["params"]
  out(check="linen_specs", fc1=spec_str(spec["fc1"]["kernel_quant"]["log_scale"]),
      fc2=spec_str(spec["fc2"]["kernel_quant"]["log_scale"]),
      head=spec_str(spec["head"]["kernel_quant"]["log_scale"]))

  def loss(v, x, y):
    logits = q.apply(v, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  one = jax.devices()[0]
  for shape in ((2, 4), (8, 1)):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=AUTO)
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), nn.get_partition_spec(abstract))
    v = jax.jit(q.init, out_shardings=shard)(jax.random.key(0), x)
    ref = jax.device_put(v, one)  # the same values, replicated on one device
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss))(ref, x, y)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
      l, g = jax.jit(jax.value_and_grad(loss))(v, xs, y)
    gdiff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                zip(jax.tree.leaves(g), jax.tree.leaves(ref_grad)))
    scale = v["params"]["fc1"]["kernel_quant"]["log_scale"].value
    loaded = lqjax.load(_save(v), target=v)
    lscale = lqjax.tree.unbox(loaded)["params"]["fc1"]["kernel_quant"]["log_scale"]
    placed = lqjax.load(_save(ref), shardings=shard)  # explicit shardings, no target
    out(check="linen_agreement", mesh=list(shape), loss_diff=abs(float(l) - float(ref_loss)),
        grad_diff=gdiff, scale_spec=spec_str(scale.sharding.spec),
        bits=float(accounting.average_bits(v)[0]),
        ref_bits=float(accounting.average_bits(ref)[0]),
        same_bytes=lqjax.compress.to_bytes(v) == lqjax.compress.to_bytes(ref),
        loaded_spec=spec_str(lscale.sharding.spec),
        placed_spec=spec_str(lqjax.tree.unbox(placed)["params"]["fc1"]["kernel"].sharding.spec),
        loaded_equal=bool(np.array_equal(np.asarray(lscale), np.asarray(scale))))
  # logical names: the scale carries logical names, mapped by the rules in force
  ql = lqjax.quantize(LinenMLP(logical=True), LINEN_RULES)
  rules = (("embed", "data"), ("mlp", "model"))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
  with nn.logical_axis_rules(rules):
    spec = nn.get_partition_spec(jax.eval_shape(ql.init, jax.random.key(0), x))
    shard = nn.logical_to_mesh_sharding(spec, mesh, rules)
    v = jax.jit(ql.init, out_shardings=shard)(jax.random.key(0), x)
  out(check="linen_logical", fc1=spec_str(spec["params"]["fc1"]["kernel_quant"]["log_scale"]),
      mesh_spec=spec_str(v["params"]["fc1"]["kernel_quant"]["log_scale"].value.sharding.spec))


def _save(v):
  path = tempfile.mktemp(suffix=".lqz")
  lqjax.save(path, v)
  return path


class Block(nnx.Module):
  def __init__(self, rngs):
    ki = nnx.initializers.lecun_normal()
    self.fc = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(ki, ("data", "model")),
                         rngs=rngs)
    self.proj = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(ki, ("model", "data")),
                           rngs=rngs)

  def __call__(self, x):
    return x + self.proj(nnx.relu(self.fc(x)))


class Stack(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def make(rngs):
      return Block(rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)
    return self.head(run(x, self.blocks))


NNX_RULES = [lqjax.Rule("blocks/fc", lqjax.QuantConfig(**LSQ, granularity="row")),
             lqjax.Rule("blocks/proj", lqjax.QuantConfig(**RATIO, granularity="row")),
             lqjax.Rule("head", lqjax.QuantConfig(**LSQ, granularity="row"))]


def nnx_checks():
  x = jax.random.normal(jax.random.key(1), (16, 16))
  y = jax.random.randint(jax.random.key(2), (16,), 0, 4)

  def loss_of(gd, rest):
    def loss(p, x, y):
      logits = nnx.merge(gd, p, rest)(x)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    return loss

  one = jax.devices()[0]
  for shape in ((2, 4), (8, 1)):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=AUTO)
    with jax.set_mesh(mesh):
      q = lqjax.quantize(Stack(nnx.Rngs(0)), NNX_RULES)
      specs = nnx.get_partition_spec(nnx.state(q))
      gd, params, rest = nnx.split(q, nnx.Param, ...)
      l, g = jax.jit(jax.value_and_grad(loss_of(gd, rest)))(params, x, y)
    ref_params, ref_rest = jax.device_put((params, rest), one)  # replicated, one device
    l0, g0 = jax.jit(jax.value_and_grad(loss_of(gd, ref_rest)))(ref_params, x, y)
    gdiff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                zip(jax.tree.leaves(g), jax.tree.leaves(g0)))
    scale = q.blocks.fc.kernel_quant.log_scale[...]
    with jax.set_mesh(mesh):
      q2 = lqjax.quantize(Stack(nnx.Rngs(5)), NNX_RULES)
    lqjax.load(_save(nnx.state(q)), q2)
    s2 = q2.blocks.fc.kernel_quant.log_scale[...]
    out(check="nnx_agreement", mesh=list(shape), loss_diff=abs(float(l) - float(l0)),
        grad_diff=gdiff, bits=float(accounting.average_bits(nnx.state(q))[0]),
        ref_bits=float(accounting.average_bits(nnx.merge_state(ref_params, ref_rest))[0]),
        same_bytes=lqjax.compress.to_bytes(nnx.state(q)) ==
        lqjax.compress.to_bytes(nnx.merge_state(ref_params, ref_rest)),
        fc=spec_str(specs["blocks"]["fc"]["kernel_quant"]["log_scale"].get_value()),
        proj=spec_str(specs["blocks"]["proj"]["kernel_quant"]["log_scale"].get_value()),
        scale_spec=spec_str(scale.sharding.spec), loaded_spec=spec_str(s2.sharding.spec),
        loaded_equal=bool(np.array_equal(np.asarray(s2), np.asarray(scale))))
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
  with jax.set_mesh(mesh):
    m = Stack(nnx.Rngs(0))
  try:
    lqjax.quantize(m, NNX_RULES)
    out(check="nnx_outside_mesh", error=None)
  except rules_lib.QuantizeError as e:
    out(check="nnx_outside_mesh", error=str(e))


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  {"linen": linen_checks, "nnx": nnx_checks}[sys.argv[1]]()

