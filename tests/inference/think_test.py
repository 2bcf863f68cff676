"""ThinK against a dense reference (explicit Frobenius channel scores, zero-filled pruned channels,
SnapKV eviction as a mask) for token-by-token decoding; prefill unchanged; ratio 0 is attention;
planted dead channels are exactly the pruned ones; memory of the pruned keys."""

import numpy as np
import pytest
from longctx_reference import (
  attend,
  attention_layer,
  layer_atol,
  output,
  projections,
  rope,
  run_chunks,
)
from testing_utils import assert_close

from jaxrec.inference.longctx import SnapKV, cache_bytes, think

T0, NEW, OBS, D = 12, 3, 4, 8


def _decode(attn, x, policy):
  """Prefill ``x[:, :T0]``, then decode the rest one token at a time."""
  return run_chunks(attn, x, policy, (T0,) + (1,) * (x.shape[1] - T0))


def dense_think(attn, x, ratio, capacity=None, kernel=1):
  """Decoding outputs from the full scores: older prompt keys lose their lowest-scoring channels
  (zero-filled), evicted ones are masked; the prefill rows are plain causal attention."""
  q, k, v = projections(attn, x)
  t = x.shape[1]
  pos = np.arange(t)
  old, rep = T0 - OBS, attn.num_heads // attn.num_kv_heads
  out, pruned_sets = [], []
  for b in range(x.shape[0]):
    qr, kr = rope(q[b], pos), rope(k[b], pos)
    visible = np.tril(np.ones((attn.num_heads, t, t), bool))
    if capacity is not None:
      s = np.einsum("thk,shk->hts", qr[:T0], kr[:T0]) / np.sqrt(D)
      s = np.where(visible[:, :T0, :T0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      votes = p[:, old:T0, :old].sum(1).reshape(attn.num_kv_heads, rep, old).sum(1)
      padded = np.pad(votes, ((0, 0), (kernel // 2,) * 2), constant_values=-np.inf)
      pooled = np.stack([padded[:, j : j + kernel].max(1) for j in range(old)], 1)
      for g in range(attn.num_kv_heads):
        dropped = np.argsort(-pooled[g], kind="stable")[capacity - OBS :]
        visible[g * rep : (g + 1) * rep, T0:, dropped] = False
    for g in range(attn.num_kv_heads):
      heads = range(g * rep, (g + 1) * rep)
      kept_rows = visible[g * rep, -1, :old]
      score = [
        sum(np.linalg.norm(np.outer(qr[old:T0, h, c], kr[:old][kept_rows, h, c])) for h in heads)
        for c in range(D)
      ]
      pruned = np.argsort(score, kind="stable")[: int(np.floor(ratio * D))]
      pruned_sets.append(set(pruned.tolist()))
      for h in heads:
        kr[:old, h, pruned] = 0.0
    s = np.einsum("thk,shk->hts", qr, kr) / np.sqrt(D)
    full = np.einsum("thk,shk->hts", qr, rope(k[b], pos)) / np.sqrt(D)
    s[:, :T0] = full[:, :T0]
    out.append(attend(s, visible, v[b]))
  return output(attn, np.stack(out)), pruned_sets


@pytest.fixture(scope="module")
def setup():
  attn = attention_layer()
  x = np.random.default_rng(0).standard_normal((2, T0 + NEW, 16)).astype(np.float32)
  return attn, x


@pytest.mark.parametrize(
  "policy", [think(0.5, observation=OBS), think(0.25, OBS, SnapKV(capacity=7, kernel=3))]
)
def test_decoding_matches_the_dense_reference(setup, policy):
  attn, x = setup
  capacity = None if policy.eviction is None else policy.eviction.capacity
  kernel = 1 if policy.eviction is None else policy.eviction.kernel
  want, pruned = dense_think(attn, x, policy.channel_ratio, capacity, kernel)
  got, cache = _decode(attn, x, policy)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x))
  kept = np.asarray(cache.keep).reshape(-1, D - len(pruned[0]))
  assert [set(range(D)) - set(row) for row in kept.tolist()] == pruned


def test_ratio_zero_and_prefill_equal_attention(setup):
  attn, x = setup
  got, _ = _decode(attn, x, think(0.0, observation=OBS))
  want, _ = _decode(attn, x, None)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x, computations=2))
  pruned, _ = _decode(attn, x, think(0.5, observation=OBS))
  assert_close(pruned[:, :T0], got[:, :T0], rtol=0, atol=1e-6 * np.abs(got).max())


def test_planted_dead_channels_are_exactly_the_pruned_ones():
  attn = attention_layer(seed=1)
  dead = [1, 1 + D // 2]  # one RoPE pair: zero after rotation too
  kernel = np.asarray(attn.q_proj.kernel[...]).copy()
  kernel[:, :, dead] = 0.0
  attn.q_proj.kernel[...] = kernel
  x = np.random.default_rng(1).standard_normal((2, T0 + NEW, 16)).astype(np.float32)
  got, cache = _decode(attn, x, think(0.25, observation=OBS))
  assert (np.sort(np.asarray(cache.keep), -1) == [0, 2, 3, 4, 6, 7]).all()
  full, _ = _decode(attn, x, think(0.0, observation=OBS))
  assert_close(got, full, rtol=0, atol=layer_atol(attn, x, computations=2))
  pruned, whole = cache.key_bytes()
  assert pruned == whole * 6 // 8 and cache_bytes(cache) > pruned


def test_bad_settings_are_refused():
  for ratio in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"channel_ratio: expected a number in \[0, 1\)"):
      think(ratio)
  with pytest.raises(ValueError, match="eviction: expected a capacity above observation=32"):
    think(0.4, eviction=SnapKV(capacity=16))
  with pytest.raises(ValueError, match="kernel: expected an odd"):
    SnapKV(kernel=4)
