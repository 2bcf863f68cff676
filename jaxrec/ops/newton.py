"""Newton-parallel solves of nonlinear recurrences ``h_t = f(h_{t-1}, x_t)`` (ParaRNN, DEER).

Axes: ``B`` batch, ``T`` time, ``D`` state width. For any cell ``f`` the whole trajectory
``h = (h_0, ..., h_{T-1})`` is the root of ``F_t(h) = h_t - f(h_{t-1}, x_t)``. Newton's method
linearizes ``f`` around the current trajectory, ``J_t = ∂f/∂h (h_{t-1}, x_t)``, and solves

  δh_t = J_t δh_{t-1} + r_t,   r_t = f(h_{t-1}, x_t) - h_t,   δh_{-1} = 0,

a *linear* recurrence, by a parallel scan (ParaRNN, arXiv 2510.21450, §2 and Alg. 1; DEER). Cost
per iteration: ``k`` JVPs of the cell for a ``k×k``-block Jacobian and one O(log T)-depth scan.

Pieces: ``jaxrec.ops.newton_core`` holds what does not depend on how the iteration is driven
(Jacobian structures and their detection, linearization, the linear step, the convergence test,
the reference scan, ``NewtonInfo``, validation and warnings), shared with the sequence-parallel
``newton_rnn_sharded``. This module holds ``newton_rnn``: the iteration on one device, the fused
Pallas variant, the sequential fallback and the adjoint backward pass.

Causality: ``δh_t`` only depends on ``r_s, s ≤ t``, so each iteration makes at least one more
state exact (ELK, Prop. 1); with the initial guess below, ``h_0`` is exact from the start, and
after ``k`` iterations ``h_0 … h_k`` are. The solve therefore ends in at most ``T - 1`` iterations
for *any* approximate Jacobian, which is what makes damping safe.
"""

import dataclasses
import functools
import warnings
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks, _dispatch
from jaxrec.ops.newton_core import (
  SOLVE_METHODS,
  Cell,
  Fallback,
  JacobianKind,
  JacobianStructure,
  NewtonInfo,
  SolveMethod,
  all_finite,
  batched_cell,
  damp_jacobian,
  default_max_iters,
  default_tol,
  is_converged,
  jit_per_cell,
  linearize_cell,
  max_residual,
  resolve_jacobian,
  scan_states,
  shift_states,
  solve_linear_recurrence,
  state_scale,
  step_structs,
  tree_all_finite,
  validate_newton_args,
  warn_nonfinite_gradient,
  warn_unconverged,
)
from jaxrec.typing import RNNInputs, RNNState, RNNStates
from pallas_kernels import newton as newton_kernel

NewtonMethod = Literal["newton", "sequential", "pallas"]
METHODS = get_args(NewtonMethod)
# Jacobians (B·T·D·k floats, B·T·D² when dense) above this many bytes trigger a memory warning.
_JACOBIAN_WARN_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------
# The Newton iteration, its fallback and its adjoint.


@dataclasses.dataclass(frozen=True)
class _Config:
  structure: JacobianStructure
  max_iters: int
  tol: float
  damping: float | None
  fallback: Fallback
  scan_method: SolveMethod
  pallas: bool


def _converged(residual, h, tol):
  return is_converged(residual, state_scale(h), tol)


def _iterate(cell, cfg: _Config, params, xs, h0):
  """The Newton loop in XLA: ``(h, residual, iterations)``."""
  structure = cfg.structure
  batch, t = h0.shape[0], jax.tree.leaves(xs)[0].shape[1]
  # Initial guess h_t = f(0, x_t) for every t at once (paper eq. A.1), except h_0 = f(h0, x_0),
  # which is then exact.
  h_prev = shift_states(jnp.zeros((batch, t, h0.shape[-1]), h0.dtype), h0)
  h = batched_cell(cell)(params, h_prev, xs)
  f, jac = linearize_cell(cell, structure, params, shift_states(h, h0), xs)
  residual = max_residual(f, h)
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
    return step + 1, h, f, jac, max_residual(f, h), iterations + active

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
  residual = max_residual(batched_cell(cell)(params, shift_states(h, h0), xs), h)
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
  _, pullback = jax.vjp(batched_cell(cell), params, h_prev, xs)
  dparams, dh_prev, dxs = pullback(lam.astype(h.dtype))
  # Whatever its cause (a non-finite cotangent, input or Jacobian, or an overflowing adjoint
  # without the fallback), a non-finite gradient is reported, never passed on silently.
  finite = all_finite(lam) & all_finite(dh_prev) & tree_all_finite(dxs, h.shape[0])
  params_finite = jnp.all(tree_all_finite(dparams))
  # The host callback runs only when something is wrong: no device-to-host sync per step.
  lax.cond(
    jnp.all(finite) & params_finite,
    lambda: None,
    lambda: jax.debug.callback(warn_nonfinite_gradient, finite, params_finite),
  )
  return dparams, dxs, dh_prev[:, 0]


_newton_solve.defvjp(_newton_solve_fwd, _newton_solve_bwd)


@jit_per_cell
def _solve(cell, cfg, params, xs, h0):
  h, stats = _newton_solve(cell, cfg, params, xs, h0)
  if cfg.fallback is None:
    # The host callback runs only when a sequence did not converge (diagnostics carry no
    # gradient; reductions of bools have no differentiation rule).
    _, residual, converged, _ = lax.stop_gradient(stats)
    lax.cond(
      jnp.all(converged),
      lambda: None,
      lambda: jax.debug.callback(warn_unconverged, converged, residual),
    )
  return h, stats


# ----------------------------------------------------------------------------------------------
# Public entry point.


def newton_rnn(
  cell: Cell,
  params,
  xs: RNNInputs,
  h0: RNNState,
  *,
  jacobian: Literal["auto"] | JacobianKind | JacobianStructure = "auto",
  max_iters: int | None = None,
  tol: float | None = None,
  damping: float | None = None,
  fallback: Fallback = "sequential",
  method: NewtonMethod = "newton",
  scan_method: SolveMethod = "auto",
) -> tuple[RNNStates, NewtonInfo]:
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
      ``jax.jacfwd`` (``newton_core.detect_jacobian_structure``), log the result and report it
      in ``info``.
    max_iters: Newton iterations at most; default 10 for fp32 and 16 for fp64 states. Contractive
      cells reach fp32 round-off in 3–4 (paper App. A); the spare iterations cover harder cells
      before the fallback, and fp64 needs about one doubling of correct digits more.
    tol: absolute residual tolerance, scaled by ``max(1, max|h|)`` per sequence; default 1e-6 for
      fp32 (about 8 ulp of a unit-size state, the round-off floor of one cell evaluation) and
      1e-12 for fp64 (well above its round-off, below any fp32 comparison).
    damping: ``None`` for plain Newton, or ``λ ≥ 0`` for the damped step of
      ``newton_core.damp_jacobian``, which keeps stiff cells finite.
    fallback: ``"sequential"`` recomputes the sequences that did not converge — including any
      whose iterate or residual is not finite — with ``lax.scan`` (a ``lax.cond`` runs it only
      if one failed, a per-sequence ``jnp.where`` keeps it only for those), and in the backward
      pass redoes sequentially any sequence whose parallel adjoint scan is not finite; ``None``
      returns the last iterate — reported in ``info`` and by a ``RuntimeWarning`` (through
      ``jax.debug.callback``, only when a sequence did not converge); its gradient is then the
      adjoint at that inexact trajectory. Either way a non-finite gradient raises a
      ``RuntimeWarning``.
    method: ``"newton"``; ``"pallas"`` for the fused kernel of ``pallas_kernels.newton``
      (interpret mode on CPU), which runs exactly ``max_iters`` iterations per time block on chip
      (ParaRNN fixes 3) and needs a diagonal or ``2×2``-block Jacobian and a cell elementwise over
      channels (projections precomputed into ``xs``, per-channel ``params``; ``ValueError``
      otherwise), then the residual check, fallback and adjoint as above; or ``"sequential"`` for
      the reference ``lax.scan`` (differentiated by plain autodiff).
    scan_method: the linear solver, see ``newton_core.solve_linear_recurrence``.

  Returns:
    ``(h, info)``: ``h [B, T, D]`` (the final state is ``h[:, -1]``) and the ``NewtonInfo``
    diagnostics; under ``jit`` what is not read is dropped.
  """
  batch, t, width = validate_newton_args(
    cell,
    params,
    xs,
    h0,
    jacobian=jacobian,
    max_iters=max_iters,
    tol=tol,
    damping=damping,
    fallback=fallback,
  )
  _checks.check_choice("method", method, METHODS)
  _checks.check_choice("scan_method", scan_method, SOLVE_METHODS)
  tol = default_tol(h0.dtype) if tol is None else tol
  if method == "sequential":
    h = scan_states(cell, params, xs, h0)
    # The reference is exact by construction; only a non-finite trajectory is not "converged".
    ok = all_finite(h)
    residual = jnp.where(ok, 0.0, jnp.nan).astype(h0.dtype)
    info = NewtonInfo(jnp.zeros((batch,), jnp.int32), residual, ok, jnp.zeros_like(ok), None, tol)
    return h, info

  structure = resolve_jacobian(jacobian, cell, params, xs, h0)
  k = structure.k(width)
  if method == "pallas":
    if k > 2:
      raise ValueError(
        f"method: 'pallas' needs a diagonal or 2x2-block Jacobian, got a {structure} one for "
        f"D={width}; use method='newton'"
      )
    newton_kernel.check_elementwise(
      cell, params, step_structs(xs), h0[0], block_size=k, layout=structure.layout
    )
  jac_bytes = batch * t * width * k * jnp.dtype(h0.dtype).itemsize
  if jac_bytes > _JACOBIAN_WARN_BYTES:
    warnings.warn(
      f"newton_rnn: the {structure} Jacobian of B={batch}, T={t}, D={width} takes "
      f"{jac_bytes / 2**30:.1f} GiB per iteration (O(T·D·k) memory, O(T·D²) when dense).",
      stacklevel=2,
    )
  cfg = _Config(
    structure=structure,
    max_iters=default_max_iters(h0.dtype) if max_iters is None else max_iters,
    tol=tol,
    damping=None if damping is None else float(damping),
    fallback=fallback,
    scan_method=scan_method,
    pallas=method == "pallas",
  )
  h, (iterations, residual, converged, fell_back) = _solve(cell, cfg, params, xs, h0)
  return h, NewtonInfo(iterations, residual, converged, fell_back, structure, tol)
