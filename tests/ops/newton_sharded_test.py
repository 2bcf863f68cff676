"""jaxrec.ops.newton_rnn_sharded on 8 fake CPU devices, against a sequential lax.scan
(testing_utils; values, and jax.grad of it for gradients) and against the unsharded newton_rnn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from testing_utils import assert_close, assert_rnn_grads_match, newton_atol
from testing_utils import sequential_rnn as _reference

from jaxrec.ops import JacobianStructure, newton_rnn, newton_rnn_sharded
from jaxrec.ops import rnn_cells as rc

INPUT = 4
WIDTH = 8


@functools.cache
def _cells():
  key = jax.random.key(1)
  return {
    "paragru": (rc.paragru_cell, rc.init_paragru(key, INPUT, WIDTH, num_heads=2)),
    "paralstm": (rc.paralstm_cell, rc.init_paralstm(key, INPUT, WIDTH // 2, num_heads=2)),
  }


@functools.cache
def _meshes():
  """(mesh, batch_axes): time over all 8 devices (Explicit axes), or batch 2 × time 4 (Auto)."""
  return {
    "sequence8": (jax.make_mesh((8,), ("sequence",)), None),
    "data2_sequence4": (
      jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2),
      "data",
    ),
  }


def _inputs(batch, t, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((batch, t, INPUT)).astype(np.float32)
  h0 = 0.5 * rng.standard_normal((batch, WIDTH)).astype(np.float32)
  return jnp.asarray(xs), jnp.asarray(h0)


@pytest.mark.parametrize("mesh_name", ["sequence8", "data2_sequence4"])
@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_matches_sequential_and_unsharded(name, mesh_name):
  cell, params = _cells()[name]
  mesh, batch_axes = _meshes()[mesh_name]
  xs, h0 = _inputs(4, 32, seed=1)
  h, info = newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, batch_axes=batch_axes)
  ref = _reference(cell, params, xs, h0)
  assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, tol=info.tol))
  h_unsharded, info_unsharded = newton_rnn(cell, params, xs, h0)
  atol = newton_atol(cell, params, xs, h0, ref, tol=info.tol, solves=2)
  assert_close(h, h_unsharded, rtol=0, atol=atol)
  kind = {"paragru": "diagonal", "paralstm": "block"}[name]
  assert info.structure.kind == kind
  assert np.all(info.converged) and not np.any(info.fallback)
  assert np.all(info.iterations >= 1)
  np.testing.assert_array_equal(info.iterations, info_unsharded.iterations)
  assert h.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axes, "sequence")), h.ndim)


@pytest.mark.parametrize("mesh_name", ["sequence8", "data2_sequence4"])
@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_gradients_match_sequential(name, mesh_name):
  cell, params = _cells()[name]
  mesh, batch_axes = _meshes()[mesh_name]
  xs, h0 = _inputs(4, 32, seed=2)
  weights = jnp.asarray(np.random.default_rng(9).standard_normal((4, 32, WIDTH)), jnp.float32)
  solve = lambda p, x, h: newton_rnn_sharded(cell, p, x, h, mesh=mesh, batch_axes=batch_axes)[0]
  assert_rnn_grads_match(solve, cell, params, xs, h0, weights, rtol=1e-4)


def _linear_diagonal_cell(params, h, x):
  return params["a"] * h + x @ params["W"]


def _linear_rotation_cell(params, h, x):
  """Adjacent pairs rotate and shrink: a linear cell with 2×2 interleaved blocks."""
  pairs = h.reshape(-1, 2)
  cos, sin = jnp.cos(params["theta"]), jnp.sin(params["theta"])
  rotated = jnp.stack(
    [cos * pairs[:, 0] - sin * pairs[:, 1], sin * pairs[:, 0] + cos * pairs[:, 1]]
  )
  return 0.95 * rotated.T.reshape(-1) + x @ params["W"]


def test_linear_cells_exact_in_one_iteration():
  """For a linear cell one Newton step is the whole solve, so the cross-shard fix-up of the
  linear step must be exact: 64 steps over 8 shards, carried through every boundary."""
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.standard_normal((INPUT, WIDTH)), jnp.float32)
  cases = {
    "diagonal": (_linear_diagonal_cell, {"a": jnp.linspace(-0.99, 0.99, WIDTH), "W": w}),
    "block": (_linear_rotation_cell, {"theta": jnp.linspace(0.1, 1.5, WIDTH // 2), "W": w}),
  }
  mesh, _ = _meshes()["sequence8"]
  xs, h0 = _inputs(2, 64, seed=5)
  for kind, (cell, params) in cases.items():
    h, info = newton_rnn_sharded(cell, params, xs, h0, mesh=mesh)
    assert info.structure.kind == kind
    np.testing.assert_array_equal(info.iterations, [1, 1])
    ref = _reference(cell, params, xs, h0)
    assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, tol=info.tol))


def test_intermediate_iterates_match_unsharded():
  """Each sharded Newton step equals the unsharded one, not only the converged result (which a
  wrong linear step could still reach): a stiff dense-Jacobian cell stopped after 2 damped
  iterations, far from the solution, with the unconverged result reported by a warning."""
  params = jax.tree.map(lambda w: 3.0 * w, rc.init_tanh_rnn(jax.random.key(2), INPUT, WIDTH))
  mesh, _ = _meshes()["sequence8"]
  xs, h0 = _inputs(2, 40, seed=6)
  kwargs = dict(max_iters=2, damping=0.5, fallback=None)
  with pytest.warns(RuntimeWarning, match="newton_rnn_sharded: 2 of 2 sequences did not converge"):
    h, _ = newton_rnn_sharded(rc.tanh_rnn_cell, params, xs, h0, mesh=mesh, **kwargs)
    h.block_until_ready()
    jax.effects_barrier()
  with pytest.warns(RuntimeWarning, match="newton_rnn: 2 of 2 sequences did not converge"):
    want, info = newton_rnn(rc.tanh_rnn_cell, params, xs, h0, **kwargs)
    jax.effects_barrier()
  assert info.structure.kind == "dense" and not np.any(info.converged)
  assert np.max(np.abs(want - _reference(rc.tanh_rnn_cell, params, xs, h0))) > 1e-2
  # Two layouts of the same two iterations, each a cell evaluation and a linearized update
  # rounded differently, carried through the Jacobians along the iterate.
  atol = newton_atol(rc.tanh_rnn_cell, params, xs, h0, want, newton_steps=2 * 2)
  assert_close(h, want, rtol=0, atol=atol)


def test_bad_arguments():
  cell, params = _cells()["paragru"]
  mesh, _ = _meshes()["data2_sequence4"]
  xs, h0 = _inputs(4, 30)
  with pytest.raises(ValueError, match=r"xs: expected T divisible by the 4 shards.*got T=30"):
    newton_rnn_sharded(cell, params, xs, h0, mesh=mesh)
  xs, h0 = _inputs(3, 32)
  with pytest.raises(ValueError, match=r"h0: expected B divisible by the 2 shards.*got B=3"):
    newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, batch_axes="data")
  with pytest.raises(ValueError, match="axis_name: expected one of the mesh axes"):
    newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, axis_name="time")
  with pytest.raises(ValueError, match="batch_axes: expected mesh axes other than 'sequence'"):
    newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, batch_axes="sequence")
  with pytest.raises(ValueError, match="jacobian: block size 3 does not divide"):
    newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, jacobian=JacobianStructure("block", 3))


def test_nonfinite_inputs_fall_back_shard_by_shard():
  """NaN in one step of sequence 0 (shard 2 of 8): never converged; the default fallback gives
  the sequential scan's states exactly where they are finite, and a NaN gradient warns."""
  cell, params = _cells()["paragru"]
  mesh, _ = _meshes()["sequence8"]
  xs, h0 = _inputs(2, 32, seed=7)
  xs = xs.at[0, 9, 1].set(np.nan)
  ref = np.asarray(_reference(cell, params, xs, h0))
  h, info = newton_rnn_sharded(cell, params, xs, h0, mesh=mesh)
  np.testing.assert_array_equal(info.converged, [False, True])
  np.testing.assert_array_equal(info.fallback, [True, False])
  assert np.isnan(info.residual[0])
  np.testing.assert_array_equal(np.isfinite(h), np.isfinite(ref))
  # The converged sequence 1 against the scan; sequence 0 is the scan's own arithmetic.
  keep = np.isfinite(ref)
  atol = newton_atol(cell, params, np.nan_to_num(xs), h0, np.nan_to_num(ref), tol=info.tol)
  assert_close(np.asarray(h)[keep], ref[keep], rtol=0, atol=atol[keep])
  with pytest.warns(
    RuntimeWarning, match=r"1 of 2 sequences did not converge \(batch indices \[0\]"
  ):
    h, info = newton_rnn_sharded(cell, params, xs, h0, mesh=mesh, fallback=None)
    jax.effects_barrier()
  np.testing.assert_array_equal(info.converged, [False, True])
  assert not np.any(info.fallback)
  with pytest.warns(RuntimeWarning, match=r"not finite for 1 of 2 sequences \(batch indices \[0\]"):
    grad = jax.grad(lambda x: jnp.sum(newton_rnn_sharded(cell, params, x, h0, mesh=mesh)[0]))
    jax.jit(grad)(xs).block_until_ready()
    jax.effects_barrier()


def test_unconverged_falls_back_to_the_exact_states_and_gradients():
  """Two Newton steps are not enough for a stiff dense cell: the shard-by-shard fallback gives
  the sequential scan's states and jax.grad's gradients."""
  params = jax.tree.map(lambda w: 3.0 * w, rc.init_tanh_rnn(jax.random.key(2), INPUT, WIDTH))
  mesh, _ = _meshes()["sequence8"]
  xs, h0 = _inputs(2, 40, seed=6)
  solve = lambda p, x, h: newton_rnn_sharded(rc.tanh_rnn_cell, p, x, h, mesh=mesh, max_iters=2)
  h, info = solve(params, xs, h0)
  assert np.all(info.fallback) and not np.any(info.converged)
  ref = _reference(rc.tanh_rnn_cell, params, xs, h0)
  assert_close(h, ref, rtol=0, atol=newton_atol(rc.tanh_rnn_cell, params, xs, h0, ref))
  solve_h = lambda p, x, h: solve(p, x, h)[0]
  assert_rnn_grads_match(solve_h, rc.tanh_rnn_cell, params, xs, h0, 1.0, rtol=1e-4)


def test_nonfinite_parallel_adjoint_falls_back_shard_by_shard():
  """The cancelling-cotangent linear cell of newton_test: the adjoint is exactly zero before the
  last two steps, but the sharded fix-up's Jacobian products overflow; the fallback redoes it
  shard by shard."""
  cell = lambda p, h, x: x[:, 0] * h + p * x[:, 1]
  a = np.full((2, 32, WIDTH, 1), 1e20, np.float32)
  xs = jnp.asarray(np.concatenate([a, np.zeros_like(a)], -1))
  h0 = jnp.zeros((2, WIDTH), jnp.float32)
  weights = np.zeros((2, 32, WIDTH), np.float32)
  weights[:, -1], weights[:, -2] = 1.0, -1e20
  loss = lambda solve: lambda x: jnp.sum(jnp.asarray(weights) * solve(x))
  mesh, _ = _meshes()["sequence8"]
  want = jax.grad(loss(lambda x: _reference(cell, jnp.float32(1.0), x, h0)))(xs)
  assert np.all(np.isfinite(want))
  solve = lambda fallback: (
    lambda x: newton_rnn_sharded(cell, jnp.float32(1.0), x, h0, mesh=mesh, fallback=fallback)[0]
  )
  assert_close(jax.jit(jax.grad(loss(solve("sequential"))))(xs), want, rtol=1e-5, atol=1e-5)
  with pytest.warns(RuntimeWarning, match="adjoint gradient is not finite"):
    jax.jit(jax.grad(loss(solve(None))))(xs).block_until_ready()
    jax.effects_barrier()
