"""Transformers: a character-level GPT (NNX, a scanned stack) and a ViT (Linen).

Plain Flax models with no lqjax in them, written the way such code is written
today; the application quantizes them by rules from outside, like any user model.

* :class:`GPT`: nanoGPT's decoder (Karpathy, ``model.py``): token and position
  embeddings, pre-norm blocks of causal multi-head self-attention and a 4x MLP
  with GELU, a final LayerNorm, and the output head tied to the token embedding
  (``Embed.attend``, as nanoGPT ties ``lm_head`` to ``wte``); no biases and no
  dropout, as nanoGPT's Shakespeare-char CPU configuration. The blocks are made
  by ``nnx.vmap`` over one block (every parameter gets a leading layer axis) and
  run by ``nnx.scan``. The attention is ``nnx.MultiHeadAttention``, whose q/k/v
  kernels are (embed, heads, head_dim) and whose output kernel is
  (heads, head_dim, embed): the heads are an axis, so per-head scales exist.
* :class:`ViT`: a small Vision Transformer for 32x32 images (Dosovitskiy et al.,
  2021): a patch embedding (a strided Conv), a class token and learned position
  embeddings, pre-norm blocks of ``nn.MultiHeadDotProductAttention`` and a GELU
  MLP, a final LayerNorm and a Dense head on the class token.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 65
  context: int = 64
  layers: int = 4
  heads: int = 4
  width: int = 128


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, use_bias=False, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, use_bias=False,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, use_bias=False, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(4 * width, width, use_bias=False, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x)), approximate=False))


class GPT(nnx.Module):
  """Decoder-only character LM; ``__call__(tokens [B, T]) -> logits [B, T, vocab]``."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.width, embedding_init=init, rngs=rngs)
    self.wpe = nnx.Embed(cfg.context, cfg.width, embedding_init=init, rngs=rngs)

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg.width, cfg.heads, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = nnx.LayerNorm(cfg.width, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    t = tokens.shape[-1]
    if t > self.cfg.context:
      raise ValueError(f"a sequence of {t} tokens is longer than the context, "
                       f"{self.cfg.context}")
    x = self.wte(tokens) + self.wpe(jnp.arange(t))
    mask = nnx.make_causal_mask(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x, mask)

    x = run(x, self.blocks)
    return self.wte.attend(self.ln_f(x))


class ViTBlock(nn.Module):
  width: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.width, name="fc2")(nn.gelu(nn.Dense(self.mlp, name="fc1")(y),
                                                approximate=False))
    return x + y


class ViT(nn.Module):
  """ViT for small images: patch embedding, class token, pre-norm blocks, Dense head."""

  num_classes: int = 10
  patch: int = 4
  width: int = 192
  depth: int = 6
  heads: int = 3
  mlp: int = 384

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                name="patch_embed")(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x], axis=1)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(self.depth):
      x = ViTBlock(self.width, self.heads, self.mlp, name=f"block{i + 1}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])

