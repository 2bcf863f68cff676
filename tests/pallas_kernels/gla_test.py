"""pallas_kernels.gla.chunk_gla against an independent reference: a plain ``lax.scan`` of the
recurrence ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · q_tᵀ S_t`` (state zeroed
at every segment start; ``testing_utils.scan_gla``), with ``jax.vjp`` of that scan for the
gradients. Tolerances: testing_utils' error model for GLA, with the kernel's sub-chunks of 16
steps as its chunks (both its exponents and its chain), plus one rounding of each bf16 result.

The kernels run in interpret mode on CPU; the ``compiled`` cases run only on GPU/TPU backends.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from testing_utils import (
  assert_close,
  gla_atols,
  gla_chain,
  gla_exponent_terms,
  gla_gradient_magnitudes,
  gla_gradient_terms,
  rounding_atol,
  scan_gla,
)

from jaxrec.ops import gated_linear_attention, segment_starts
from pallas_kernels.gla import chunk_gla, kernel

B, T, H = 2, 64, 2
GRADS = ("dq", "dk", "dv", "dlog_decay", "dinitial_state")
SUB_CHUNK = 16  # the kernels' exact pairwise-decay blocks


def _inputs(key_dim, value_dim, dtype=jnp.float32, decay=(0.01, 1.0), seed=0):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (B, T, H, key_dim)).astype(dtype)
  k = (jax.random.normal(keys[1], (B, T, H, key_dim)) * key_dim**-0.5).astype(dtype)
  v = jax.random.normal(keys[2], (B, T, H, value_dim)).astype(dtype)
  log_decay = -jax.random.uniform(keys[3], (B, T, H, key_dim), minval=decay[0], maxval=decay[1])
  h0 = jax.random.normal(keys[4], (B, H, key_dim, value_dim))
  do = jax.random.normal(keys[5], (B, T, H, value_dim)).astype(dtype)
  dstate = jax.random.normal(keys[6], (B, H, key_dim, value_dim))
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


def _atols(args, cotangents, segment_ids, outputs, grads):
  """``atol`` s of ``(o, state)`` and of the gradients for the kernel against ``scan_gla`` (two
  fp32 computations): per element for the outputs, per tensor for the gradients; a result
  rounded to bf16 adds one bf16 rounding of itself."""
  q, k, v, g, h0 = (np.asarray(x, np.float32) for x in args)  # bf16 values, exactly
  t, key_dim = q.shape[1], q.shape[-1]
  terms = gla_chain("chunk", t, key_dim, SUB_CHUNK) + gla_chain("sequential", t, key_dim)
  exponent_terms = gla_exponent_terms("chunk", g, SUB_CHUNK)
  o_atol, state_atol = gla_atols(
    q, k, v, g, h0, segment_ids, terms=terms, exponent_terms=exponent_terms
  )
  grad_terms = gla_gradient_terms("chunk", g, key_dim, SUB_CHUNK)
  magnitudes = gla_gradient_magnitudes(q, k, v, g, h0, segment_ids, *cotangents)
  grad_atols = [rounding_atol(m, terms=grad_terms) for m in magnitudes]

  def rounded(atol, x, result):
    if result.dtype == jnp.float32:
      return atol
    return atol + rounding_atol(np.abs(np.asarray(x, np.float64)), terms=1, dtype=result.dtype)

  o_atol = rounded(o_atol, *outputs)
  grad_atols = [rounded(a, r, x) for a, r, x in zip(grad_atols, *grads, strict=True)]
  return o_atol, state_atol, grad_atols


def _check(args, cotangents, segment_ids, *, chunk, interpret=True):
  scale = args[0].shape[-1] ** -0.5
  starts = None if segment_ids is None else segment_starts(segment_ids)

  def kernel_fn(q, k, v, log_decay, h0):
    return chunk_gla(
      q,
      k,
      v,
      log_decay,
      initial_state=h0,
      segment_starts=starts,
      scale=scale,
      chunk_size=chunk,
      interpret=interpret,
    )

  def reference_fn(*a):
    return scan_gla(*a, segment_ids, scale)

  (o, state), grads = _vjp(kernel_fn, args, cotangents)
  # The reference sees the same (possibly bf16-rounded) inputs, in fp32.
  ref_args = tuple(x.astype(jnp.float32) for x in args)
  ref_cts = tuple(x.astype(jnp.float32) for x in cotangents)
  (o_ref, state_ref), grads_ref = _vjp(reference_fn, ref_args, ref_cts)
  assert o.dtype == args[0].dtype and state.dtype == jnp.float32
  o_atol, state_atol, grad_atols = _atols(
    args, ref_cts, segment_ids, (o_ref, o), (grads_ref, grads)
  )
  assert_close(o, o_ref, rtol=0, atol=o_atol, err_msg="o")
  assert_close(state, state_ref, rtol=0, atol=state_atol, err_msg="final_state")
  for name, grad, grad_ref, arg, atol in zip(
    GRADS, grads, grads_ref, args, grad_atols, strict=True
  ):
    assert grad.dtype == arg.dtype, name
    assert_close(grad, grad_ref, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize(
  "key_dim,value_dim,chunk,segmented",
  [
    (16, 32, 16, False),
    (32, 16, 32, True),  # two sub-chunks per chunk
  ],
)
def test_matches_reference(key_dim, value_dim, chunk, segmented):
  args, cotangents = _inputs(key_dim, value_dim)
  _check(args, cotangents, _segments() if segmented else None, chunk=chunk)


def test_tpu_tiling_matches_reference(monkeypatch):
  """The TPU grid, in the interpreter that models TPU memory (uninitialized buffers read as NaN):
  one chunk per sequential grid step, the state carried in the resident output block (reversed
  in the backward pass), two value blocks. Small shapes: this interpreter is slow."""
  monkeypatch.setattr(kernel, "_chunks_per_block", lambda num_chunks, interpret: 1)
  monkeypatch.setattr(kernel, "_block_v", lambda value_dim, interpret: 16)
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
  _check(args, cotangents, None, chunk=16)


def test_strong_decays_finite_and_accurate():
  """log-decay around -20 a step: decays underflow to 0 and nothing becomes inf or NaN; the
  log-decay gradient (~e^{-20}) keeps its accuracy."""
  args, cotangents = _inputs(16, 16, decay=(19.0, 21.0))
  _check(args, cotangents, _segments(), chunk=32)


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled kernels need a GPU or TPU")
@pytest.mark.parametrize(
  "key_dim,value_dim,chunk,segmented,dtype",
  [
    (32, 32, 32, True, jnp.float32),
    (64, 64, 64, True, jnp.float32),  # several value blocks on GPU
    (128, 128, 16, False, jnp.float32),
    (64, 128, 64, False, jnp.bfloat16),
  ],
)
def test_compiled_matches_reference(key_dim, value_dim, chunk, segmented, dtype):
  args, cotangents = _inputs(key_dim, value_dim, dtype=dtype)
  _check(args, cotangents, _segments() if segmented else None, chunk=chunk, interpret=False)


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
  args = (q, k, v, log_decay, h0)
  o_atol, state_atol, grad_atols = _atols(
    args, (do, dstate), segment_ids, (o_ref, o), (grads_ref, grads)
  )
  assert_close(o, o_ref, rtol=0, atol=o_atol, err_msg="o")
  assert_close(state, state_ref, rtol=0, atol=state_atol, err_msg="final_state")
  for name, grad, grad_ref, atol in zip(GRADS, grads, grads_ref, grad_atols, strict=True):
    assert_close(grad, grad_ref, rtol=0, atol=atol, err_msg=name)


def test_initial_state_none_is_zeros():
  (q, k, v, log_decay, _), _ = _inputs(16, 16)
  zeros = jnp.zeros((B, H, 16, 16))
  kwargs = dict(scale=0.25, chunk_size=16, interpret=True)
  o, state = chunk_gla(q, k, v, log_decay, **kwargs)
  o_ref, state_ref = scan_gla(q, k, v, log_decay, zeros, None, 0.25)
  o_atol, state_atol = gla_atols(
    *(np.asarray(x) for x in (q, k, v, log_decay)),
    terms=gla_chain("chunk", T, 16, SUB_CHUNK) + gla_chain("sequential", T, 16),
    exponent_terms=gla_exponent_terms("chunk", np.asarray(log_decay), SUB_CHUNK),
  )
  assert_close(o, o_ref, rtol=0, atol=o_atol, err_msg="o")
  assert_close(state, state_ref, rtol=0, atol=state_atol, err_msg="final_state")


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(chunk_size=24), "multiple of chunk_size"),
    (dict(k=jnp.zeros((B, T, H, 8))), "k: expected shape"),
    (dict(v=jnp.zeros((B, T, 1, 16))), "v: expected shape"),
    (dict(initial_state=jnp.zeros((B, H, 16, 8))), "initial_state: expected shape"),
    (dict(segment_starts=jnp.zeros((B, T), jnp.int32)), "segment_starts: expected a bool"),
    (dict(segment_starts=jnp.zeros((B, T - 1), bool)), "segment_starts: expected shape"),
    (dict(q=jnp.zeros((B, T, H, 16), jnp.int32)), "q: expected a floating dtype"),
  ],
)
def test_validation_errors(change, match):
  x = jnp.zeros((B, T, H, 16))
  call = dict(
    q=x, k=x, v=x, log_decay=x, initial_state=None, segment_starts=None, scale=1.0, chunk_size=16
  )
  call.update(change)
  with pytest.raises(ValueError, match=match):
    chunk_gla(**call, interpret=True)
