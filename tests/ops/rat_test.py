"""RAT against a dense reference written here (a token loop over the paper's equations), the two
limits (L = 1 attention, L = T gated RNN), gradients, and decoding state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, max_abs, numpy_linear_scan

from jaxrec import ops

B, T, H, K = 2, 11, 2, 4
L = 3
THETA = 100.0
SEGMENTS = np.array([[0] * 5 + [1] * 6, [0] * 11])  # a document starting mid-chunk in row 0
# One compiled program per configuration rather than op-by-op dispatch.
_rat = jax.jit(
  ops.rat, static_argnames=("chunk_size", "rope_theta", "output_final_state", "method")
)


def _inputs(seed=0, t=T):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, t, H, K)).astype(np.float32) for _ in range(3))
  gate = (1 / (1 + np.exp(-rng.standard_normal((B, t, H, K))))).astype(np.float32)
  return q, k, v, gate


def _rope(x, pos, theta):
  """RoPE as a complex rotation of the channel pairs (i, i + K/2) by ``pos``."""
  if theta is None:
    return x
  half = x.shape[-1] // 2
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos * theta ** (-np.arange(half) / half))
  return np.concatenate([z.real, z.imag], -1)


def _reference(q, k, v, gate, chunk, theta=THETA, segment_ids=None):
  """The equations token by token in float64: resets at chunk and document starts, the final
  (k̃, ṽ) of every completed chunk of the token's document, one softmax with the running state."""
  q, k, v, gate = (np.asarray(a, np.float64) for a in (q, k, v, gate))
  t_len = q.shape[1]
  seg = np.zeros((B, t_len), int) if segment_ids is None else np.asarray(segment_ids)
  out = np.zeros_like(v)
  for b in range(B):
    run_k = run_v = np.zeros((H, K))
    finals = []  # (chunk index, document id, k̃, ṽ)
    for t in range(t_len):
      c = t // chunk
      if t % chunk == 0 and t > 0:
        finals.append((c - 1, seg[b, t - 1], run_k, run_v))
      if t % chunk == 0 or (t > 0 and seg[b, t] != seg[b, t - 1]):
        run_k = run_v = np.zeros((H, K))
      g = gate[b, t]
      run_k = g * run_k + (1 - g) * k[b, t]
      run_v = g * run_v + (1 - g) * v[b, t]
      mine = [(cc, fk, fv) for cc, s, fk, fv in finals if s == seg[b, t]]
      qr = _rope(q[b, t], c, theta)
      logits = [np.sum(qr * _rope(fk, cc, theta), -1) for cc, fk, _ in mine]
      logits = np.stack([*logits, np.sum(q[b, t] * run_k, -1)], -1) / np.sqrt(K)  # [H, n + 1]
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, t] = sum(p[:, i, None] * x for i, x in enumerate([*(fv for *_, fv in mine), run_v]))
  return out


@pytest.mark.parametrize("method", ["parallel", "sequential"])
def test_rat_equals_the_dense_reference_with_packed_documents(method):
  x = _inputs()
  got, _ = _rat(*x, chunk_size=L, rope_theta=THETA, segment_ids=SEGMENTS, method=method)
  want = _reference(*x, L, segment_ids=SEGMENTS)
  assert_close(got, want, rtol=1e-5, atol=1e-5 * max_abs(want))


def test_parallel_gradients_equal_the_sequential_form():
  # Both forward forms match the dense reference above; the parallel form's gradients go through
  # linear_scan's custom VJP and the masked chunk softmax, the sequential one's through lax.scan.
  x = _inputs(1)
  w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H, K)), jnp.float32)

  def grads(method):
    def loss(*x):
      o, _ = ops.rat(*x, chunk_size=L, rope_theta=THETA, segment_ids=SEGMENTS, method=method)
      return jnp.sum(w * o)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*x)

  for g, r in zip(grads("parallel"), grads("sequential"), strict=True):
    assert_close(g, r, rtol=1e-4, atol=1e-4 * max_abs(r))


def test_chunk_one_is_causal_attention_over_gated_keys_and_values():
  q, k, v, gate = _inputs(3)
  got, _ = _rat(q, k, v, gate, chunk_size=1, rope_theta=THETA)
  pos = np.arange(T)[:, None, None]
  kk, vv = (1 - gate) * k, (1 - gate) * v
  logits = np.einsum("bthk,bshk->bhts", _rope(q, pos, THETA), _rope(kk, pos, THETA)) / np.sqrt(K)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhts,bshk->bthk", p / p.sum(-1, keepdims=True), vv)
  assert_close(got, want, rtol=1e-5, atol=1e-5 * max_abs(want))


def test_chunk_of_the_whole_sequence_is_the_gated_rnn():
  q, k, v, gate = _inputs(4)
  got, _ = _rat(q, k, v, gate, chunk_size=T, rope_theta=THETA)
  want = numpy_linear_scan(gate, (1 - gate) * v, np.zeros((B, H, K)))
  assert_close(got, want, rtol=1e-5, atol=1e-6)


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
