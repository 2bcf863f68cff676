"""Sequence-parallel Newton solves: ``newton_rnn`` with the time axis split over a mesh axis.

Axes: ``B`` batch, ``T`` time (``T/n`` per shard of the ``n``-way sequence axis), ``D = k·d``
state width in ``d`` Jacobian blocks of ``k×k``. Shard ``s`` holds steps ``[s·T/n, (s+1)·T/n)``
of ``xs`` and of the iterate ``h``. Every Newton iteration of ``jaxrec.ops.newton_rnn`` becomes:

1. **Halo.** ``lax.ppermute`` hands each shard the last state of its left neighbour (``h0`` on
   shard 0), the ``h_{t-1}`` of its first step; each shard then linearizes the cell,
   ``f_t = f(h_{t-1}, x_t)`` and ``J_t``, on its own steps.
2. **Local solve.** ``δ̂_t = J_t δ̂_{t-1} + r_t`` from ``δ̂ = 0`` entering the shard
   (``solve_linear_recurrence``), and the cumulative products ``P_t = J_t ⋯ J_first``; the last
   one, ``Φ_s``, is the shard's transfer.
3. **Boundary fix-up** (recurrentgemma's multi-shard scan correction, run at every Newton step).
   By linearity the true step is ``δ_t = δ̂_t + P_t δ_in,s``, where the δ entering each shard
   follows ``δ_in,0 = 0``, ``δ_in,s+1 = Φ_s δ_in,s + δ̂_last,s``. The ``n`` pairs
   ``(Φ_s, δ̂_last,s)`` are ``lax.all_gather``-ed and composed serially (``n`` is small).
4. **Convergence** per sequence over the whole sequence: the residual (a true maximum: NaN if
   any entry is) and ``max|h|`` are reduced with ``lax.pmax``; the loop runs while any sequence
   of any batch shard is unconverged with a finite residual, so every device runs the same
   number of iterations.

**Fallback.** Sequences that end unconverged (or non-finite) are recomputed exactly, shard after
shard: every shard runs ``lax.scan`` over its steps from the state its left neighbour handed it
in the previous round, so after round ``r`` the first ``r + 1`` shards are exact and ``n``
rounds give the sequential result in the wall time of one sequential scan of ``T`` steps.

Gradients use the adjoint method of ``newton_rnn`` sharded the same way, in reverse:
``λ_t = ∂L/∂h_t + J_{t+1}ᵀ λ_{t+1}``, where the last step of a shard takes ``J_{t+1}`` from the
first step of its *right* neighbour (a reverse halo), is solved locally from ``λ = 0`` and fixed
up from the right; one VJP of the cell with cotangent ``λ`` then gives ``dxs``, ``dh0`` (on
shard 0) and the parameter gradient, ``lax.psum``-med over the sequence and batch axes. Where that parallel adjoint is not finite, the
fallback redoes it shard after shard with a sequential linear solve, as in the forward pass.

The result equals the unsharded solve up to rounding: each linear step is exact, so the
one-more-exact-state-per-iteration guarantee and the iteration counts carry over.
"""

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from jaxrec.ops.newton_core import (
  Cell,
  Fallback,
  JacobianKind,
  JacobianStructure,
  NewtonInfo,
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
  tree_all_finite,
  validate_newton_args,
  warn_nonfinite_gradient,
  warn_unconverged,
)
from jaxrec.typing import RNNInputs, RNNState, RNNStates


@dataclasses.dataclass(frozen=True)
class _Config:
  structure: JacobianStructure
  mesh: Mesh
  axis_name: str
  batch_axes: tuple[str, ...]
  max_iters: int
  tol: float
  damping: float | None
  fallback: Fallback

  @property
  def sequence_spec(self) -> P:
    """``[B, T, ...]`` arrays: batch over ``batch_axes``, time over ``axis_name``."""
    return P(self.batch_axes or None, self.axis_name)

  @property
  def batch_spec(self) -> P:
    """``[B, ...]`` arrays, replicated over the sequence axis."""
    return P(self.batch_axes or None)


# ----------------------------------------------------------------------------------------------
# Neighbour exchange and the sharded linear step (all run inside the shard_map).


def _from_left(x, axis_name: str):
  """``x`` of the shard on the left; zeros on the first shard."""
  n = lax.axis_size(axis_name)
  return lax.ppermute(x, axis_name, [(s, s + 1) for s in range(n - 1)])


def _from_right(x, axis_name: str):
  """``x`` of the shard on the right; zeros on the last shard."""
  n = lax.axis_size(axis_name)
  return lax.ppermute(x, axis_name, [(s + 1, s) for s in range(n - 1)])


def _previous_states(h, h0, axis_name: str):
  """``h_{t-1}`` for every local step: the halo state (``h0`` on shard 0), then ``h`` shifted."""
  incoming = jnp.where(lax.axis_index(axis_name) == 0, h0, _from_left(h[:, -1], axis_name))
  return shift_states(h, incoming)


def _apply(structure: JacobianStructure, blocks, v):
  """``blocks [..., d, k, k]`` times ``v [..., D]``, block by block."""
  out = jnp.einsum(
    "...ij,...j->...i", blocks, structure.to_blocks(v), precision=lax.Precision.HIGHEST
  )
  return structure.from_blocks(out)


def _cumulative_products(jac):
  """``P_t = J_t ⋯ J_0`` along axis 1 of ``jac [B, T, d, k, k]``."""
  if jac.shape[-1] == 1:
    return jnp.cumprod(jac, axis=1)
  later_times_earlier = lambda a, b: jnp.matmul(b, a, precision=lax.Precision.HIGHEST)
  return lax.associative_scan(later_times_earlier, jac, axis=1)


def _incoming_delta(structure, transfer, last, axis_name: str, reverse: bool):
  """The δ entering this shard, composed serially from every shard's ``(Φ_s, δ̂_last,s)``.

  Args:
    structure: the Jacobian structure.
    transfer: ``Φ_s [B, d, k, k]``, the product of this shard's Jacobians.
    last: ``δ̂_last,s [B, D]``, this shard's local solution at its last step.
    axis_name: the sequence axis.
    reverse: the recurrence runs from the last shard to the first.

  Returns:
    ``δ_in,s [B, D]``.
  """
  transfers = lax.all_gather(transfer, axis_name)
  lasts = lax.all_gather(last, axis_name)
  index = lax.axis_index(axis_name)
  if reverse:
    transfers, lasts = jnp.flip(transfers, 0), jnp.flip(lasts, 0)
    index = lax.axis_size(axis_name) - 1 - index

  def step(delta_in, shard):
    transfer, last = shard
    return _apply(structure, transfer, delta_in) + last, delta_in

  _, incoming = lax.scan(step, jnp.zeros_like(last), (transfers, lasts))
  return incoming[index]


def _sharded_linear_solve(structure, jac, rhs, axis_name: str, *, reverse: bool = False):
  """``δ_t = J_t δ_{t∓1} + r_t`` from ``δ = 0`` before the global first (last) step.

  Local solve from a zero incoming δ, then the boundary fix-up ``δ_t += P_t δ_in`` (module
  docstring, steps 2–3). ``jac [B, T/n, d, k, k]`` and ``rhs [B, T/n, D]`` are this shard's.
  """
  flip = lambda x: jnp.flip(x, axis=1) if reverse else x
  jac, rhs = flip(jac), flip(rhs)
  delta = solve_linear_recurrence(jac, rhs, structure)
  products = _cumulative_products(jac)
  delta_in = _incoming_delta(structure, products[:, -1], delta[:, -1], axis_name, reverse)
  return flip(delta + _apply(structure, products, delta_in[:, None]))


# ----------------------------------------------------------------------------------------------
# Per-shard Newton iteration and adjoint.


def _global_max(x, axis_name: str):
  """Max over the shards of ``axis_name``; NaN if any shard's is NaN (an all-reduce max may
  drop NaN, so the NaN flag is reduced on its own)."""
  nan = lax.pmax(jnp.isnan(x).astype(jnp.int32), axis_name) > 0
  return jnp.where(nan, jnp.nan, lax.pmax(jnp.where(jnp.isnan(x), -jnp.inf, x), axis_name))


def _residual(f, h, cfg: _Config):
  """Per-sequence ``max_t ‖h_t - f(h_{t-1}, x_t)‖_∞`` over all shards, and the convergence test
  of ``newton_rnn``: finite and ``≤ tol·max(1, max|h|)``."""
  residual = _global_max(max_residual(f, h), cfg.axis_name)
  scale = _global_max(state_scale(h), cfg.axis_name)
  return residual, is_converged(residual, scale, cfg.tol)


def _any_sequence(flags, cfg: _Config):
  """True on every device if ``flags [B/shards]`` (equal over the sequence axis) holds for some
  sequence of any batch shard: a predicate every device agrees on, as loops and conds around
  collectives need."""
  found = jnp.any(flags).astype(jnp.int32)
  return (lax.pmax(found, cfg.batch_axes) if cfg.batch_axes else found) > 0


def _shard_by_shard(solve_from, hand_over, start, cfg: _Config):
  """The exact sequential result over the sharded time axis, by rounds.

  Each round every shard runs ``solve_from(incoming)`` on its own steps, then ``hand_over``
  passes the boundary of the result to the next shard in the direction of the recurrence; after
  round ``r`` the first ``r + 1`` shards in that direction started from exact values, so ``n``
  rounds (``T`` sequential steps of wall time on every device) give the sequential solution.
  """
  rounds = cfg.mesh.shape[cfg.axis_name] - 1
  incoming = lax.fori_loop(0, rounds, lambda _, inc: hand_over(solve_from(inc)), start)
  return solve_from(incoming)


def _newton_shard(cell, cfg: _Config, params, xs, h0):
  """One shard's view of the Newton solve: ``(h [B, T/n, D], (iterations, residual, conv))``."""
  axis, structure = cfg.axis_name, cfg.structure
  linearize = lambda h: linearize_cell(cell, structure, params, _previous_states(h, h0, axis), xs)
  # Initial guess h_t = f(0, x_t) (ParaRNN eq. A.1), except the global first step f(h0, x_0).
  first = lax.axis_index(axis) == 0
  zeros = jnp.zeros((*h0.shape[:1], jax.tree.leaves(xs)[0].shape[1], h0.shape[1]), h0.dtype)
  h = batched_cell(cell)(params, shift_states(zeros, jnp.where(first, h0, 0.0)), xs)
  f, jac = linearize(h)
  residual, converged = _residual(f, h, cfg)

  # As in newton_rnn: a non-finite iterate stops iterating (it cannot recover) and falls back.
  pending = lambda residual, converged: jnp.isfinite(residual) & ~converged

  def cond(state):
    step, _, _, _, residual, converged, _ = state
    return (step < cfg.max_iters) & _any_sequence(pending(residual, converged), cfg)

  def body(state):
    step, h, f, jac, residual, converged, iterations = state
    active = pending(residual, converged)
    if cfg.damping is not None:
      jac = damp_jacobian(jac, cfg.damping)
    delta = _sharded_linear_solve(structure, jac, f - h, axis)
    # Converged (and failed) sequences keep their iterate bit for bit.
    h = jnp.where(active[:, None, None], h + delta, h)
    f, jac = linearize(h)
    return step + 1, h, f, jac, *_residual(f, h, cfg), iterations + active

  iterations = jnp.zeros_like(residual, jnp.int32)
  state = (jnp.int32(0), h, f, jac, residual, converged, iterations)
  _, h, _, _, residual, converged, iterations = lax.while_loop(cond, body, state)
  fallback = jnp.zeros_like(converged)
  if cfg.fallback == "sequential":
    fallback = ~converged
    first = lax.axis_index(axis) == 0
    exact = lambda: _shard_by_shard(
      lambda h_in: scan_states(cell, params, xs, h_in),
      lambda h: jnp.where(first, h0, _from_left(h[:, -1], axis)),
      h0,
      cfg,
    )
    h = lax.cond(
      _any_sequence(fallback, cfg),
      lambda: jnp.where(fallback[:, None, None], exact(), h),
      lambda: h,
    )
  return h, (iterations, residual, converged, fallback)


def _adjoint_shard(cell, cfg: _Config, params, xs, h0, h, dh):
  """One shard's adjoint (module docstring): ``(dparams, dxs [B, T/n, ...], dh0 [B, D])``."""
  axis, structure = cfg.axis_name, cfg.structure
  h_prev = _previous_states(h, h0, axis)
  _, jac = linearize_cell(cell, structure, params, h_prev, xs)
  jac_t = jnp.swapaxes(jac, -1, -2)
  # λ_t needs J_{t+1}ᵀ: shift left by one; the last step takes the right neighbour's first
  # Jacobian (zeros after the global last step).
  jac_t = jnp.concatenate([jac_t[:, 1:], _from_right(jac_t[:, :1], axis)], axis=1)
  lam = _sharded_linear_solve(structure, jac_t, dh, axis, reverse=True)
  if cfg.fallback == "sequential":
    # λ entering a shard from the right enters through its last step: λ_last = J_{t+1}ᵀ λ_in
    # + ∂L/∂h_last, a sequential reverse solve from there.
    def solve_from(lam_in):
      rhs = dh.at[:, -1].add(_apply(structure, jac_t[:, -1], lam_in))
      return solve_linear_recurrence(jac_t, rhs, structure, reverse=True, method="sequential")

    bad = lax.pmax((~all_finite(lam)).astype(jnp.int32), axis) > 0
    exact = lambda: _shard_by_shard(
      solve_from, lambda lam: _from_right(lam[:, 0], axis), jnp.zeros_like(dh[:, 0]), cfg
    )
    lam = lax.cond(
      _any_sequence(bad, cfg), lambda: jnp.where(bad[:, None, None], exact(), lam), lambda: lam
    )
  _, pullback = jax.vjp(batched_cell(cell), params, h_prev, xs)
  dparams, dh_prev, dxs = pullback(lam.astype(h.dtype))
  # Each shard holds its own steps' (and batch rows') share of the parameter gradient.
  dparams = lax.psum(dparams, (axis, *cfg.batch_axes))
  dh0 = jnp.where(lax.axis_index(axis) == 0, dh_prev[:, 0], 0.0)
  return dparams, dxs, lax.psum(dh0, axis)


# ----------------------------------------------------------------------------------------------
# Global arrays: placement, shard_maps and the custom VJP.


def _place(cfg: _Config, tree, spec: P):
  """Puts ``tree`` on ``spec``: ``jax.reshard`` on an ``Explicit`` mesh (``shard_map`` requires
  matching input shardings there), a sharding constraint on an ``Auto`` one."""
  sharding = jax.NamedSharding(cfg.mesh, spec)
  if cfg.mesh.axis_types[cfg.mesh.axis_names.index(cfg.axis_name)] == AxisType.Explicit:
    return jax.reshard(tree, sharding)
  return lax.with_sharding_constraint(tree, sharding)


def _shard_map(fn, cfg: _Config, in_specs, out_specs):
  # check_vma=False: the linear solves dispatch diagonal systems to `linear_scan`, whose "auto"
  # method is a pallas_call on TPU, and a pallas_call inside shard_map fails the varying-axes
  # check (jax_stack.md §3); the shared linearization and scan helpers also build invariant
  # constants (tangents, zero carries) that the check would reject. Replication is instead
  # ensured by hand: every output declared replicated comes from a psum, pmax or all_gather.
  return jax.shard_map(fn, mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _forward(cell, cfg: _Config, params, xs, h0):
  seq, batch = cfg.sequence_spec, cfg.batch_spec
  run = _shard_map(
    functools.partial(_newton_shard, cell, cfg),
    cfg,
    in_specs=(P(), seq, batch),
    out_specs=(seq, (batch, batch, batch, batch)),
  )
  return run(params, xs, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sharded_solve(cell, cfg, params, xs, h0):
  return _forward(cell, cfg, params, xs, h0)


def _sharded_solve_fwd(cell, cfg, params, xs, h0):
  h, stats = _forward(cell, cfg, params, xs, h0)
  return (h, stats), (params, xs, h0, h)


def _sharded_solve_bwd(cell, cfg, res, cotangents):
  params, xs, h0, h = res
  seq, batch = cfg.sequence_spec, cfg.batch_spec
  run = _shard_map(
    functools.partial(_adjoint_shard, cell, cfg),
    cfg,
    in_specs=(P(), seq, batch, seq, seq),
    out_specs=(P(), seq, batch),
  )
  dparams, dxs, dh0 = run(params, xs, h0, h, _place(cfg, cotangents[0], seq))
  finite = all_finite(dh0) & tree_all_finite(dxs, h0.shape[0])
  params_finite = jnp.all(tree_all_finite(dparams))
  warn = functools.partial(warn_nonfinite_gradient, name="newton_rnn_sharded")
  lax.cond(
    jnp.all(finite) & params_finite,
    lambda: None,
    lambda: jax.debug.callback(warn, *_place(cfg, (finite, params_finite), P())),
  )
  return dparams, dxs, dh0


_sharded_solve.defvjp(_sharded_solve_fwd, _sharded_solve_bwd)


_warn_sharded_unconverged = functools.partial(warn_unconverged, name="newton_rnn_sharded")


@jit_per_cell
def _solve(cell, cfg, params, xs, h0):
  params = _place(cfg, params, P())
  xs = _place(cfg, xs, cfg.sequence_spec)
  h0 = _place(cfg, h0, cfg.batch_spec)
  h, stats = _sharded_solve(cell, cfg, params, xs, h0)
  if cfg.fallback is None:
    # Replicated first: the host callback reads them from one device, and runs only when a
    # sequence did not converge (diagnostics carry no gradient).
    converged, residual = _place(cfg, lax.stop_gradient((stats[2], stats[1])), P())
    lax.cond(
      jnp.all(converged),
      lambda: None,
      lambda: jax.debug.callback(_warn_sharded_unconverged, converged, residual),
    )
  return h, stats


# ----------------------------------------------------------------------------------------------
# Public entry point.


def newton_rnn_sharded(
  cell: Cell,
  params,
  xs: RNNInputs,
  h0: RNNState,
  *,
  mesh: Mesh,
  axis_name: str = "sequence",
  batch_axes: str | tuple[str, ...] | None = None,
  jacobian: Literal["auto"] | JacobianKind | JacobianStructure = "auto",
  max_iters: int | None = None,
  tol: float | None = None,
  damping: float | None = None,
  fallback: Fallback = "sequential",
) -> tuple[RNNStates, NewtonInfo]:
  """``jaxrec.ops.newton_rnn`` with the time axis sharded over the mesh axis ``axis_name``.

  Same cell contract, Jacobian structures, defaults, convergence test, fallback and adjoint
  gradients as ``newton_rnn``; the algorithm is in the module docstring. Each of the ``n``
  shards holds ``T/n`` steps; per iteration it exchanges one halo state (``ppermute``), the ``n``
  small ``(transfer, last δ)`` pairs (``all_gather``) and per-sequence residuals (``pmax``), and
  keeps the cumulative Jacobian products next to the Jacobians (twice their memory).

  Args:
    cell: ``(params, h_prev [D], x_t) -> h_t [D]``.
    params: parameter pytree, replicated on every device.
    xs: inputs, a pytree of ``[B, T, ...]`` arrays; ``T`` a multiple of the size of
      ``axis_name``, ``B`` of the product of the sizes of ``batch_axes``.
    h0: initial state ``[B, D]``, floating.
    mesh: the device mesh. Inputs are resharded onto it; on an ``Explicit`` mesh take
      gradients under ``jax.jit`` or ``jax.set_mesh(mesh)`` (eager ``jax.grad`` cannot place
      its seed on a mesh-sharded loss).
    axis_name: the mesh axis over which time is split.
    batch_axes: mesh axis or axes over which ``B`` is split, or ``None`` (replicated).
    jacobian: ``"auto" | "diagonal" | "block" | "dense"`` or a ``JacobianStructure``, as in
      ``newton_rnn``.
    max_iters: Newton iterations at most; default 10 (fp32) or 16 (fp64).
    tol: absolute residual tolerance, scaled by ``max(1, max|h|)``; default 1e-6 (fp32) or
      1e-12 (fp64).
    damping: ``None`` or ``λ ≥ 0`` for ``newton_core.damp_jacobian``.
    fallback: ``"sequential"`` recomputes the unconverged (or non-finite) sequences exactly,
      shard after shard (module docstring), and likewise a non-finite adjoint in the backward
      pass; ``None`` returns the last iterate, reported in ``info`` and by a ``RuntimeWarning``
      when a sequence did not converge. A non-finite gradient always warns.

  Returns:
    ``(h, info)``: ``h [B, T, D]`` sharded like ``xs`` and the ``NewtonInfo`` diagnostics.
  """
  batch, t, _ = validate_newton_args(
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
  batch_axes = _check_mesh(mesh=mesh, axis_name=axis_name, batch_axes=batch_axes, batch=batch, t=t)
  structure = resolve_jacobian(jacobian, cell, params, xs, h0)
  tol = default_tol(h0.dtype) if tol is None else tol
  cfg = _Config(
    structure=structure,
    mesh=mesh,
    axis_name=axis_name,
    batch_axes=batch_axes,
    max_iters=default_max_iters(h0.dtype) if max_iters is None else max_iters,
    tol=tol,
    damping=None if damping is None else float(damping),
    fallback=fallback,
  )
  h, (iterations, residual, converged, fell_back) = _solve(cell, cfg, params, xs, h0)
  return h, NewtonInfo(iterations, residual, converged, fell_back, structure, tol)


def _check_mesh(*, mesh, axis_name, batch_axes, batch, t) -> tuple[str, ...]:
  """Checks the mesh axes and that they divide ``B`` and ``T``; returns ``batch_axes``."""
  if axis_name not in mesh.axis_names:
    raise ValueError(
      f"axis_name: expected one of the mesh axes {mesh.axis_names}, got {axis_name!r}"
    )
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  if any(a not in mesh.axis_names or a == axis_name for a in batch_axes):
    raise ValueError(
      f"batch_axes: expected mesh axes other than {axis_name!r} among {mesh.axis_names}, got "
      f"{batch_axes}"
    )
  kinds = {mesh.axis_types[mesh.axis_names.index(a)] for a in (axis_name, *batch_axes)}
  if len(kinds) > 1:
    raise ValueError(
      f"mesh: expected {axis_name!r} and batch_axes {batch_axes} of one axis type, got {kinds}"
    )
  shards = mesh.shape[axis_name]
  if t % shards:
    raise ValueError(
      f"xs: expected T divisible by the {shards} shards of mesh axis {axis_name!r}, got T={t}"
    )
  batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if batch % batch_shards:
    raise ValueError(
      f"h0: expected B divisible by the {batch_shards} shards of batch_axes {batch_axes}, got "
      f"B={batch}"
    )
  return batch_axes
