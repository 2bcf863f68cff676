"""LongHeads against a dense reference (chunk representations, per-head selection of chunk 0, the
previous, the current and the best middle chunks, contiguous positions) for prefill, cached prefill
and token-by-token decoding; plain attention within the budget; planted chunks per head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from longctx_reference import attention_layer, layer_atol, output, projections, rope, under
from testing_utils import assert_close

from jaxrec import layers
from jaxrec.inference.longctx import longheads

W, C, T, T0, D = 4, 4, 30, 13, 8


def _softmax(s):
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def dense_longheads(attn, x, w, budget):
  """Every query's selected chunks per head, attended at their contiguous positions."""
  q, k, v = projections(attn, x)
  bsz, t, heads, _ = q.shape
  out = np.zeros(q.shape)
  local = np.arange(w)
  for b in range(bsz):
    reps = {}
    for c in range(t // w):
      rows = slice(c * w, (c + 1) * w)
      qc, kc = rope(q[b, rows], local), rope(k[b, rows], local)
      o = np.einsum(
        "hqs,shk->qhk", _softmax(np.einsum("qhk,shk->hqs", qc, kc) / np.sqrt(D)), v[b, rows]
      )
      a = _softmax(np.einsum("hk,shk->hs", o.mean(0), kc) / np.sqrt(D))
      reps[c] = np.einsum("hs,shk->hk", a, kc)
    for i in range(t):
      cur = i // w
      for h in range(heads):
        if cur + 1 <= budget:
          chunks = list(range(cur + 1))
        else:
          middle = sorted(range(1, cur - 1), key=lambda c: -q[b, i, h] @ reps[c][h])
          chunks = sorted({0, cur - 1, cur, *middle[: budget - 3]})
        keys = [j for c in chunks for j in range(c * w, min((c + 1) * w, i + 1))]
        kpos = [chunks.index(j // w) * w + j % w for j in keys]
        qpos = chunks.index(cur) * w + i % w
        s = rope(k[b, keys, h][:, None], kpos)[:, 0] @ rope(q[b, i, h][None, None], [qpos])[0, 0]
        p = _softmax(s / np.sqrt(D))
        out[b, i, h] = p @ v[b, keys, h]
  return output(attn, out)


@pytest.fixture(scope="module")
def setup():
  attn = attention_layer()
  x = np.random.default_rng(0).standard_normal((2, T, 16)).astype(np.float32)
  return attn, x


def test_prefill_and_decoding_match_the_dense_reference(setup):
  attn, x = setup
  policy = longheads(chunk_size=W, chunks_per_head=C)
  want = dense_longheads(attn, x, W, C)
  got = jax.jit(lambda x: under(attn, policy)(x)[0])(x)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x), err_msg="prefill, no cache")
  step = jax.jit(lambda x, c: under(attn, policy)(x, cache=c))
  cache = under(attn, policy).init_cache(2, T, jnp.float32)
  outs = []
  for x_i in [x[:, :T0]] + [x[:, i : i + 1] for i in range(T0, T)]:
    y, cache = step(x_i, cache)
    outs.append(y)
  assert_close(np.concatenate(outs, 1), want, rtol=0, atol=layer_atol(attn, x), err_msg="decoding")


def test_within_the_budget_equals_attention(setup):
  attn, x = setup
  policy = longheads(chunk_size=W, chunks_per_head=C)
  short = x[:, : C * W]
  got = jax.jit(lambda x: under(attn, policy)(x)[0])(short)
  want = jax.jit(lambda x: attn(x)[0])(short)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x, computations=2))


def test_each_head_selects_its_planted_chunk():
  attn = layers.Attention(16, 2, head_dim=D, rngs=nnx.Rngs(0))
  policy = longheads(chunk_size=W, chunks_per_head=C)
  rng = np.random.default_rng(1)
  q = np.zeros((1, 8, W, 2, D), np.float32)
  k = 0.1 * rng.standard_normal((1, 8, W, 2, D)).astype(np.float32)
  v = rng.standard_normal((1, 8, W, 2, D)).astype(np.float32)
  k[0, 5, :, 0, D - 1] = 5.0  # head 0's chunk 5 points along the slowest RoPE pair
  k[0, 2, :, 1, D - 1] = 5.0  # head 1's chunk 2
  query = np.zeros((1, 2, D), np.float32)
  query[..., D - 1] = 1.0

  @jax.jit
  def select(q, k, v, query):
    k_local = attn.rope(k.reshape(1, 8 * W, 2, D), jnp.arange(8 * W) % W).reshape(k.shape)
    reps = policy.chunk_representations(attn, q, k_local, v)
    return policy.select(query, jnp.asarray(8 * W - 1), reps)

  ids, used = select(q, k, v, query)
  assert np.asarray(used).all()
  assert np.asarray(ids).tolist() == [[[0, 5, 6, 7], [0, 2, 6, 7]]]


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="chunks_per_head: expected an int >= 3"):
    longheads(chunk_size=4, chunks_per_head=2)
  with pytest.raises(ValueError, match="chunk_size: expected an int >= 1"):
    longheads(chunk_size=0)
