"""jaxrec.ops.newton_rnn against a plain sequential lax.scan of the same cell (testing_utils;
values) and jax.grad of that scan (gradients).

Tolerances (testing_utils' error model): a converged solve misses each step by at most its
residual tolerance, and both it and the scan round each cell evaluation; ``rnn_error_bound``
carries those local errors forward through the step Jacobians (``newton_atol``)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import (
  assert_close,
  assert_rnn_grads_match,
  caught_host_warnings,
  newton_atol,
  rounding_atol,
)
from testing_utils import sequential_rnn as _reference

from jaxrec.ops import JacobianStructure, NewtonInfo, newton_rnn
from jaxrec.ops import rnn_cells as rc
from jaxrec.ops.newton_core import detect_jacobian_structure, solve_linear_recurrence

INPUT = 4


@functools.cache
def _cells(width):
  """(name, cell, params) with states of width D = width."""
  key = jax.random.key(1)
  return {
    "paragru": (rc.paragru_cell, rc.init_paragru(key, INPUT, width, num_heads=2)),
    "gru": (rc.gru_cell, rc.init_gru(key, INPUT, width)),
    "paralstm": (rc.paralstm_cell, rc.init_paralstm(key, INPUT, width // 2, num_heads=2)),
    "tanh_rnn": (rc.tanh_rnn_cell, rc.init_tanh_rnn(key, INPUT, width)),
  }


def _inputs(batch, t, width, seed=0, dtype=jnp.float32):
  # numpy draws: no per-shape compilation of random kernels.
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((batch, t, INPUT)).astype(dtype)
  h0 = 0.5 * rng.standard_normal((batch, width)).astype(dtype)
  return jnp.asarray(xs), jnp.asarray(h0)


@pytest.mark.parametrize("name", ["paragru", "gru", "paralstm", "tanh_rnn"])
def test_matches_sequential_fp32(name):
  cell, params = _cells(8)[name]
  for batch, t in ((2, 1), (2, 17), (3, 1024)):
    xs, h0 = _inputs(batch, t, 8, seed=t)
    h, info = newton_rnn(cell, params, xs, h0)
    ref = _reference(cell, params, xs, h0)
    assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, tol=info.tol))
    assert isinstance(info, NewtonInfo)
    assert np.all(info.converged) and not np.any(info.fallback), info
    if t == 17 and info.structure.kind != "dense":
      # The structured Jacobian path agrees with the generic dense one: two converged solves.
      h_dense, _ = newton_rnn(cell, params, xs, h0, jacobian="dense")
      atol = newton_atol(cell, params, xs, h0, ref, solves=2, tol=info.tol)
      assert_close(h, h_dense, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_matches_sequential_long(name):
  cell, params = _cells(4)[name]
  xs, h0 = _inputs(1, 65537, 4)
  h, info = newton_rnn(cell, params, xs, h0)
  ref = _reference(cell, params, xs, h0)
  assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, tol=info.tol))
  assert np.all(info.converged) and not np.any(info.fallback)


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_matches_sequential_fp64(name):
  with jax.enable_x64(True):
    cell, params = _cells(8)[name]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    xs, h0 = _inputs(2, 300, 8, dtype=jnp.float64)
    h, info = newton_rnn(cell, params, xs, h0)
    assert h.dtype == jnp.float64
    ref = _reference(cell, params, xs, h0)
    atol = newton_atol(cell, params, xs, h0, ref, tol=info.tol, dtype=jnp.float64)
    assert_close(h, ref, rtol=0, atol=atol)
    assert np.all(info.converged) and info.tol == 1e-12


@pytest.mark.parametrize("name", ["paragru", "gru", "paralstm"])
def test_gradients_match_sequential(name):
  cell, params = _cells(8)[name]
  xs, h0 = _inputs(2, 33, 8, seed=3)
  weights = jax.random.normal(jax.random.key(9), (2, 33, 8))
  solve = lambda p, x, h: newton_rnn(cell, p, x, h)[0]
  assert_rnn_grads_match(solve, cell, params, xs, h0, weights, rtol=1e-4)


@pytest.mark.parametrize("method", ["sequential", "chunk", "associative"])
def test_block_linear_solve(method):
  """solve_linear_recurrence on 3×3 blocks against a float64 numpy loop, both layouts."""
  rng = np.random.default_rng(8)
  jac = jnp.asarray(0.4 * rng.standard_normal((2, 37, 2, 3, 3)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((2, 37, 6)), jnp.float32)
  for layout, reverse in (("stacked", False), ("interleaved", True)):
    structure = JacobianStructure("block", 3, layout)
    solve = jax.jit(
      solve_linear_recurrence, static_argnums=2, static_argnames=("reverse", "method")
    )
    got = solve(jac, rhs, structure, reverse=reverse, method=method)
    blocks = np.asarray(structure.to_blocks(rhs), np.float64)
    want, delta = np.zeros_like(blocks), np.zeros_like(blocks[:, 0])
    magnitude, mag = np.zeros_like(blocks), np.zeros_like(blocks[:, 0])
    for t in range(36, -1, -1) if reverse else range(37):
      j = np.asarray(jac[:, t], np.float64)
      delta = np.einsum("bdij,bdj->bdi", j, delta) + blocks[:, t]
      mag = np.einsum("bdij,bdj->bdi", np.abs(j), mag) + np.abs(blocks[:, t])
      want[:, t], magnitude[:, t] = delta, mag
    # Every form: a length-3 product and an add a step (or a product of 3×3 blocks) on its chain.
    atol = rounding_atol(structure.from_blocks(jnp.asarray(magnitude)), terms=4 * 37 + 1)
    assert_close(got, structure.from_blocks(jnp.asarray(want)), rtol=0, atol=atol)


def _strong_tanh(width=6, scale=3.0):
  params = rc.init_tanh_rnn(jax.random.key(2), INPUT, width)
  return rc.tanh_rnn_cell, jax.tree.map(lambda w: scale * w, params)


def test_causality_first_states_exact():
  cell, params = _strong_tanh()
  xs, h0 = _inputs(2, 40, 6)
  ref = _reference(cell, params, xs, h0)
  for k in (1, 3):
    with pytest.warns(RuntimeWarning, match="2 of 2 sequences did not converge"):
      h, info = newton_rnn(cell, params, xs, h0, max_iters=k, fallback=None)
      jax.effects_barrier()
    assert np.all(info.iterations == k) and not np.any(info.converged)
    # The initial guess makes h_0 exact; each iteration adds (at least) one exact state: only
    # rounding, the cell's and that of the k linearized updates.
    atol = newton_atol(cell, params, xs, h0, ref, newton_steps=k)[:, : k + 1]
    assert_close(h[:, : k + 1], ref[:, : k + 1], rtol=0, atol=atol)
    assert np.max(np.abs(h - ref)) > 1e-3  # not yet converged: the check above is not vacuous


def test_linear_cell_converges_in_one_iteration():
  key_a, key_w = jax.random.split(jax.random.key(4))
  params = {"a": jax.random.uniform(key_a, (8,), minval=-1.0, maxval=1.0)}
  params["W"] = jax.random.normal(key_w, (INPUT, 8))
  cell = lambda p, h, x: p["a"] * h + x @ p["W"]
  xs, h0 = _inputs(2, 300, 8)
  h, info = newton_rnn(cell, params, xs, h0)
  assert info.structure == JacobianStructure("diagonal")
  np.testing.assert_array_equal(info.iterations, [1, 1])
  ref = _reference(cell, params, xs, h0)
  assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, tol=info.tol))


def _rotation_cell(params, h, x):
  """Adjacent pairs (h_2i, h_2i+1) rotate together: 2×2 interleaved blocks."""
  pairs = h.reshape(-1, 2)
  cos, sin = jnp.cos(params["theta"]), jnp.sin(params["theta"])
  rotated = jnp.stack(
    [cos * pairs[:, 0] - sin * pairs[:, 1], sin * pairs[:, 0] + cos * pairs[:, 1]]
  )
  return jnp.tanh(0.9 * rotated.T.reshape(-1) + x @ params["W"])


def test_auto_detects_structure():
  cells = _cells(8)
  h_t, x_t = jnp.zeros(8), jnp.zeros(INPUT)
  detect = lambda cell, params: detect_jacobian_structure(cell, params, x_t, h_t)
  assert detect(*cells["paragru"]) == JacobianStructure("diagonal")
  assert detect(*cells["paralstm"]) == JacobianStructure("block", 2, "stacked")
  assert detect(*cells["gru"]) == JacobianStructure("dense")
  rotation = {"theta": jnp.ones(4), "W": jnp.ones((INPUT, 8))}
  assert detect(_rotation_cell, rotation) == JacobianStructure("block", 2, "interleaved")
  # Structural, not value-dependent: a zero recurrent matrix is still a dense Jacobian.
  gru_zero = dict(cells["gru"][1], U=jnp.zeros((3, 8, 8)))
  assert detect(rc.gru_cell, gru_zero) == JacobianStructure("dense")


def test_stiff_cell_damping_and_fallback():
  cell, params = _strong_tanh(width=8, scale=100.0)
  xs, h0 = _inputs(2, 1024, 8, seed=6)
  ref = _reference(cell, params, xs, h0)
  kwargs = dict(max_iters=10, fallback=None)
  with pytest.warns(RuntimeWarning, match="did not converge"):
    h_plain, _ = newton_rnn(cell, params, xs, h0, **kwargs)
    h_damped, info = newton_rnn(cell, params, xs, h0, damping=0.0, **kwargs)
    jax.effects_barrier()
  # Undamped Newton leaves the bounded range of tanh by orders of magnitude (or overflows); the
  # damped step stays finite, with an unconverged solve reported rather than hidden.
  assert not np.all(np.abs(h_plain) < 10.0)
  assert np.all(np.isfinite(h_damped))
  assert not np.any(info.converged) and not np.any(info.fallback)
  assert np.all(info.residual > info.tol)
  h, info = newton_rnn(cell, params, xs, h0, damping=1.0, max_iters=10)
  assert np.all(info.fallback)
  assert_close(h, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref))  # two scans


def test_unconverged_without_fallback_warns():
  cell, params = _strong_tanh()
  xs, h0 = _inputs(2, 40, 6)
  with pytest.warns(RuntimeWarning, match="did not converge"):
    newton_rnn(cell, params, xs, h0, max_iters=1, fallback=None)[0].block_until_ready()
    jax.effects_barrier()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    newton_rnn(cell, params, xs, h0, max_iters=1)[0].block_until_ready()  # fallback: no warning
    jax.effects_barrier()


def test_bad_arguments():
  cell, params = _cells(8)["paragru"]
  xs, h0 = _inputs(2, 5, 8)
  with pytest.raises(ValueError, match=r"cell: expected an output of shape \(8,\)"):
    newton_rnn(lambda p, h, x: jnp.concatenate([h, h]), params, xs, h0)
  with pytest.raises(ValueError, match=r"cell: .*dtype float32"):
    newton_rnn(lambda p, h, x: cell(p, h, x).astype(jnp.bfloat16), params, xs, h0)
  with pytest.raises(ValueError, match="jacobian: expected one of"):
    newton_rnn(cell, params, xs, h0, jacobian="tridiagonal")
  with pytest.raises(ValueError, match="jacobian: block size 3 does not divide"):
    newton_rnn(cell, params, xs, h0, jacobian=JacobianStructure("block", 3))
  with pytest.raises(ValueError, match="fallback: expected one of"):
    newton_rnn(cell, params, xs, h0, fallback="scan")
  with pytest.raises(ValueError, match="h0: expected rank 2"):
    newton_rnn(cell, params, xs, h0[0])
  with pytest.raises(ValueError, match="xs: expected arrays"):
    newton_rnn(cell, params, xs[:1], h0)
  with pytest.raises(ValueError, match="damping: expected"):
    newton_rnn(cell, params, xs, h0, damping=-1.0)


# ----------------------------------------------------------------------------------------------
# Non-finite iterates and gradients: never reported converged, never passed on silently.


def _stiff_dense_gru(seed=0):
  """The standard GRU with full U and every weight drawn with std 50/sqrt(fan_in), D = 8."""
  rng = np.random.default_rng(seed)
  draw = lambda shape, fan_in: jnp.asarray(50 * rng.standard_normal(shape) / np.sqrt(fan_in))
  params = {"W": draw((3, INPUT, 8), INPUT), "U": draw((3, 8, 8), 8), "b": draw((3, 8), 1)}
  return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def _check_never_falsely_converged(h, info):
  finite = np.all(np.isfinite(np.asarray(h)), axis=(1, 2))
  assert not np.any(np.asarray(info.converged) & ~finite), info
  # A converged sequence has a finite residual at the tolerance; the residual is a real max.
  conv = np.asarray(info.converged)
  assert np.all(np.isfinite(np.asarray(info.residual))[conv])
  assert not np.any(np.asarray(info.residual) == -np.inf), info


def _assert_equal_where_finite(h, ref, cell, params, xs, h0, tol):
  """``h`` equals ``ref`` where ``ref`` is finite (within ``_atol`` for converged solves of
  residual ``tol``), and is non-finite exactly where it is. The bound is taken on the problem with
  NaN read as 0 and ±inf as the largest float: the same trajectory wherever ``ref`` is finite (a
  gate that an infinite weight saturates saturates alike, its derivative 0 either way)."""
  h, ref = np.asarray(h), np.asarray(ref)
  np.testing.assert_array_equal(np.isfinite(h), np.isfinite(ref))
  big = float(jnp.finfo(jnp.float32).max)
  finite = lambda x: jnp.asarray(np.nan_to_num(np.asarray(x), nan=0.0, posinf=big, neginf=-big))
  atol = newton_atol(
    cell, jax.tree.map(finite, params), finite(xs), finite(h0), finite(ref), tol=tol
  )
  keep = np.isfinite(ref)
  assert_close(h[keep], ref[keep], rtol=0, atol=atol[keep])


def test_stiff_dense_gru_is_never_falsely_converged():
  params = _stiff_dense_gru()
  xs, h0 = _inputs(2, 300, 8, seed=11)
  ref = _reference(rc.gru_cell, params, xs, h0)
  assert np.all(np.isfinite(ref))
  for damping in (None, 1.0):
    with caught_host_warnings() as caught:
      h, info = newton_rnn(rc.gru_cell, params, xs, h0, damping=damping, fallback=None)
    _check_never_falsely_converged(h, info)
    # fallback=None warns exactly when some sequence did not converge.
    assert any("did not converge" in m for m in caught) == (not np.all(info.converged)), caught
  h, info = newton_rnn(rc.gru_cell, params, xs, h0)
  _check_never_falsely_converged(h, info)
  _assert_equal_where_finite(h, ref, rc.gru_cell, params, xs, h0, info.tol)


def _poisoned(where, value, seed=12):
  """The GRU problem with NaN or inf in one step of sequence 0 of ``xs``, in one parameter (all
  sequences) or in sequence 1 of ``h0``."""
  cell, params = _cells(8)["gru"]
  xs, h0 = _inputs(2, 40, 8, seed=seed)
  if where == "xs":
    xs = xs.at[0, 9, 1].set(value)
  elif where == "params":
    params = dict(params, U=params["U"].at[1, 2, 3].set(value))
  else:
    h0 = h0.at[1, 4].set(value)
  return cell, params, xs, h0


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["xs", "params", "h0"])
def test_nonfinite_inputs_fall_back_or_are_flagged(where, value):
  cell, params, xs, h0 = _poisoned(where, value)
  ref = _reference(cell, params, xs, h0)
  poisoned = ~np.all(np.isfinite(np.asarray(ref)), axis=(1, 2))
  # NaN always poisons the trajectory; the GRU's saturating gates absorb an infinite input or
  # weight, but not an infinite state.
  assert np.any(poisoned) == (np.isnan(value) or where == "h0")
  # Default fallback: the sequential scan's states, non-finite exactly where its are.
  h, info = newton_rnn(cell, params, xs, h0)
  _check_never_falsely_converged(h, info)
  np.testing.assert_array_equal(info.fallback, ~np.asarray(info.converged))
  assert np.all(np.asarray(info.fallback)[poisoned])
  _assert_equal_where_finite(h, ref, cell, params, xs, h0, info.tol)
  # No fallback: flagged unconverged, and a warning exactly when a sequence did not converge.
  with caught_host_warnings() as caught:
    h, info = newton_rnn(cell, params, xs, h0, fallback=None)
  _check_never_falsely_converged(h, info)
  assert not np.any(np.asarray(info.converged)[poisoned])
  assert any("did not converge" in m for m in caught) == (not np.all(info.converged)), caught


def _elementwise_gru(params, h, u):
  """ParaGRU with its input projections ``u [3, D]`` precomputed and no norm clipping (which
  reduces over channels): elementwise over channels, as the Pallas kernel requires."""
  a = params["a"]
  z = jax.nn.sigmoid(a[0] * h + u[0])
  r = jax.nn.sigmoid(a[1] * h + u[1])
  return (1.0 - z) * h + z * jnp.tanh(a[2] * (r * h) + u[2])


def test_nonfinite_inputs_pallas_path():
  """The fused kernel smears a NaN over its channel; the residual check still catches it."""
  rng = np.random.default_rng(13)
  params = {"a": jnp.asarray(rng.uniform(-0.5, 0.5, (3, 8)), jnp.float32)}
  u = jnp.asarray(rng.standard_normal((2, 37, 3, 8)), jnp.float32).at[1, 20, 0, 2].set(jnp.nan)
  h0 = jnp.zeros((2, 8), jnp.float32)
  ref = _reference(_elementwise_gru, params, u, h0)
  h, info = newton_rnn(_elementwise_gru, params, u, h0, method="pallas")
  _check_never_falsely_converged(h, info)
  np.testing.assert_array_equal(info.fallback, [False, True])
  _assert_equal_where_finite(h, ref, _elementwise_gru, params, u, h0, info.tol)


def _cancelling_adjoint():
  """A linear cell ``h_t = a_t h_{t-1} + x_t`` with ``a = 1e20`` and a loss whose last two
  cotangents cancel: the adjoint is exactly 0 before them, but any parallel scan forms
  ``a^k = inf`` and ``inf - inf = NaN``."""
  cell = lambda p, h, x: x[:, 0] * h + p * x[:, 1]
  a = np.full((2, 40, 2, 1), 1e20, np.float32)
  xs = jnp.asarray(np.concatenate([a, np.zeros_like(a)], -1))
  weights = np.zeros((2, 40, 2), np.float32)
  weights[:, -1], weights[:, -2] = 1.0, -1e20
  loss = lambda solve: lambda x: jnp.sum(jnp.asarray(weights) * solve(x))
  return cell, jnp.float32(1.0), xs, jnp.zeros((2, 2), jnp.float32), loss


def test_nonfinite_parallel_adjoint_falls_back():
  cell, params, xs, h0, loss = _cancelling_adjoint()
  want = jax.grad(loss(lambda x: _reference(cell, params, x, h0)))(xs)
  assert np.all(np.isfinite(want))
  solve = lambda **kw: newton_rnn(cell, params, h0=h0, scan_method="associative", **kw)[0]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jax.grad(loss(lambda x: solve(xs=x)))(xs)
    jax.effects_barrier()
  assert_close(got, want, rtol=1e-5, atol=1e-5)
  with pytest.warns(RuntimeWarning, match="adjoint gradient is not finite for 2 of 2 sequences"):
    got = jax.grad(loss(lambda x: solve(xs=x, fallback=None)))(xs)
    jax.effects_barrier()
  assert not np.any(np.isfinite(got[:, 0]))


def test_nonfinite_gradient_warns():
  cell, params = _cells(8)["gru"]
  xs, h0 = _inputs(2, 40, 8, seed=14)
  xs = xs.at[1, 30, 0].set(np.nan)
  with pytest.warns(RuntimeWarning, match=r"not finite for 1 of 2 sequences \(batch indices \[1\]"):
    jax.grad(lambda x: jnp.sum(newton_rnn(cell, params, x, h0)[0]))(xs).block_until_ready()
    jax.effects_barrier()
