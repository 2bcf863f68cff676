"""RAT against a dense reference written here (the paper's equations token by token, one document
at a time, so a packed row is by construction its documents run alone), over random document
boundaries; the two limits (L = 1 attention, L = T gated RNN); gradients; and the decoding state
handed across calls.

Tolerances. The op runs in fp32 (unit roundoff u = 2^-24 ≈ 6e-8), the reference in float64. An
output is a convex combination of states of size ≤ max|v|, each built from ≤ L gated steps (plus
the log2 T levels of the associative scan), weighted by a softmax of K-term logits of size ≲ 10:
about (L + log2 T + 10 K) u ≈ 60 u ≈ 4e-6 relative to max|o|; 1e-5 leaves a small margin.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, max_abs, numpy_linear_scan

from jaxrec import ops

B, T, H, K = 3, 21, 2, 4
L = 4
THETA = 100.0
TOL = 1e-5  # see the module docstring
# Rows of document lengths: cuts off the chunk grid, documents shorter than L, of one token, of
# exactly L, and one unpacked row (T is not a multiple of L).
FIXED_LENGTHS = ([5, 1, 1, 7, 3, 4], [1, 2, 9, 1, 4, 4], [T])
# One compiled program per configuration rather than op-by-op dispatch; segment ids are traced,
# so every boundary pattern below reuses it.
_rat = jax.jit(
  ops.rat, static_argnames=("chunk_size", "rope_theta", "output_final_state", "method")
)


def _inputs(seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, t, H, K)).astype(np.float32) for _ in range(3))
  gate = (1 / (1 + np.exp(-rng.standard_normal((b, t, H, K))))).astype(np.float32)
  return q, k, v, gate


def _segments(lengths_per_row):
  """``[B, T]`` ids from document lengths per row; ids alternate 0, 1, 0, ... so documents are
  told apart by where the id changes, not by its value."""
  rows = [np.repeat(np.arange(len(n)) % 2, n) for n in lengths_per_row]
  assert all(len(r) == T for r in rows)
  return np.stack(rows).astype(np.int32)


def _random_segments(seed):
  """Random cuts anywhere: document lengths drawn from 1 to 2L + 1."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(B):
    lengths = []
    while sum(lengths) < T:
      lengths.append(int(rng.integers(1, 2 * L + 2)))
    lengths[-1] -= sum(lengths) - T
    rows.append(lengths)
  return _segments(rows)


SEGMENT_CASES = [_segments(FIXED_LENGTHS), *(_random_segments(s) for s in range(3))]


def _rope(x, pos, theta):
  """RoPE as a complex rotation of the channel pairs (i, i + K/2) by ``pos``."""
  if theta is None:
    return x
  half = x.shape[-1] // 2
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos * theta ** (-np.arange(half) / half))
  return np.concatenate([z.real, z.imag], -1)


def _documents(ids):
  """``(start, end)`` of each run of equal ids in a row."""
  cuts = [0, *(t for t in range(1, len(ids)) if ids[t] != ids[t - 1]), len(ids)]
  return list(itertools.pairwise(cuts))


def _reference_document(q, k, v, gate, chunk, theta):
  """One document ``[n, H, K]`` alone, in float64: chunk ``p // L`` for its token ``p``, the
  recurrence restarting at ``p % L == 0``, one softmax over the final (k̃, ṽ) of every earlier
  chunk (rotated by its chunk index) and the running state."""
  out = np.zeros_like(v)
  run_k = run_v = np.zeros((H, K))
  finals = []  # (k̃, ṽ) of chunks 0, 1, ..., appended at each chunk's last token
  for p in range(len(q)):
    c, offset = divmod(p, chunk)
    if offset == 0:
      run_k = run_v = np.zeros((H, K))
    g = gate[p]
    run_k = g * run_k + (1 - g) * k[p]
    run_v = g * run_v + (1 - g) * v[p]
    qr = _rope(q[p], c, theta)
    logits = [np.sum(qr * _rope(fk, j, theta), -1) for j, (fk, _) in enumerate(finals)]
    logits = np.stack([*logits, np.sum(q[p] * run_k, -1)], -1) / np.sqrt(K)  # [H, c + 1]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[p] = sum(w[:, i, None] * x for i, x in enumerate([*(fv for _, fv in finals), run_v]))
    if offset == chunk - 1:
      finals.append((run_k, run_v))
  return out


def _reference(q, k, v, gate, chunk, theta=THETA, segment_ids=None):
  """Each document of each row run alone by ``_reference_document``."""
  q, k, v, gate = (np.asarray(a, np.float64) for a in (q, k, v, gate))
  b, t_len = q.shape[:2]
  seg = np.zeros((b, t_len), int) if segment_ids is None else np.asarray(segment_ids)
  out = np.zeros_like(v)
  for row in range(b):
    for s, e in _documents(seg[row]):
      x = (a[row, s:e] for a in (q, k, v, gate))
      out[row, s:e] = _reference_document(*x, chunk, theta)
  return out


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_rat_equals_the_dense_reference_on_random_documents(method):
  for i, segment_ids in enumerate([None, *SEGMENT_CASES]):
    x = _inputs(i)
    got, _ = _rat(*x, chunk_size=L, rope_theta=THETA, segment_ids=segment_ids, method=method)
    want = _reference(*x, L, segment_ids=segment_ids)
    assert_close(got, want, rtol=TOL, atol=TOL * max_abs(want), err_msg=f"case {i}")


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_packed_rows_equal_their_documents_run_alone(method):
  # Each document alone starts a row of its own (the tokens after it are filler: RAT is causal).
  segment_ids = _random_segments(10)
  docs = [(row, s, e) for row in range(B) for s, e in _documents(segment_ids[row])]
  x = _inputs(5)
  filler = _inputs(6, b=len(docs))
  alone_x = [f.copy() for f in filler]
  for i, (row, s, e) in enumerate(docs):
    for a, xa in zip(alone_x, x, strict=True):
      a[i, : e - s] = xa[row, s:e]
  packed, _ = _rat(*x, chunk_size=L, rope_theta=THETA, segment_ids=segment_ids, method=method)
  alone, _ = _rat(*alone_x, chunk_size=L, rope_theta=THETA, method=method)
  unpacked, _ = _rat(*x, chunk_size=L, rope_theta=THETA, method=method)
  scale = max_abs(packed)
  for i, (row, s, e) in enumerate(docs):
    # Both sides are the same fp32 op; they differ only in the order of roundings (the scan's
    # tree, masked sums), far below the reference tolerance.
    assert_close(packed[row, s:e], alone[i, : e - s], rtol=TOL, atol=TOL * scale)
  # The documents must interact without packing, or the check above proves nothing.
  assert np.abs(np.asarray(packed) - np.asarray(unpacked)).max() > 1e-2


def test_state_handed_across_calls_equals_one_pass():
  # Packed documents with cuts off the chunk grid; the calls split the row where no row starts a
  # document, since a call's first token continues the state's document.
  segment_ids = _random_segments(11)
  cont = np.all(segment_ids[:, 1:] == segment_ids[:, :-1], axis=0).nonzero()[0] + 1
  cuts = [0, int(cont[len(cont) // 3]), int(cont[2 * len(cont) // 3]), T]
  assert 0 < cuts[1] < cuts[2] < T, cuts
  x = _inputs(7)
  want = _reference(*x, L, segment_ids=segment_ids)
  state = ops.rat_init_state(B, T, H, K, L)
  outs = []
  for s, e in itertools.pairwise(cuts):
    o, state = ops.rat(
      *(a[:, s:e] for a in x),
      chunk_size=L,
      rope_theta=THETA,
      initial_state=state,
      output_final_state=True,
      segment_ids=segment_ids[:, s:e],
    )
    outs.append(o)
  got = np.concatenate(outs, 1)
  assert_close(got, want, rtol=TOL, atol=TOL * max_abs(want))
  assert int(state.index) == T
  assert state.chunk_k.shape == (B, -(-T // L), H, K)
  last_doc = [np.subtract(*_documents(row)[-1][::-1]) for row in segment_ids]
  np.testing.assert_array_equal(state.position, last_doc)


def test_parallel_gradients_equal_the_sequential_form():
  # Both forward forms match the dense reference above; the parallel form's gradients go through
  # linear_scan's custom VJP, the compaction gather and the masked chunk softmax, the sequential
  # one's through lax.scan. A cotangent sums ≤ T forward-sized contributions, each within the
  # forward's ~60 u: T · 60 u ≈ 8e-5, hence 1e-4 of the largest gradient.
  x = _inputs(1)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H, K)), jnp.float32)

  @jax.jit
  def grads(segment_ids):
    def loss(method, *x):
      o, _ = ops.rat(*x, chunk_size=L, rope_theta=THETA, segment_ids=segment_ids, method=method)
      return jnp.sum(w * o)

    by = lambda method: jax.grad(lambda *x: loss(method, *x), argnums=(0, 1, 2, 3))(*x)
    return by("parallel"), by("sequential")

  for i, segment_ids in enumerate(SEGMENT_CASES):
    got, want = grads(segment_ids)
    for name, g, r in zip(["q", "k", "v", "gate"], got, want, strict=True):
      assert_close(g, r, rtol=1e-4, atol=1e-4 * max_abs(r), err_msg=f"case {i}, d{name}")


def test_chunk_one_is_causal_attention_over_gated_keys_and_values():
  q, k, v, gate = _inputs(3)
  got, _ = _rat(q, k, v, gate, chunk_size=1, rope_theta=THETA)
  pos = np.arange(T)[:, None, None]
  kk, vv = (1 - gate) * k, (1 - gate) * v
  logits = np.einsum("bthk,bshk->bhts", _rope(q, pos, THETA), _rope(kk, pos, THETA)) / np.sqrt(K)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), vv)
  assert_close(got, want, rtol=TOL, atol=TOL * max_abs(want))


def test_chunk_of_the_whole_sequence_is_the_gated_rnn():
  q, k, v, gate = _inputs(4)
  got, _ = _rat(q, k, v, gate, chunk_size=T, rope_theta=THETA)
  want = numpy_linear_scan(gate, (1 - gate) * v, np.zeros((B, H, K)))
  assert_close(got, want, rtol=TOL, atol=TOL * max_abs(want))


def test_bad_arguments_name_the_argument():
  x = _inputs()
  with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
    ops.rat(*x, chunk_size=0)
  with pytest.raises(ValueError, match="method"):
    ops.rat(*x, chunk_size=2, method="fast")
  with pytest.raises(ValueError, match="gate"):
    ops.rat(*x[:3], x[3][:, :3], chunk_size=2)
  with pytest.raises(ValueError, match="method: initial_state"):
    ops.rat(*x, chunk_size=2, output_final_state=True, method="parallel")
