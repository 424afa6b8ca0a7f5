"""A small GPT in NNX, its blocks stacked by nnx.vmap and run by nnx.scan, quantized from
outside by lqjax, trained on Tiny Shakespeare.

  LQJAX_DATA_DIR=../shared/datasets python examples/nnx_gpt_stack.py [--steps 300]

The model below has no lqjax import: it is written the way LLM code is written today.
The script quantizes the finished model with three rules (per-head scales on the
attention projections, blocks of 32 on the MLP, 8-bit embeddings), each stacked kernel
getting one scale tensor with the layer axis in front, trains it with ``nnx.Optimizer``
over ``lqjax.optim.split``, saves the packed file, reloads it into a fresh quantized model
and checks that the logits are identical. It prints the validation loss (nats per
character on nanoGPT's split) and the packed file's size against FP32.
"""

import argparse
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class Block(nnx.Module):
  def __init__(self, width, heads, rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.proj = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  def __init__(self, vocab, context, width, heads, layers, rngs):
    self.wte = nnx.Embed(vocab, width, rngs=rngs)
    self.wpe = nnx.Embed(context, width, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(width, heads, rngs)

    self.blocks = blocks(rngs)
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[-1]))
    mask = nnx.make_causal_mask(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x, mask)

    return self.wte.attend(self.ln_f(run(x, self.blocks)))


RULES = None  # set below, after the lqjax import: the model above does not need it

import lqjax  # noqa: E402

RULES = [
    lqjax.Rule("wte|wpe", lqjax.QuantConfig(rule="lsq", bits=8, rounding="round")),
    lqjax.Rule("blocks/attn/(query|key|value|out)",
               lqjax.QuantConfig(rule="lsq", bits=4, rounding="round", granularity="head")),
    lqjax.Rule("blocks/(fc|proj)", lqjax.QuantConfig(rule="lsq", bits=4, rounding="round",
                                                     granularity="block", block_size=32)),
]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  path = pathlib.Path(os.environ.get("LQJAX_DATA_DIR", "")) / "tinyshakespeare" / "input.txt"
  if not path.is_file():
    raise SystemExit(f"error: {path} not found; set LQJAX_DATA_DIR")
  text = path.read_text()
  vocab = sorted(set(text))
  ids = np.array([vocab.index(c) for c in text], np.int32)
  split = int(0.9 * len(ids))
  train, val = jnp.asarray(ids[:split]), ids[split:]
  context, batch = 32, 16

  model = lqjax.quantize(GPT(len(vocab), context, 64, 4, 2, nnx.Rngs(0)), RULES)
  print("attention query scales:", model.blocks.attn.query.kernel_quant.log_scale[...].shape,
        "(layers, 1, heads, 1)")
  opt = nnx.Optimizer(model, lqjax.optim.split(optax.adam(3e-3), optax.adam(1e-3)),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, key):
    ix = jax.random.randint(key, (batch,), 0, train.shape[0] - context - 1)
    xy = jax.vmap(lambda i: jax.lax.dynamic_slice(train, (i,), (context + 1,)))(ix)
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        m(xy[:, :-1]), xy[:, 1:]).mean()
    opt.update(model, nnx.grad(loss)(model))

  for i in range(args.steps):
    step(model, opt, jax.random.key(i))

  n = (len(val) - 1) // context
  x = val[:n * context].reshape(n, context)
  y = val[1:n * context + 1].reshape(n, context)
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
  out = pathlib.Path(args.out or tempfile.mkdtemp())
  size = lqjax.save(out / "gpt.lqz", model)
  fresh = lqjax.quantize(GPT(len(vocab), context, 64, 4, 2, nnx.Rngs(1)), RULES)
  lqjax.load(out / "gpt.lqz", fresh)
  run = nnx.jit(lambda m, x: m(x))
  same = bool(np.array_equal(run(fresh, jnp.asarray(x[:64])), run(model, jnp.asarray(x[:64]))))
  fp32 = 4 * sum(v.size for v in jax.tree.leaves(nnx.state(GPT(len(vocab), context, 64, 4, 2,
                                                                 nnx.Rngs(0)))))
  print(f"val loss {loss:.4f} nats/char; packed file {size} bytes, {fp32 / size:.1f}x smaller "
        f"than FP32; reloaded logits identical: {same}")


if __name__ == "__main__":
  main()
