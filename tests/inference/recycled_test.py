"""Recycled Attention against a numpy simulation of its schedule (full steps over every key,
recycle steps masked to C_r and the tokens since, C_r = top-k of the pooled attention), static
and dynamic; stride 1 and k >= T are plain attention."""

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

from jaxrec.inference.longctx import recycled

T0, NEW = 10, 8


def _decode(attn, x, policy):
  """Prefill ``x[:, :T0]``, then decode the rest one token at a time."""
  return run_chunks(attn, x, policy, (T0,) + (1,) * (x.shape[1] - T0))[0]


def simulate(attn, x, policy):
  """Outputs of the schedule written step by step, and the number of full decoding steps."""
  q, k, v = projections(attn, x)
  bsz, t = x.shape[:2]
  heads, rep = attn.num_heads, attn.num_heads // attn.num_kv_heads
  pos = np.arange(t)
  qr = np.stack([rope(q[b], pos) for b in range(bsz)])
  kr = np.stack([rope(k[b], pos) for b in range(bsz)])
  s = np.einsum("bthk,bshk->bhts", qr, kr) / np.sqrt(q.shape[-1])
  causal = np.tril(np.ones((t, t), bool))
  out = np.zeros(q.shape)

  def full_row(i):
    """Attention of query i over every key, and C_r from its pooled probabilities."""
    for b in range(bsz):
      out[b, i] = attend(s[b, :, i : i + 1], causal[None, i : i + 1], v[b])[0]
    p = np.where(causal[i], s[:, :, i], -np.inf)
    p = np.exp(p - p.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p.reshape(bsz, attn.num_kv_heads, rep, t).max(2)
    half = policy.pool // 2
    padded = np.pad(p, ((0, 0), (0, 0), (half, half)), constant_values=-np.inf)
    pooled = np.stack([padded[..., j : j + policy.pool].max(-1) for j in range(t)], -1)
    pooled[..., i + 1 :] = -1.0
    return [
      [set(np.argsort(-pooled[b, g], kind="stable")[: policy.k]) for g in range(attn.num_kv_heads)]
      for b in range(bsz)
    ]

  for i in range(T0):
    full_row(i)
  c_r, last, steps, q_full, fulls = full_row(T0 - 1), T0 - 1, 0, q[:, T0 - 1], 0
  for i in range(T0, t):
    steps += 1
    full = steps >= policy.stride
    if policy.dynamic and steps % policy.check_every == 0:
      cos = (
        np.sum(q[:, i] * q_full, -1)
        / np.linalg.norm(q[:, i], axis=-1)
        / np.linalg.norm(q_full, axis=-1)
      )
      full |= bool(np.any(cos.mean(-1) <= policy.threshold))
    if full:
      c_r, last, steps, q_full, fulls = full_row(i), i, 0, q[:, i], fulls + 1
      continue
    for b in range(bsz):
      mask = np.zeros((heads, 1, t), bool)
      for h in range(heads):
        mask[h, 0, [j for j in c_r[b][h // rep] if j <= last]] = True
        mask[h, 0, last + 1 : i + 1] = True
      out[b, i] = attend(s[b, :, i : i + 1], mask, v[b])[0]
  return output(attn, out), fulls


@pytest.fixture(scope="module")
def setup():
  attn = attention_layer()
  x = np.random.default_rng(0).standard_normal((2, T0 + NEW, 16)).astype(np.float32)
  return attn, x


@pytest.mark.parametrize(
  "policy",
  [
    recycled(k=4, stride=3, pool=3),
    recycled(k=3, stride=5, dynamic=True, check_every=2, threshold=0.2),
  ],
)
def test_schedule_matches_a_step_by_step_simulation(setup, policy):
  attn, x = setup
  want, fulls = simulate(attn, x, policy)
  assert 0 < fulls < NEW - 1  # both kinds of steps occur
  got = _decode(attn, x, policy)
  assert_close(got, want, rtol=0, atol=layer_atol(attn, x))


def test_degenerate_settings_equal_attention(setup):
  attn, x = setup
  want = _decode(attn, x, None)
  for policy in (
    recycled(k=2, stride=1),
    recycled(k=T0 + NEW, stride=4),
  ):
    assert_close(_decode(attn, x, policy), want, rtol=0, atol=layer_atol(attn, x, computations=2))


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="stride: expected an int >= 1"):
    recycled(k=4, stride=0)
  with pytest.raises(ValueError, match="pool: expected an odd"):
    recycled(pool=2)
