"""Newton-parallel solves of nonlinear recurrences ``h_t = f(h_{t-1}, x_t)`` (ParaRNN, DEER).

Axes: ``B`` batch, ``T`` time, ``D`` state width. For any cell ``f`` the whole trajectory
``h = (h_0, ..., h_{T-1})`` is the root of ``F_t(h) = h_t - f(h_{t-1}, x_t)``. Newton's method
linearizes ``f`` around the current trajectory, ``J_t = ∂f/∂h (h_{t-1}, x_t)``, and solves

  δh_t = J_t δh_{t-1} + r_t,   r_t = f(h_{t-1}, x_t) - h_t,   δh_{-1} = 0,

a *linear* recurrence, by a parallel scan (ParaRNN, arXiv 2510.21450, §2 and Alg. 1; DEER). Cost
per iteration: ``k`` JVPs of the cell for a ``k×k``-block Jacobian and one O(log T)-depth scan.

Pieces: ``jaxrec.ops.newton_linear`` holds what does not depend on how the iteration is driven,
so kernels and sequence-parallel solvers reuse it (all re-exported here):

* ``JacobianStructure`` / ``detect_jacobian_structure``: the sparsity of ``J`` (diagonal,
  ``k×k`` blocks, dense), given or found by probing ``jax.jacfwd`` of the cell.
* ``linearize_cell``: ``f`` and the Jacobian blocks at every step, from ``k`` structured JVPs.
* ``solve_linear_recurrence``: the linear step, ``jaxrec.ops.linear_scan`` for diagonals and a
  chunked or associative scan over ``k×k`` matrix products for blocks.

This module holds ``newton_rnn``: the iteration, convergence test, damping, sequential fallback
and the adjoint backward pass.

Causality: ``δh_t`` only depends on ``r_s, s ≤ t``, so each iteration makes at least one more
state exact (ELK, Prop. 1); with the initial guess below, ``h_0`` is exact from the start, and
after ``k`` iterations ``h_0 … h_k`` are. The solve therefore ends in at most ``T - 1`` iterations
for *any* approximate Jacobian, which is what makes damping safe.
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.ops import _checks, _dispatch

# Every public name of newton_linear is importable from here, for kernels and solvers.
from jaxrec.ops.newton_linear import JACOBIANS as JACOBIANS
from jaxrec.ops.newton_linear import (
  SCAN_METHODS,
  Cell,
  JacobianStructure,
  _as_structure,
  _batched,
  detect_jacobian_structure,
  linearize_cell,
  shift_states,
  solve_linear_recurrence,
)
from pallas_kernels import newton as newton_kernel

FALLBACKS = ("sequential", None)
METHODS = ("newton", "sequential", "pallas")
# Jacobians (B·T·D·k floats, B·T·D² when dense) above this many bytes trigger a memory warning.
_JACOBIAN_WARN_BYTES = 1 << 30


def damp_jacobian(jac: jax.Array, damping: float) -> jax.Array:
  """Damped Jacobian ``J̃_t = J_t / max(1 + λ, ‖J_t‖_∞)`` per block (``‖·‖_∞``: max row sum).

  This is the "shrink the Jacobian" simplification of quasi-ELK / Levenberg–Marquardt, not
  ELK's Kalman smoother: λ moves the step from Newton (λ = 0 on a contractive cell) towards the
  Picard iteration ``δ_t = r_t`` (λ → ∞), and the norm in the denominator guarantees
  ``‖J̃_t‖_∞ ≤ 1``. Then ``|δ_t|_∞ ≤ Σ_{s≤t} |r_s|_∞``: a step grows at most linearly in ``T``,
  never geometrically as products of large Jacobians do, so a stiff cell with bounded outputs
  (weights ×100 under a tanh) keeps finite iterates. Any ``J̃`` keeps the root
  ``h_t = f(h_{t-1}, x_t)`` and the one-more-exact-state-per-iteration guarantee; only the speed
  of convergence changes (linear instead of quadratic where ``J̃ ≠ J``).
  """
  norm = jnp.max(jnp.sum(jnp.abs(jac), axis=-1), axis=-1)
  return jac / jnp.maximum(1.0 + damping, norm)[..., None, None]


# ----------------------------------------------------------------------------------------------
# The Newton iteration, its fallback and its adjoint.


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["iterations", "residual", "converged", "fallback"],
  meta_fields=["structure", "tol"],
)
@dataclasses.dataclass(frozen=True)
class NewtonInfo:
  """Diagnostics of a ``newton_rnn`` solve, one entry per sequence.

  Attributes:
    iterations: ``[B]`` int32, Newton iterations run for each sequence.
    residual: ``[B]``, ``max_t ‖h_t - f(h_{t-1}, x_t)‖_∞`` of the last Newton iterate (before
      any fallback): a true maximum, NaN if any entry is NaN and ``inf`` if one is infinite.
    converged: ``[B]`` bool, the residual is finite and reached the tolerance; a non-finite
      iterate never counts as converged.
    fallback: ``[B]`` bool, the sequence was recomputed by the sequential scan (every
      unconverged sequence, with ``fallback="sequential"``).
    structure: the Jacobian structure used (``None`` for ``method="sequential"``).
    tol: the absolute tolerance; a sequence converges when ``residual ≤ tol·max(1, max|h|)``.
  """

  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array
  fallback: jax.Array
  structure: JacobianStructure | None
  tol: float


@dataclasses.dataclass(frozen=True)
class _Config:
  structure: JacobianStructure
  max_iters: int
  tol: float
  damping: float | None
  fallback: str | None
  scan_method: str
  pallas: bool


def nan_max(x: jax.Array, axis) -> jax.Array:
  """``jnp.max`` that returns NaN wherever a reduced entry is NaN.

  XLA's max reductions are free to skip NaN operands (on CPU, inside a ``while_loop``, an
  all-NaN row reduces to ``-inf``), so a residual of a diverged iterate would read as ``-inf``:
  below any tolerance. This one is a real maximum.
  """
  return jnp.where(jnp.any(jnp.isnan(x), axis=axis), jnp.nan, jnp.max(x, axis=axis))


def _residual(f, h):
  """Per sequence ``max_t ‖h_t - f(h_{t-1}, x_t)‖_∞``: NaN if any entry is NaN, ``inf`` if one
  is infinite (an infinite ``h_t`` or ``f_t`` gives ``inf`` or ``inf - inf = NaN``)."""
  return nan_max(jnp.abs(f - h), axis=(1, 2))


def _converged(residual, h, tol):
  """The convergence test. A finite residual implies finite ``f`` and ``h`` (see ``_residual``),
  so a non-finite iterate never passes, whatever the scale ``max|h|`` reads."""
  scale = jnp.maximum(1.0, jnp.max(jnp.abs(h), axis=(1, 2)))
  return jnp.isfinite(residual) & (residual <= tol * scale)


def all_finite(x: jax.Array) -> jax.Array:
  """``[B]``: every entry of sequence ``b`` of ``x [B, ...]`` is finite."""
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def tree_all_finite(tree, batch: int | None = None) -> jax.Array:
  """Every floating entry of ``tree`` is finite: per sequence ``[B]`` over ``[B, ...]`` leaves
  when ``batch`` is given, else a scalar. Integer leaves and their ``float0`` cotangents count
  as finite."""
  check = all_finite if batch is not None else lambda x: jnp.all(jnp.isfinite(x))
  out = jnp.ones(() if batch is None else (batch,), bool)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      out = out & check(x)
  return out


def scan_states(cell, params, xs, h0):
  """The reference solve: ``lax.scan`` over time of the cell mapped over the batch,
  ``xs [B, T, ...]``, ``h0 [B, D]`` -> ``h [B, T, D]``."""
  step = jax.vmap(cell, in_axes=(None, 0, 0))

  def body(h, x_t):
    h = step(params, h, x_t)
    return h, h

  _, h = lax.scan(body, h0, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs))
  return jnp.moveaxis(h, 0, 1)


def _iterate(cell, cfg: _Config, params, xs, h0):
  """The Newton loop in XLA: ``(h, residual, iterations)``."""
  structure = cfg.structure
  batch, t = h0.shape[0], jax.tree.leaves(xs)[0].shape[1]
  # Initial guess h_t = f(0, x_t) for every t at once (paper eq. A.1), except h_0 = f(h0, x_0),
  # which is then exact.
  h_prev = shift_states(jnp.zeros((batch, t, h0.shape[-1]), h0.dtype), h0)
  h = _batched(cell)(params, h_prev, xs)
  f, jac = linearize_cell(cell, structure, params, shift_states(h, h0), xs)
  residual = _residual(f, h)
  iterations = jnp.zeros((batch,), jnp.int32)

  # A sequence iterates until it converges or its iterate stops being finite: NaN and inf never
  # recover (NaN propagates; an infinite step overflows the next residual), so iterating on is
  # wasted and the sequence goes to the fallback.
  pending = lambda h, residual: jnp.isfinite(residual) & ~_converged(residual, h, cfg.tol)

  def cond(state):
    step, h, _, _, residual, _ = state
    return (step < cfg.max_iters) & jnp.any(pending(h, residual))

  def body(state):
    step, h, f, jac, residual, iterations = state
    active = pending(h, residual)
    if cfg.damping is not None:
      jac = damp_jacobian(jac, cfg.damping)
    delta = solve_linear_recurrence(jac, f - h, structure, method=cfg.scan_method)
    # Converged (and failed) sequences keep their iterate bit for bit.
    h = jnp.where(active[:, None, None], h + delta, h)
    f, jac = linearize_cell(cell, structure, params, shift_states(h, h0), xs)
    return step + 1, h, f, jac, _residual(f, h), iterations + active

  state = (jnp.int32(0), h, f, jac, residual, iterations)
  _, h, _, _, residual, iterations = lax.while_loop(cond, body, state)
  return h, residual, iterations


def _iterate_pallas(cell, cfg: _Config, params, xs, h0):
  """``max_iters`` iterations fused in the Pallas kernel (no early exit), then the residual."""
  h = newton_kernel.newton_solve(
    cell,
    params,
    xs,
    h0,
    num_iters=cfg.max_iters,
    block_size=cfg.structure.k(h0.shape[-1]),
    layout=cfg.structure.layout,
    damping=cfg.damping,
    interpret=_dispatch.pallas_interpret(),
  )
  residual = _residual(_batched(cell)(params, shift_states(h, h0), xs), h)
  return h, residual, jnp.full((h0.shape[0],), cfg.max_iters, jnp.int32)


def _newton(cell, cfg: _Config, params, xs, h0):
  """Forward solve: ``(h [B, T, D], (iterations, residual, converged, fallback))``."""
  iterate = _iterate_pallas if cfg.pallas else _iterate
  h, residual, iterations = iterate(cell, cfg, params, xs, h0)
  converged = _converged(residual, h, cfg.tol)
  fallback = jnp.zeros_like(converged)
  if cfg.fallback == "sequential":
    fallback = ~converged
    # lax.cond skips the sequential pass unless some sequence failed; it then runs batched over
    # all of B (the same wall time as one sequence on parallel hardware) and jnp.where keeps its
    # result only for the failed ones. Under vmap the cond becomes a select and always runs.
    h = lax.cond(
      jnp.any(fallback),
      lambda: jnp.where(fallback[:, None, None], scan_states(cell, params, xs, h0), h),
      lambda: h,
    )
  return h, (iterations, residual, converged, fallback)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _newton_solve(cell, cfg, params, xs, h0):
  return _newton(cell, cfg, params, xs, h0)


def _newton_solve_fwd(cell, cfg, params, xs, h0):
  h, stats = _newton(cell, cfg, params, xs, h0)
  return (h, stats), (params, xs, h0, h)


def _newton_solve_bwd(cell, cfg, res, cotangents):
  """Adjoint method (ParaRNN's backward): no differentiation through the iterations.

  ``λ_t = ∂L/∂h_t + J_{t+1}ᵀ λ_{t+1}`` is one reverse linear recurrence with the transposed
  Jacobians at the solution; then one VJP of the cell at ``(h_{t-1}, x_t)`` with cotangent ``λ``
  gives ``dparams`` (summed over B and T), ``dxs`` and, from its ``h_prev`` part at ``t = 0``,
  ``dh0 = J_0ᵀ λ_0``.
  """
  params, xs, h0, h = res
  dh = cotangents[0]
  structure = cfg.structure
  h_prev = shift_states(h, h0)
  _, jac = linearize_cell(cell, structure, params, h_prev, xs)
  jac_t = jnp.swapaxes(jac, -1, -2)
  # The adjoint at t uses J_{t+1}: shift left by one, nothing after the last step.
  jac_t = jnp.concatenate([jac_t[:, 1:], jnp.zeros_like(jac_t[:, :1])], axis=1)
  solve = functools.partial(solve_linear_recurrence, jac_t, dh, structure, reverse=True)
  lam = solve(method=cfg.scan_method)
  if cfg.fallback == "sequential":
    # A parallel scan forms products of Jacobians, which can overflow (inf·0 = NaN) where the
    # sequential recurrence stays finite: redo those sequences one step at a time.
    bad = ~all_finite(lam)
    lam = lax.cond(
      jnp.any(bad),
      lambda: jnp.where(bad[:, None, None], solve(method="sequential"), lam),
      lambda: lam,
    )
  _, pullback = jax.vjp(_batched(cell), params, h_prev, xs)
  dparams, dh_prev, dxs = pullback(lam.astype(h.dtype))
  # Whatever its cause (a non-finite cotangent, input or Jacobian, or an overflowing adjoint
  # without the fallback), a non-finite gradient is reported, never passed on silently.
  finite = all_finite(lam) & all_finite(dh_prev) & tree_all_finite(dxs, h.shape[0])
  params_finite = jnp.all(tree_all_finite(dparams))
  # The host callback runs only when something is wrong: no device-to-host sync per step.
  lax.cond(
    jnp.all(finite) & params_finite,
    lambda: None,
    lambda: jax.debug.callback(_warn_nonfinite_gradient, finite, params_finite),
  )
  return dparams, dxs, dh_prev[:, 0]


def _warn_nonfinite_gradient(finite, params_finite, *, name="newton_rnn"):
  """Host-side warning for a backward pass that produced non-finite gradients."""
  if np.all(finite) and params_finite:
    return
  bad = np.flatnonzero(~np.asarray(finite))
  where = f"{bad.size} of {finite.size} sequences (batch indices {bad[:8].tolist()})"
  if not bad.size:
    where = "the parameters"
  warnings.warn(
    f"{name}: the adjoint gradient is not finite for {where}; check the loss cotangent, the "
    "inputs and the cell's Jacobian along the solution (a cell whose Jacobian products grow "
    "without bound has exploding gradients in any form of backpropagation).",
    RuntimeWarning,
    stacklevel=1,
  )


_newton_solve.defvjp(_newton_solve_fwd, _newton_solve_bwd)


def _warn_unconverged(
  converged,
  residual,
  *,
  name="newton_rnn",
  outcome="fallback=None returned the unconverged iterate",
  remedies="use fallback='sequential' or ",
):
  """Host-side warning for sequences that stopped unconverged (shared with newton_sharded)."""
  if not np.all(converged):
    bad = np.flatnonzero(~np.asarray(converged))
    warnings.warn(
      f"{name}: {bad.size} of {converged.size} sequences did not converge (batch indices "
      f"{bad[:8].tolist()}, max residual {np.max(residual[bad]):.3g}) and {outcome}; raise "
      f"max_iters, set damping, {remedies}pass return_info=True to handle it yourself.",
      RuntimeWarning,
      stacklevel=1,
    )


def _solve(cell, cfg, warn, params, xs, h0):
  h, stats = _newton_solve(cell, cfg, params, xs, h0)
  if warn:
    jax.debug.callback(_warn_unconverged, stats[2], stats[1])
  return h, stats


_solve_jit = jax.jit(_solve, static_argnums=(0, 1, 2))


# ----------------------------------------------------------------------------------------------
# Public entry point.


def newton_rnn(
  cell: Cell,
  params,
  xs,
  h0: jax.Array,
  *,
  jacobian: str | JacobianStructure = "auto",
  max_iters: int | None = None,
  tol: float | None = None,
  damping: float | None = None,
  fallback: str | None = "sequential",
  method: str = "newton",
  scan_method: str = "auto",
  return_info: bool = False,
):
  """All states of ``h_t = cell(params, h_{t-1}, x_t)``, solved in parallel over time by Newton.

  The cell is written for **one step of one sequence**: ``cell(params, h_prev [D], x_t) -> h_t
  [D]`` with ``x_t`` one time slice of ``xs`` (any pytree of ``[...]`` arrays); it is vmapped over
  ``B`` and ``T`` here, so per-step Jacobians are ``D×D``. It must return the shape and dtype of
  ``h0[0]``. States live in ``h0``'s dtype; use fp32 (or fp64) — in half precision the residual
  stalls far above any useful tolerance. The cell is a static argument of an internal ``jit``:
  define it once rather than as a fresh lambda per call to reuse compilations. Work in the cell
  that only depends on ``(params, x_t)`` (input projections) is redone at every iteration, since
  XLA does not hoist it out of the loop: for speed pass precomputed projections as ``xs``, as
  ParaRNN does.

  Each iteration linearizes the cell around the current trajectory and solves the linear
  recurrence ``δh_t = J_t δh_{t-1} + r_t`` by a parallel scan (see the module docstring). A
  sequence stops updating once ``max_t ‖h_t - f(h_{t-1}, x_t)‖_∞ ≤ tol·max(1, max|h|)``; the
  loop ends when all have, or after ``max_iters``. After ``k`` iterations ``h_0 … h_k`` are
  exact. Gradients w.r.t. ``params``, ``xs`` and ``h0`` use the adjoint method: one reverse
  linear scan and one VJP of the cell, never differentiating through the iterations.

  Args:
    cell: ``(params, h_prev [D], x_t) -> h_t [D]``.
    params: parameter pytree, shared by all steps.
    xs: inputs, a pytree of ``[B, T, ...]`` arrays.
    h0: initial state ``h_{-1}``, ``[B, D]``, floating.
    jacobian: structure of ``∂f/∂h_prev``. ``"diagonal"``: one JVP with a ones tangent gives
      ``diag J`` (wrong unless ``J`` really is diagonal); ``"block"``: ``2×2`` blocks of a stacked
      ``[c; h]`` state (other sizes and layouts: pass a ``JacobianStructure``), ``k`` JVPs;
      ``"dense"``: ``D`` JVPs and O(B·T·D²) memory; ``"auto"``: probe the cell with
      ``jax.jacfwd`` (``detect_jacobian_structure``), log the result and report it in ``info``.
    max_iters: Newton iterations at most; default 10 for fp32 and 16 for fp64 states. Contractive
      cells reach fp32 round-off in 3–4 (paper App. A); the spare iterations cover harder cells
      before the fallback, and fp64 needs about one doubling of correct digits more.
    tol: absolute residual tolerance, scaled by ``max(1, max|h|)`` per sequence; default 1e-6 for
      fp32 (about 8 ulp of a unit-size state, the round-off floor of one cell evaluation) and
      1e-12 for fp64 (well above its round-off, below any fp32 comparison).
    damping: ``None`` for plain Newton, or ``λ ≥ 0`` for the damped step of ``damp_jacobian``,
      which keeps stiff cells finite.
    fallback: ``"sequential"`` recomputes the sequences that did not converge — including any
      whose iterate or residual is not finite — with ``lax.scan`` (a ``lax.cond`` runs it only
      if one failed, a per-sequence ``jnp.where`` keeps it only for those), and in the backward
      pass redoes sequentially any sequence whose parallel adjoint scan is not finite; ``None``
      returns the last iterate — reported in ``info``, and with a ``RuntimeWarning`` (through
      ``jax.debug.callback``) when ``return_info=False``; its gradient is then the adjoint at
      that inexact trajectory. Either way a non-finite gradient raises a ``RuntimeWarning``.
    method: ``"newton"``; ``"pallas"`` for the fused kernel of ``pallas_kernels.newton``
      (interpret mode on CPU), which runs exactly ``max_iters`` iterations per time block on chip
      (ParaRNN fixes 3) and needs a diagonal or ``2×2``-block Jacobian and a cell elementwise over
      channels (projections precomputed into ``xs``, per-channel ``params``; ``ValueError``
      otherwise), then the residual check, fallback and adjoint as above; or ``"sequential"`` for
      the reference ``lax.scan`` (differentiated by plain autodiff).
    scan_method: the linear solver, see ``solve_linear_recurrence``.
    return_info: also return a ``NewtonInfo``.

  Returns:
    ``h [B, T, D]`` (the final state is ``h[:, -1]``), or ``(h, info)`` with ``return_info``.
  """
  batch, t, width = _validate(cell, params, xs, h0, max_iters, tol, damping, fallback)
  _checks.check_method(method, METHODS)
  if scan_method not in SCAN_METHODS:
    raise ValueError(f"scan_method: expected one of {SCAN_METHODS}, got {scan_method!r}")
  structure = _as_structure(jacobian)
  fp64 = jnp.dtype(h0.dtype) == jnp.float64
  if tol is None:
    # fp32: about 8 ulp of a unit-size state; half precision: 8 ulp of its own.
    tol = 1e-12 if fp64 else max(1e-6, 8 * float(jnp.finfo(h0.dtype).eps))
  if method == "sequential":
    h = scan_states(cell, params, xs, h0)
    # The reference is exact by construction; only a non-finite trajectory is not "converged".
    ok = all_finite(h)
    residual = jnp.where(ok, 0.0, jnp.nan).astype(h0.dtype)
    info = NewtonInfo(jnp.zeros((batch,), jnp.int32), residual, ok, jnp.zeros_like(ok), None, tol)
    return (h, info) if return_info else h

  x_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), xs)
  if structure is None:
    structure = detect_jacobian_structure(cell, params, x_t, h0[0])
  k = structure.k(width)
  if width % k:
    raise ValueError(f"jacobian: block size {k} does not divide the state width D={width}")
  if method == "pallas":
    if k > 2:
      raise ValueError(
        f"method: 'pallas' needs a diagonal or 2x2-block Jacobian, got a {structure} one for "
        f"D={width}; use method='newton'"
      )
    newton_kernel.check_elementwise(cell, params, x_t, h0[0], block_size=k, layout=structure.layout)
  jac_bytes = batch * t * width * k * jnp.dtype(h0.dtype).itemsize
  if jac_bytes > _JACOBIAN_WARN_BYTES:
    warnings.warn(
      f"newton_rnn: the {structure} Jacobian of B={batch}, T={t}, D={width} takes "
      f"{jac_bytes / 2**30:.1f} GiB per iteration (O(T·D·k) memory, O(T·D²) when dense).",
      stacklevel=2,
    )
  cfg = _Config(
    structure=structure,
    max_iters=max_iters if max_iters is not None else (16 if fp64 else 10),
    tol=tol,
    damping=None if damping is None else float(damping),
    fallback=fallback,
    scan_method=scan_method,
    pallas=method == "pallas",
  )
  warn = fallback is None and not return_info
  try:
    hash(cell)
    solve = _solve_jit
  except TypeError:
    solve = _solve
  h, (iterations, residual, converged, fell_back) = solve(cell, cfg, warn, params, xs, h0)
  if not return_info:
    return h
  return h, NewtonInfo(iterations, residual, converged, fell_back, structure, tol)


def _validate(cell, params, xs, h0, max_iters, tol, damping, fallback):
  """Checks arguments and the cell's output; returns ``(B, T, D)``."""
  _checks.check_rank("h0", h0, 2, "[B, D]")
  _checks.check_float("h0", h0)
  batch, width = h0.shape
  leaves = jax.tree.leaves(xs)
  if not leaves:
    raise ValueError("xs: expected at least one [B, T, ...] array, got an empty pytree")
  t = jnp.shape(leaves[0])[1] if jnp.ndim(leaves[0]) >= 2 else 0
  for x in leaves:
    if jnp.ndim(x) < 2 or jnp.shape(x)[:2] != (batch, t):
      raise ValueError(
        f"xs: expected arrays [B, T, ...] with B={batch} (from h0) and one T, got shape "
        f"{jnp.shape(x)}"
      )
  if t < 1:
    raise ValueError(f"xs: expected T >= 1 steps, got shape {jnp.shape(leaves[0])}")
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")
  if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
    raise ValueError(f"max_iters: expected an int >= 0, got {max_iters!r}")
  if tol is not None and not (isinstance(tol, int | float) and tol > 0):
    raise ValueError(f"tol: expected a positive float, got {tol!r}")
  if damping is not None and not (isinstance(damping, int | float) and damping >= 0):
    raise ValueError(f"damping: expected None or a float >= 0, got {damping!r}")
  x_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[2:], jnp.result_type(x)), xs)
  out = jax.eval_shape(cell, params, jax.ShapeDtypeStruct((width,), h0.dtype), x_t)
  if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != ((width,), h0.dtype):
    got = (out.shape, out.dtype) if isinstance(out, jax.ShapeDtypeStruct) else out
    raise ValueError(
      f"cell: expected an output of shape {(width,)} and dtype {h0.dtype} (those of h0[0]), "
      f"got {got}"
    )
  return batch, t, width
