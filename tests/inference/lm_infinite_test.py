"""LM-Infinite against a dense Λ-mask reference (prefill, blockwise, cached chunks, token-by-token
decoding, top-k middle tokens); T <= window equals attention; the receptive field of a model."""

import jax
import numpy as np
import pytest
from flax import nnx
from longctx_reference import (
  attend,
  attention_layer,
  layer_atol,
  output,
  projections,
  rope,
  run_chunks,
  under,
)
from testing_utils import assert_close

from jaxrec.inference import loglikelihood, longctx
from jaxrec.inference.longctx import lm_infinite
from jaxrec.models import LM, LMConfig

L, G, CAP = 8, 3, 11
T = 3 * L + 5


def dense_lm_infinite(attn, x, policy, top_k_rows=()):
  """Output of ``attn`` over ``x [B, T, D]`` from the full T x T scores with the Λ rule; rows in
  ``top_k_rows`` also see their top-k middle keys."""
  q, k, v = projections(attn, x)
  t, big_l, g = x.shape[1], policy.window, policy.global_tokens
  pos = np.arange(t)
  out = []
  for b in range(x.shape[0]):
    local = np.einsum("thk,shk->hts", rope(q[b], pos), rope(k[b], pos))
    capped = np.einsum("thk,shk->hts", rope(q[b], np.minimum(policy.distance_cap, pos)), k[b])
    middle = np.einsum("thk,shk->hts", rope(q[b], np.full(t, policy.top_k_insert_at)), k[b])
    i, j = pos[:, None], pos[None, :]
    in_window = (i - j >= 0) & (i - j < big_l)
    is_global = (j < g) & (j <= i - big_l)
    s = np.where(in_window, local, capped) / np.sqrt(q.shape[-1])
    mask = np.broadcast_to(in_window | is_global, s.shape).copy()
    for row in top_k_rows:
      cand = np.where((pos >= g) & (pos <= row - big_l), middle[:, row], -np.inf)
      for h in range(s.shape[0]):
        top = np.argsort(-cand[h])[: policy.top_k]
        top = top[np.isfinite(cand[h, top])]
        s[h, row, top] = middle[h, row, top] / np.sqrt(q.shape[-1])
        mask[h, row, top] = True
    out.append(attend(s, mask, v[b]))
  return output(attn, np.stack(out))


@pytest.fixture(scope="module")
def setup():
  attn = attention_layer()
  x = np.random.default_rng(0).standard_normal((2, T, 16)).astype(np.float32)
  return attn, x


def _run_chunks(attn, x, policy, chunks, layer=0):
  return run_chunks(attn, x, policy, chunks, layer)[0]


def test_prefill_blockwise_and_decoding_match_the_dense_lambda_mask(setup):
  attn, x = setup
  policy = lm_infinite(global_tokens=G, window=L, distance_cap=CAP)
  want = dense_lm_infinite(attn, x, policy)
  no_cache = jax.jit(lambda x: under(attn, policy)(x)[0])(x)
  assert_close(no_cache, want, rtol=0, atol=layer_atol(attn, x), err_msg="blockwise, no cache")
  for chunks in ((T,), (13, 5, 11), (1,) * T):
    got = _run_chunks(attn, x, policy, chunks)
    assert_close(got, want, rtol=0, atol=layer_atol(attn, x), err_msg=f"chunks {chunks[:3]}")


def test_top_k_middle_tokens_join_the_last_query_from_their_layer(setup):
  attn, x = setup
  policy = lm_infinite(G, L, CAP, top_k=2, top_k_from_layer=1, top_k_insert_at=5)
  want = dense_lm_infinite(attn, x, policy, top_k_rows=range(T))
  got = _run_chunks(attn, x, policy, (1,) * T, layer=1)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x), err_msg="decoding with top-k")
  prefill = jax.jit(lambda x: under(attn, policy, layer=1)(x)[0])(x)
  want_last = dense_lm_infinite(attn, x, policy, top_k_rows=(T - 1,))
  assert_close(prefill, want_last, rtol=0, atol=layer_atol(attn, x), err_msg="prefill with top-k")
  below = jax.jit(lambda x: under(attn, policy, layer=0)(x)[0])(x)
  assert_close(below, dense_lm_infinite(attn, x, policy), rtol=0, atol=layer_atol(attn, x))


def test_short_sequences_equal_plain_attention(setup):
  attn, x = setup
  policy = lm_infinite(global_tokens=2, window=2 * T, distance_cap=2 * T)
  want = jax.jit(lambda x: attn(x)[0])(x)
  got = jax.jit(lambda x: under(attn, policy)(x)[0])(x)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x, computations=2))
  # A cache shorter than the window keeps a ring of its own length.
  got = _run_chunks(attn, x, policy, (13,) + (1,) * (T - 13))
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x, computations=2))


@pytest.fixture(scope="module")
def model():
  cfg = LMConfig(
    vocab_size=32, d_model=16, num_layers=2, num_heads=2, init_std=0.5, mixer_pattern=("attention",)
  )
  return LM(cfg, rngs=nnx.Rngs(0))


def test_receptive_field_of_a_model_is_bit_exact(model):
  policy = lm_infinite(global_tokens=G, window=L, distance_cap=L)
  tokens = np.random.default_rng(1).integers(0, 32, (1, 40)).astype(np.int32)
  # Outside the Λ region of the last token after 2 layers: G <= j < T - 1 - 2 (L - 1).
  edited = tokens.copy()
  edited[0, G : 40 - 1 - 2 * (L - 1)] = (edited[0, G : 40 - 1 - 2 * (L - 1)] + 7) % 32
  long_model = longctx.apply(model, policy)
  f = jax.jit(lambda t: long_model(t)[0][:, -1])
  np.testing.assert_array_equal(f(tokens), f(edited))
  inside = tokens.copy()
  inside[0, 40 - 1 - 2 * (L - 1)] = (inside[0, 40 - 1 - 2 * (L - 1)] + 7) % 32
  assert np.abs(np.asarray(f(inside)) - np.asarray(f(tokens))).max() > 0
  changed = tokens.copy()
  changed[0, G - 1] = (changed[0, G - 1] + 7) % 32  # a global token is always seen
  assert np.abs(np.asarray(f(changed)) - np.asarray(f(tokens))).max() > 0
  # Teacher-forced decoding through the cache scores as the parallel pass.
  parallel = loglikelihood(long_model, tokens)
  assert parallel.shape == (1, 39)
  decoded = loglikelihood(long_model, tokens, prefill=11)
  assert_close(decoded, parallel, rtol=0, atol=1e-4)


def test_bad_settings_are_refused(model):
  with pytest.raises(ValueError, match="window: expected at most distance_cap=4"):
    lm_infinite(global_tokens=1, window=8, distance_cap=4)
  with pytest.raises(ValueError, match="global_tokens: expected an int >= 0"):
    lm_infinite(global_tokens=-1)
  with pytest.raises(ValueError, match="policy: expected a jaxrec"):
    longctx.apply(model, "lm_infinite")
