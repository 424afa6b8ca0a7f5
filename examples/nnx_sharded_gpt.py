"""A small GPT sharded over a mesh of devices, quantized by lqjax, trained in your own loop.

  LQJAX_DATA_DIR=../shared/datasets python examples/nnx_sharded_gpt.py [--steps 200]

On a CPU the script makes 8 host devices (XLA's --xla_force_host_platform_device_count)
and a 2 x 4 mesh: the batch is split over "data"; the attention and MLP kernels are
partitioned over "model" (Megatron style: the first matrix of each pair by its output
columns, the second by its input rows) with ``nnx.with_partitioning``. The model has no
lqjax in it. ``lqjax.quantize`` runs inside the mesh, and each log scale gets its weight's
partitioning on the axes it keeps whole: a row scale of a column-sharded kernel is
sharded as the kernel is, a row scale of a row-sharded kernel is replicated. The loop is
``nnx.Optimizer`` over ``lqjax.optim.split`` (Adam for the weights, Adam for the scales).
It prints the shardings, the validation loss (nats per character on nanoGPT's split),
the packed file's size against FP32, and whether the reloaded file, placed as the model
is sharded, gives identical logits.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lqjax  # noqa: E402  (for the rules and the loop: the model classes do not use it)


def sharded(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Block(nnx.Module):
  def __init__(self, width, heads, rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=sharded((None, "model")), rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=sharded(("model", None)), rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, kernel_init=sharded((None, "model")), rngs=rngs)
    self.proj = nnx.Linear(4 * width, width, kernel_init=sharded(("model", None)), rngs=rngs)

  def __call__(self, x):
    b, t, w = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, -1), 3, axis=2)
    mask = nnx.make_causal_mask(jnp.ones((b, t)))
    att = nnx.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=mask)
    x = x + self.out(att.reshape(b, t, w))
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  def __init__(self, vocab, context, width, heads, layers, rngs):
    self.wte = nnx.Embed(vocab, width, rngs=rngs)
    self.wpe = nnx.Embed(context, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


RULES = [
    lqjax.Rule("wte|wpe", lqjax.QuantConfig(rule="lsq", bits=8, rounding="round")),
    lqjax.Rule("blocks/.*", lqjax.QuantConfig(rule="lsq", bits=4, rounding="round",
                                               granularity="row")),
]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  path = pathlib.Path(os.environ.get("LQJAX_DATA_DIR", "")) / "tinyshakespeare" / "input.txt"
  if not path.is_file():
    raise SystemExit(f"error: {path} not found; set LQJAX_DATA_DIR")
  text = path.read_text()
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text], np.int32)
  split = int(0.9 * len(ids))
  train, val = ids[:split], ids[split:]
  context, batch, width, heads, layers = 32, 16, 64, 4, 2

  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  make = lambda seed: GPT(len(vocab), context, width, heads, layers, nnx.Rngs(seed))  # noqa: E731
  with jax.set_mesh(mesh):
    model = lqjax.quantize(make(0), RULES)
    opt = nnx.Optimizer(model, lqjax.optim.split(optax.adam(3e-3), optax.adam(1e-3)),
                        wrt=nnx.Param)
  fc = model.blocks[0].fc
  proj = model.blocks[0].proj
  print(f"mesh {dict(mesh.shape)}; fc kernel {fc.kernel[...].sharding.spec}, its row scale "
        f"{fc.kernel_quant.log_scale[...].sharding.spec}; proj kernel "
        f"{proj.kernel[...].sharding.spec}, its row scale "
        f"{proj.kernel_quant.log_scale[...].sharding.spec}")

  @nnx.jit
  def step(model, opt, xy):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(xy[:, :-1]), xy[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  rng = np.random.default_rng(0)
  batches = NamedSharding(mesh, P("data"))
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(args.steps):
      ix = rng.integers(0, len(train) - context - 1, batch)
      xy = jax.device_put(np.stack([train[i:i + context + 1] for i in ix]), batches)
      losses.append(float(step(model, opt, xy)))
    n = (len(val) - 1) // context // batch * batch
    x = jax.device_put(val[:n * context].reshape(n, context), batches)
    y = val[1:n * context + 1].reshape(n, context)
    logits = nnx.jit(lambda m, x: m(x))(model, x)
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())

  out = pathlib.Path(args.out or tempfile.mkdtemp())
  size = lqjax.save(out / "gpt.lqz", model)  # the same bytes as the model replicated
  with jax.set_mesh(mesh):
    fresh = lqjax.quantize(make(1), RULES)
  lqjax.load(out / "gpt.lqz", fresh)  # placed as `fresh` is sharded
  with jax.set_mesh(mesh):
    same = bool(np.array_equal(nnx.jit(lambda m, x: m(x))(fresh, x), logits))
  placed = fresh.blocks[0].fc.kernel_quant.log_scale[...].sharding.spec
  with jax.set_mesh(mesh):
    fp32 = 4 * sum(v.size for v in jax.tree.leaves(nnx.state(make(0))))
  print(f"train loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}; val loss {loss:.4f} "
        f"nats/char; packed file {size} bytes, {fp32 / size:.1f}x smaller than FP32; reloaded "
        f"scale placed as {placed}; reloaded logits identical: {same}")


if __name__ == "__main__":
  main()
