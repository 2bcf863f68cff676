"""Dense float64 references for the long-context policies (``jaxrec.inference.longctx``): the
full ``T x S`` scores of one attention layer with a method's mask and positions, written with
numpy's own RoPE, independent of the library's blockwise and cached paths."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from testing_utils import rounding_atol

from jaxrec import layers
from jaxrec.inference.longctx import PolicyAttention


def attention_layer(heads=4, kv_heads=2, d_model=16, head_dim=8, seed=0) -> layers.Attention:
  """A small grouped-query attention layer with large projections (peaked softmaxes)."""
  return layers.Attention(
    d_model, heads, num_kv_heads=kv_heads, head_dim=head_dim, init_std=0.5, rngs=nnx.Rngs(seed)
  )


def rope(x, positions, theta=10_000.0):
  """``x [T, H, K]`` rotated, pair ``(i, i + K/2)`` by ``position · theta^(-2i/K)``, float64."""
  half = x.shape[-1] // 2
  angle = np.asarray(positions, np.float64)[:, None] * theta ** (-np.arange(half) / half)
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def projections(attn, x):
  """Un-rotated ``q [B, T, H, K]``, ``k, v [B, T, H, K]`` (key heads repeated), float64."""
  q, k, v = (np.asarray(p(x), np.float64) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
  rep = attn.num_heads // attn.num_kv_heads
  return q, np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)


def attend(s, mask, v):
  """``softmax(s where mask) v`` for ``s, mask [H, T, S]`` and ``v [S, H, K]`` -> ``[T, H, K]``."""
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("hts,shk->thk", p, v)


def layer_atol(attn, x, computations=1):
  """``atol`` of one attention layer's output over ``x [B, T, D]`` against a float64 reference
  that shares its fp32 projections, under any mask (testing_utils' error model, per tensor): an
  output head is a convex combination of values, ``|heads| <= max|v|``, so the output projection
  has magnitude ``max_i Σ_j |W_o[j, i]| · max|v|``; its ``H·K``-long product, the ``T`` weighted
  values, the softmax's few roundings, and each weight's relative error from its logit (twice a
  ``K``-long product of rotated factors, the rotation a few roundings more, times the largest
  ``|q|·|k| / √K``), for ``computations`` fp32 runs (the reference's own o_proj counted once)."""
  q, k, v = projections(attn, x)
  head_dim = q.shape[-1]
  logits = np.max(np.einsum("bthk,bshk->bhts", np.abs(q), np.abs(k))) / np.sqrt(head_dim)
  kernel = np.abs(np.asarray(attn.o_proj.kernel[...], np.float64)).reshape(-1, x.shape[-1])
  magnitude = np.max(kernel.sum(0)) * np.max(np.abs(v))
  per_run = kernel.shape[0] + x.shape[1] + 3 + 2 * (head_dim + 2 + 4) * logits
  return rounding_atol(magnitude, terms=computations * per_run + kernel.shape[0])


def output(attn, heads):
  """The layer's output projection of ``heads [B, T, H, K]``."""
  return np.asarray(attn.o_proj(np.asarray(heads, np.float32)), np.float64)


def under(attn, policy, layer=0):
  """``attn`` under ``policy`` at depth ``layer`` (``attn`` itself for ``policy=None``)."""
  return attn if policy is None else PolicyAttention(attn, policy, layer=layer)


def run_chunks(attn, x, policy, chunks, layer=0):
  """``attn`` (under ``policy``, ``None`` for plain attention) fed ``x [B, T, D]`` through a cache
  in consecutive calls of the given lengths: ``(outputs [B, T, D], final cache)``."""
  mixer = under(attn, policy, layer)
  step = jax.jit(lambda x, c: mixer(x, cache=c))
  cache = mixer.init_cache(x.shape[0], x.shape[1], jnp.float32)
  outs, start = [], 0
  for n in chunks:
    y, cache = step(x[:, start : start + n], cache)
    outs.append(y)
    start += n
  return np.concatenate(outs, axis=1), cache
