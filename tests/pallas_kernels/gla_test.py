"""pallas_kernels.gla.chunk_gla against an independent reference: a plain ``lax.scan`` of the
recurrence ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · q_tᵀ S_t`` (state zeroed
at every segment start), with ``jax.vjp`` of that scan for the gradients.

The kernels run in interpret mode on CPU; the ``compiled`` cases run only on GPU/TPU backends.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxrec.ops.gla import gated_linear_attention
from pallas_kernels.gla import chunk_gla, kernel

B, T, H = 2, 64, 2
GRADS = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")


def _reference(q, k, v, log_decay, h0, segment_ids, scale):
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  reset = jnp.zeros(q.shape[:2], bool)
  if segment_ids is not None:
    reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))

  def step(state, x):
    qt, kt, vt, gt, rt = x
    state = jnp.where(rt[:, None, None, None], 0.0, jnp.exp(gt)[..., None] * state)
    state = state + kt[..., None] * vt[..., None, :]
    return state, scale * jnp.einsum("bhk,bhkv->bhv", qt, state, precision="highest")

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, reset))
  state, o = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(o, 0, 1), state


def _inputs(k_dim, v_dim, dtype=jnp.float32, decay=(0.01, 1.0), seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (B, T, H, k_dim)).astype(dtype)
  k = (jax.random.normal(keys[1], (B, T, H, k_dim)) * k_dim**-0.5).astype(dtype)
  v = jax.random.normal(keys[2], (B, T, H, v_dim)).astype(dtype)
  log_decay = -jax.random.uniform(keys[3], (B, T, H, k_dim), minval=decay[0], maxval=decay[1])
  h0 = jax.random.normal(keys[4], (B, H, k_dim, v_dim))
  do = jax.random.normal(keys[5], (B, T, H, v_dim)).astype(dtype)
  dstate = jax.random.normal(keys[6], (B, H, k_dim, v_dim))
  return (q, k, v, log_decay, h0), (do, dstate)


def _segments():
  """Row 0: boundaries inside a sub-chunk, on a chunk boundary (16, 32) and a one-step segment
  (16); row 1: ids that repeat non-adjacently (0, 1, 0, 1, ...), which are still new segments."""
  row0 = np.searchsorted([5, 16, 17, 32, 45], np.arange(T), side="right")
  row1 = np.searchsorted([3, 20, 21, 38, 50, 63], np.arange(T), side="right") % 2
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


def _vjp(fn, args, cotangents):
  @jax.jit
  def run(args, cotangents):
    out, pull = jax.vjp(fn, *args)
    return out, pull(cotangents)

  return run(args, cotangents)


def _assert_close(actual, expected, tol, name):
  """Elementwise, with an absolute floor of ``tol`` times the largest expected magnitude."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  atol = tol * np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=atol, err_msg=name)


def _check(args, cotangents, segment_ids, *, chunk, interpret=True, fwd_tol=1e-5, grad_tol=1e-4):
  scale = args[0].shape[-1] ** -0.5

  def kernel_fn(*a):
    return chunk_gla(*a, segment_ids, scale=scale, chunk_size=chunk, interpret=interpret)

  def reference_fn(*a):
    return _reference(*a, segment_ids, scale)

  (o, state), grads = _vjp(kernel_fn, args, cotangents)
  # The reference sees the same (possibly bf16-rounded) inputs, in fp32.
  ref_args = tuple(x.astype(jnp.float32) for x in args)
  ref_cts = tuple(x.astype(jnp.float32) for x in cotangents)
  (o_ref, state_ref), grads_ref = _vjp(reference_fn, ref_args, ref_cts)
  assert o.dtype == args[0].dtype and state.dtype == jnp.float32
  _assert_close(o, o_ref, fwd_tol, "o")
  _assert_close(state, state_ref, fwd_tol, "final_state")
  for name, grad, grad_ref, arg in zip(GRADS, grads, grads_ref, args, strict=True):
    assert grad.dtype == arg.dtype, name
    _assert_close(grad, grad_ref, grad_tol, name)


@pytest.mark.parametrize(
  "k_dim,v_dim,chunk,segmented",
  [
    (16, 32, 16, False),
    (32, 16, 32, True),  # two sub-chunks per chunk
  ],
)
def test_matches_reference(k_dim, v_dim, chunk, segmented):
  args, cotangents = _inputs(k_dim, v_dim)
  _check(args, cotangents, _segments() if segmented else None, chunk=chunk)


def test_tpu_tiling_matches_reference(monkeypatch):
  """The TPU grid, in the interpreter that models TPU memory (uninitialized buffers read as NaN):
  one chunk per sequential grid step, the state carried in the resident output block (reversed
  in the backward pass), two value blocks. Small shapes: this interpreter is slow."""
  monkeypatch.setattr(kernel, "_chunks_per_block", lambda num_chunks, interpret: 1)
  monkeypatch.setattr(kernel, "_block_v", lambda v_dim, interpret: 16)
  (q, k, v, log_decay, h0), (do, dstate) = _inputs(16, 32)
  q, k, v, log_decay, do = (x[:1, :32, :1] for x in (q, k, v, log_decay, do))
  args, cotangents = (q, k, v, log_decay, h0[:1, :1]), (do, dstate[:1, :1])
  _check(
    args,
    cotangents,
    _segments()[:1, :32],
    chunk=16,
    interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
  )


def test_bf16_inputs():
  args, cotangents = _inputs(16, 32, dtype=jnp.bfloat16)
  _check(args, cotangents, None, chunk=16, fwd_tol=1e-2, grad_tol=1e-2)


def test_strong_decays_finite_and_accurate():
  """log-decay around -20 a step: decays underflow to 0 and nothing becomes inf or NaN; the
  log-decay gradient (~e^{-20}) keeps its accuracy."""
  args, cotangents = _inputs(16, 16, decay=(19.0, 21.0))
  _check(args, cotangents, _segments(), chunk=32)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled kernels need a GPU or TPU")
@pytest.mark.parametrize(
  "k_dim,v_dim,chunk,segmented,dtype",
  [
    (32, 32, 32, True, jnp.float32),
    (64, 64, 64, True, jnp.float32),  # several value blocks on GPU
    (128, 128, 16, False, jnp.float32),
    (64, 128, 64, False, jnp.bfloat16),
  ],
)
def test_compiled_matches_reference(k_dim, v_dim, chunk, segmented, dtype):
  args, cotangents = _inputs(k_dim, v_dim, dtype=dtype)
  tols = dict(fwd_tol=1e-2, grad_tol=1e-2) if dtype == jnp.bfloat16 else {}
  _check(args, cotangents, _segments() if segmented else None, chunk=chunk, interpret=False, **tols)


def test_jaxrec_op_pallas_matches_sequential():
  (q, k, v, log_decay, h0), (do, dstate) = _inputs(16, 16)
  t = 50  # not a multiple of the chunk: the op pads to 64
  q, k, v, log_decay, do = (x[:, :t] for x in (q, k, v, log_decay, do))
  segment_ids = _segments()[:, :t]

  def run(method):
    def fn(*a):
      return gated_linear_attention(
        *a[:4],
        initial_state=a[4],
        segment_ids=segment_ids,
        output_final_state=True,
        chunk_size=64,  # four sub-chunks per chunk
        method=method,
      )

    return _vjp(fn, (q, k, v, log_decay, h0), (do, dstate))

  (o, state), grads = run("pallas")
  (o_ref, state_ref), grads_ref = run("sequential")
  _assert_close(o, o_ref, 1e-5, "o")
  _assert_close(state, state_ref, 1e-5, "final_state")
  for name, grad, grad_ref in zip(GRADS, grads, grads_ref, strict=True):
    _assert_close(grad, grad_ref, 1e-4, name)


def test_initial_state_none_is_zeros():
  (q, k, v, log_decay, _), _ = _inputs(16, 16)
  zeros = jnp.zeros((B, H, 16, 16))
  kwargs = dict(scale=0.25, chunk_size=16, interpret=True)
  o, state = chunk_gla(q, k, v, log_decay, None, None, **kwargs)
  o_ref, state_ref = _reference(q, k, v, log_decay, zeros, None, 0.25)
  _assert_close(o, o_ref, 1e-5, "o")
  _assert_close(state, state_ref, 1e-5, "final_state")


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(chunk_size=24), "multiple of chunk_size"),
    (dict(k=jnp.zeros((B, T, H, 8))), "k: expected shape"),
    (dict(v=jnp.zeros((B, T, 1, 16))), "v: expected shape"),
    (dict(initial_state=jnp.zeros((B, H, 16, 8))), "initial_state: expected shape"),
    (dict(segment_ids=jnp.zeros((B, T), jnp.float32)), "segment_ids: expected an integer"),
    (dict(segment_ids=jnp.zeros((B, T - 1), jnp.int32)), "segment_ids: expected shape"),
    (dict(q=jnp.zeros((B, T, H, 16), jnp.int32)), "q: expected a floating dtype"),
  ],
)
def test_validation_errors(change, match):
  x = jnp.zeros((B, T, H, 16))
  call = dict(
    q=x, k=x, v=x, log_decay=x, initial_state=None, segment_ids=None, scale=1.0, chunk_size=16
  )
  call.update(change)
  with pytest.raises(ValueError, match=match):
    chunk_gla(**call, interpret=True)
