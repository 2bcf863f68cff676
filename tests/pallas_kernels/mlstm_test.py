"""pallas_kernels.mlstm.chunk_mlstm against an independent reference: a plain ``lax.scan`` of the
stabilized mLSTM (testing_utils.scan_mlstm, the forget gate shut at every segment start), with
``jax.vjp`` of that scan for the gradients (the stabilizer a constant, as in the kernels).
Tolerances: testing_utils' mLSTM error model, the kernel counted as the chunkwise form.

The kernels run in interpret mode on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import (
  assert_close,
  mlstm_atols,
  mlstm_chain,
  mlstm_exponent_terms,
  mlstm_gradient_magnitudes,
  rounding_atol,
  scan_mlstm,
)

from jaxrec.ops import segment_starts
from pallas_kernels.mlstm import chunk_mlstm

B, T, H, K, V = 2, 32, 2, 8, 16
NAMES = ("q", "k", "v", "i_gate", "f_gate", "c0", "n0", "m0")


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 11)
  q, k = (jax.random.normal(key, (B, T, H, K)) for key in keys[:2])
  v = jax.random.normal(keys[2], (B, T, H, V))
  i_gate = jax.random.uniform(keys[3], (B, T, H), minval=-4.0, maxval=4.0)
  f_gate = jax.random.uniform(keys[4], (B, T, H), minval=-2.0, maxval=5.0)
  state = (
    jax.random.normal(keys[5], (B, H, K, V)),
    jax.random.normal(keys[6], (B, H, K)),
    jax.random.normal(keys[7], (B, H)),
  )
  cotangents = (
    jax.random.normal(keys[8], (B, T, H, V)),
    jax.random.normal(keys[9], (B, H, K, V)),
    jax.random.normal(keys[10], (B, H, K)),
  )
  return (q, k, v, i_gate, f_gate, *state), cotangents


def _segments():
  """Row 0: boundaries inside a chunk and on a chunk edge (16); row 1: one-step segments and ids
  that repeat non-adjacently (still new segments)."""
  row0 = np.searchsorted([5, 16, 17, 29], np.arange(T), side="right")
  row1 = np.searchsorted([3, 4, 20, 21, 30], np.arange(T), side="right") % 2
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


def test_matches_scan_reference():
  """Forward and every gradient, with segments (the unsegmented path and other shapes are
  exercised through ``jaxrec.ops.mlstm(method="pallas")`` in tests/ops/mlstm_test.py)."""
  args, (dh, dc, dn) = _inputs()
  seg = _segments()
  starts = segment_starts(seg)

  def kernel_fn(q, k, v, i_gate, f_gate, c0, n0, m0):
    h, (c, n, _) = chunk_mlstm(
      q * K**-0.5,
      k,
      v,
      i_gate,
      jax.nn.log_sigmoid(f_gate),
      initial_state=(c0, n0, m0),
      segment_starts=starts,
      eps=1e-6,
      chunk_size=16,
      interpret=True,
    )
    return h, c, n

  def reference_fn(q, k, v, i_gate, f_gate, c0, n0, m0):
    h, (c, n, _) = scan_mlstm(q, k, v, i_gate, f_gate, (c0, n0, m0), seg)
    return h, c, n

  @jax.jit
  def run(args):
    out, pull = jax.vjp(kernel_fn, *args)
    ref, pull_ref = jax.vjp(reference_fn, *args)
    return out, pull((dh, dc, dn)), ref, pull_ref((dh, dc, dn))

  out, grads, ref, grads_ref = run(args)
  # Two computations: the kernel (chunks of 16) and the scan.
  arrays = [np.asarray(x) for x in args]
  terms = sum(
    mlstm_chain(method, T, K, 16) + mlstm_exponent_terms(method, *arrays[3:5], arrays[7], 16)
    for method in ("chunk", "sequential")
  )
  atols = mlstm_atols(*arrays[:5], arrays[5:], seg, terms=terms)
  for name, x, r, atol in zip(("h", "c", "n"), out, ref, atols[:3], strict=True):
    assert_close(x, r, rtol=0.0, atol=atol, err_msg=name)
  magnitudes = mlstm_gradient_magnitudes(arrays[:5], arrays[5:], seg, (dh, dc, dn))
  for name, g, r, m in zip(NAMES, grads, grads_ref, magnitudes, strict=True):
    # Each computation a forward and a backward chain.
    assert_close(g, r, rtol=0.0, atol=rounding_atol(m, terms=2 * terms), err_msg=f"d{name}")


def test_validation_errors():
  args, _ = _inputs()
  q, k, v, i_gate, f_gate, *state = args
  kw = dict(initial_state=tuple(state), eps=1e-6, interpret=True)
  with pytest.raises(ValueError, match=r"q: expected T a positive multiple of chunk_size=24"):
    chunk_mlstm(q, k, v, i_gate, f_gate, chunk_size=24, **kw)
  with pytest.raises(ValueError, match=r"log_f: expected shape \(2, 32, 2\) \[B, T, H\]"):
    chunk_mlstm(q, k, v, i_gate, f_gate[..., None], chunk_size=16, **kw)
