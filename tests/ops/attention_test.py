"""Softmax attention op against a naive numpy reference: masks, GQA, cache-style positions.

Tolerances (testing_utils' error model): an output is ``Σ_s p_s v_s`` over ``S`` visible keys,
so ``S`` roundings and a few (the exponential, the normalizer, the division) against its magnitude
``Σ p |v|``; and each weight carries the relative error of the logits it came from, twice the
error of a length-``d`` dot product: ``2(d + 2)·max_s |q|·|k_s| / √d`` more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, rounding_atol

from jaxrec.ops import attention


def _reference(q, k, v, *, q_pos, kv_pos, window=None, q_seg=None, kv_seg=None, atol=False):
  """Per batch row, query and head: an explicit loop over the visible keys. With ``atol`` also
  returns the per-element tolerance of the module docstring and, per row, the largest
  ``|q|·|k_s| / √d`` and the magnitude ``Σ p |v|``: ``(out, atol, (scale, magnitude))``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  terms, scales, magnitude = np.zeros(q.shape[:3]), np.zeros(q.shape[:3]), np.zeros_like(q)
  for bi in range(b):
    for ti in range(t):
      for hi in range(h):
        visible = [
          s
          for s in range(k.shape[1])
          if kv_pos[bi, s] <= q_pos[bi, ti]
          and (window is None or q_pos[bi, ti] - kv_pos[bi, s] < window)
          and (q_seg is None or q_seg[bi, ti] == kv_seg[bi, s])
        ]
        logits = np.array([q[bi, ti, hi] @ k[bi, s, hi // group] for s in visible]) / np.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, ti, hi] = sum(pi * v[bi, s, hi // group] for pi, s in zip(p, visible))
        magnitude[bi, ti, hi] = sum(pi * np.abs(v[bi, s, hi // group]) for pi, s in zip(p, visible))
        scale = max(np.abs(q[bi, ti, hi]) @ np.abs(k[bi, s, hi // group]) for s in visible)
        scales[bi, ti, hi] = scale / np.sqrt(d)
        terms[bi, ti, hi] = len(visible) + 3 + 2 * (d + 2) * scales[bi, ti, hi]
  if atol:
    atols = rounding_atol(magnitude, terms=terms[..., None])
    return out, atols, (scales[..., None], magnitude)
  return out


def _qkv(b, t, s, h, kv, d, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, d), np.float32)
  k = rng.standard_normal((b, s, kv, d), np.float32)
  v = rng.standard_normal((b, s, kv, d), np.float32)
  return q, k, v


# One compilation per call signature instead of one per primitive in eager mode.
_attention = jax.jit(
  attention.dot_product_attention, static_argnames=("window", "causal", "method")
)


@pytest.mark.parametrize(
  "heads,kv_heads,window,packed",
  [(2, 2, None, False), (4, 2, None, False), (2, 2, 3, False), (4, 1, 4, True), (2, 2, None, True)],
)
def test_self_attention_matches_reference(heads, kv_heads, window, packed):
  b, t, d = 2, 9, 8
  q, k, v = _qkv(b, t, t, heads, kv_heads, d)
  seg = None
  if packed:
    seg = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1], [3, 3, 5, 5, 5, 5, 5, 7, 7]])
  pos = np.broadcast_to(np.arange(t), (b, t))
  got = _attention(q, k, v, window=window, segment_ids=seg)
  want, atol, _ = _reference(
    q, k, v, q_pos=pos, kv_pos=pos, window=window, q_seg=seg, kv_seg=seg, atol=True
  )
  assert_close(got, want, rtol=0, atol=atol)


def test_queries_against_a_longer_cache():
  """Decoding form: 2 new queries at positions 4, 5 over 8 cache slots, 6 of them written."""
  b, t, s, h, d = 1, 2, 8, 2, 4
  q, k, v = _qkv(b, t, s, h, h, d, seed=1)
  q_pos = np.array([[4, 5]])
  kv_pos = np.arange(s)[None]
  got = _attention(q, k, v, q_positions=q_pos, window=3)
  want, atol, _ = _reference(q, k, v, q_pos=q_pos, kv_pos=kv_pos, window=3, atol=True)
  assert_close(got, want, rtol=0, atol=atol)


def _gradient_atols(q, k, v, w, visible):
  """Per-element ``atol`` s of ``(dq, dk, dv)`` for the gradient of ``Σ w·y`` computed twice in
  fp32: the backward pass's own terms taken absolute (``dv_s = Σ_t p_ts w_t``, ``dp_ts = w_t·v_s``,
  ``dl_ts = p_ts (dp_ts - Σ_r p_tr dp_tr)``, ``dq_t = Σ_s dl_ts k_s / √d``, ``dk_s = Σ_t dl_ts
  q_t / √d``), each computation a forward and a backward chain, and the weights' relative error
  from the logits (``visible [T, S]``; GQA: the key/value heads' gradients sum their group's)."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  d, group = q.shape[-1], q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.where(visible, np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d), -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bthd,bshd->bhts", np.abs(w), np.abs(v))
  dl = p * (dp + np.sum(p * dp, -1, keepdims=True))
  dq = np.einsum("bhts,bshd->bthd", dl, np.abs(k)) / np.sqrt(d)
  dk = np.einsum("bhts,bthd->bshd", dl, np.abs(q)) / np.sqrt(d)
  dv = np.einsum("bhts,bthd->bshd", p, np.abs(w))
  dk, dv = (x.reshape(*x.shape[:2], -1, group, d).sum(3) for x in (dk, dv))
  scale = np.max(np.where(visible, np.einsum("bthd,bshd->bhts", *map(np.abs, (q, k))), 0.0))
  count = visible.sum(-1).max()
  forward = count + 3 + 2 * (d + 2) * scale / np.sqrt(d)
  terms = 2 * (forward + 2 * d + 2 * count + 2)
  return [rounding_atol(m, terms=terms) for m in (dq, dk, dv)]


def test_gradients_match_a_jax_reference():
  q, k, v = _qkv(1, 6, 6, 4, 2, 4, seed=2)
  seg = np.array([[0, 0, 0, 1, 1, 1]])

  pos = np.arange(6)
  mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 2)
  mask &= seg[0][:, None] == seg[0][None, :]

  def reference(q, k, v):
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / 2.0
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)

  def op(q, k, v):
    return attention.dot_product_attention(q, k, v, window=2, segment_ids=seg)

  w = np.random.default_rng(3).standard_normal(q.shape, np.float32)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r, atol in zip("qkv", got, want, _gradient_atols(q, k, v, w, mask), strict=True):
    assert_close(g, r, rtol=0, atol=atol, err_msg=f"d{name}")


def test_bf16_inputs_give_bf16_outputs_close_to_fp32():
  q, k, v = _qkv(1, 5, 5, 2, 2, 8, seed=4)
  got = _attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  pos = np.broadcast_to(np.arange(5), (1, 5))
  want, atol, (scale, magnitude) = _reference(q, k, v, q_pos=pos, kv_pos=pos, atol=True)
  assert got.dtype == jnp.bfloat16
  # bf16 roundings of q (and of it scaled), k and v on entry, of the weights and of the output;
  # a logit's three move its weight by up to 2·3·u·|q|·|k| / √d.
  bf16 = rounding_atol(magnitude * (2 + 6 * scale) + np.abs(want), terms=1, dtype=jnp.bfloat16)
  assert_close(got.astype(jnp.float32), want, rtol=0, atol=atol + bf16)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(window=0), "window"),
    (dict(window=2, causal=False), "window"),
    (dict(method="flash"), "method"),
    (dict(segment_ids=np.zeros((1, 4), np.float32)), "segment_ids"),
  ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
  q, k, v = _qkv(1, 4, 4, 2, 2, 4)
  with pytest.raises(ValueError, match=match):
    attention.dot_product_attention(q, k, v, **kwargs)


def test_heads_must_be_a_multiple_of_kv_heads():
  q, k, v = _qkv(1, 4, 4, 3, 2, 4)
  with pytest.raises(ValueError, match="k: expected a number of heads"):
    attention.dot_product_attention(q, k, v)


def _merged(q, sets):
  """``merged_grouped_attention`` over seq-major ``(k, v [B, S, G, K], q_pos [B, T], kv_pos [B,
  S], window)`` sets, stored head-major as a cache stores them."""
  key_sets = []
  for k, v, q_pos, kv_pos, window in sets:
    mask = attention.attention_mask(jnp.asarray(q_pos), jnp.asarray(kv_pos), window=window)
    key_sets.append((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask))
  return attention.merged_grouped_attention(jnp.asarray(q), key_sets)


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_merged_sets_match_one_softmax_over_their_union(monkeypatch, blocks):
  """A decoding step's two key sets: a cache of 24 slots with 19 written (the others at a
  position past every query) and the 3 new tokens, read as ``blocks`` blocks per set."""
  monkeypatch.setattr(attention, "KEY_BLOCK", 24 // blocks)
  b, t, s, h, kv, d = 2, 3, 24, 4, 2, 8
  q, k_old, v_old = _qkv(b, t, s, h, kv, d, seed=5)
  _, k_new, v_new = _qkv(b, t, t, h, kv, d, seed=6)
  written = 19
  q_pos = np.broadcast_to(written + np.arange(t), (b, t))
  old_pos = np.broadcast_to(np.where(np.arange(s) < written, np.arange(s), 2**31 - 1), (b, s))
  window = 7
  assert attention.key_blocks(s) == blocks
  got = jax.jit(_merged, static_argnums=())(
    q, [(k_old, v_old, q_pos, old_pos, window), (k_new, v_new, q_pos, q_pos, window)]
  )
  want, atol, _ = _reference(
    q,
    np.concatenate([k_old, k_new], 1),
    np.concatenate([v_old, v_new], 1),
    q_pos=q_pos,
    kv_pos=np.concatenate([old_pos, q_pos], 1),
    window=window,
    atol=True,
  )
  assert_close(got, want, rtol=0, atol=atol)


def test_merged_sets_gradients_match_a_jax_reference(monkeypatch):
  monkeypatch.setattr(attention, "KEY_BLOCK", 4)  # the 8-key set as 2 blocks
  q, k, v = _qkv(1, 2, 10, 4, 2, 4, seed=7)
  q_pos = np.array([[8, 9]])
  kv_pos = np.arange(10)[None]
  mask = (q_pos[0][:, None] >= kv_pos[0][None, :]) & (q_pos[0][:, None] - kv_pos[0][None, :] < 6)

  def op(q, k, v):
    sets = [(k[:, :8], v[:, :8], q_pos, kv_pos[:, :8], 6), (k[:, 8:], v[:, 8:], q_pos, q_pos, 6)]
    return _merged(q, sets)

  def reference(q, k, v):
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / 2.0
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, v)

  w = np.random.default_rng(8).standard_normal(q.shape, np.float32)
  got = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2)))(q, k, v)
  for name, g, r, atol in zip("qkv", got, want, _gradient_atols(q, k, v, w, mask), strict=True):
    assert_close(g, r, rtol=0, atol=atol, err_msg=f"d{name}")


def test_merged_sets_need_matching_shapes():
  q, k, v = (jnp.asarray(x) for x in _qkv(1, 2, 5, 4, 2, 4))
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  with pytest.raises(ValueError, match="key_sets: expected at least one"):
    attention.merged_grouped_attention(q, [])
  with pytest.raises(ValueError, match=r"mask: expected \[B, 1, T, S\]"):
    attention.merged_grouped_attention(q, [(k, v, jnp.ones((1, 1, 2, 4), bool))])
  with pytest.raises(ValueError, match="k, v: expected head-major"):
    attention.merged_grouped_attention(q, [(k, v[..., :2], jnp.ones((1, 1, 2, 5), bool))])


def test_written_after_changes_only_rows_whose_outputs_are_nan():
  update = jnp.arange(24, dtype=jnp.float32).reshape(3, 2, 4) - 7.5
  reads = jnp.ones((3, 5)).at[1, 3].set(jnp.nan)
  got = np.asarray(attention.written_after(update, reads))
  np.testing.assert_array_equal(got[[0, 2]], np.asarray(update)[[0, 2]])
  assert np.isnan(got[1]).all()
  ids = attention.written_after(jnp.full((3, 2), 5, jnp.int32), reads)
  np.testing.assert_array_equal(ids, [[5, 5], [-1, -1], [5, 5]])
