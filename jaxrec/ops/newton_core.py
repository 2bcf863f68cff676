"""The pieces of a Newton-parallel RNN solve that do not depend on how the iteration is driven.

Axes (``jaxrec.typing``): ``B`` batch, ``T`` time, ``D = k·d`` state width (``d`` blocks of
``k×k``). ``jaxrec.ops.newton.newton_rnn`` drives the iteration on one device and
``jaxrec.ops.newton_sharded.newton_rnn_sharded`` over a sequence-sharded mesh; both, and the fused
kernel's caller, take everything they share from here, under public names:

* Options and defaults: the ``JacobianKind``, ``SolveMethod`` and ``Fallback`` literals,
  ``default_tol`` / ``default_max_iters``, ``parse_jacobian``, ``validate_newton_args``, and
  ``jit_per_cell`` (one compilation per cell).
* ``JacobianStructure`` / ``detect_jacobian_structure`` / ``resolve_jacobian``: the sparsity of
  ``J_t = ∂f/∂h_{t-1}`` (diagonal, ``k×k`` blocks in a stacked or interleaved layout, dense),
  given or found by probing ``jax.jacfwd`` of the cell.
* ``linearize_cell``: ``f(h_{t-1}, x_t)`` and the Jacobian blocks at every step from ``k``
  structured JVPs (ParaRNN's block-diagonal autograd default, arXiv 2510.21450 App. D);
  ``damp_jacobian``; ``batched_cell`` and ``shift_states``.
* ``solve_linear_recurrence``: ``δ_t = J_t δ_{t∓1} + r_t`` — ``jaxrec.ops.linear_scan`` for
  diagonals, a sequential, chunked or associative scan over ``k×k`` products for blocks.
* The convergence test (``max_residual``, ``state_scale``, ``is_converged``, ``nan_max``), the
  finiteness checks (``all_finite``, ``tree_all_finite``), the reference ``scan_states``, the
  diagnostics ``NewtonInfo`` and the host-side warnings.
"""

import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.ops import _checks, _dispatch
from jaxrec.ops.scan import linear_scan
from jaxrec.typing import RNNInputs, RNNState, RNNStates

# The logger of newton_rnn, whose entry point users configure.
_log = logging.getLogger("jaxrec.ops.newton")

JacobianKind = Literal["diagonal", "block", "dense"]
JacobianLayout = Literal["stacked", "interleaved"]
# The linear solver of every Newton step (``solve_linear_recurrence``, ``scan_method``).
SolveMethod = Literal["auto", "associative", "chunk", "sequential"]
Fallback = Literal["sequential", None]
JACOBIANS = ("auto", *get_args(JacobianKind))
LAYOUTS = get_args(JacobianLayout)
SOLVE_METHODS = get_args(SolveMethod)
FALLBACKS = get_args(Fallback)

Cell = Callable[..., jax.Array]


def default_tol(dtype) -> float:
  """The absolute residual tolerance for states of ``dtype``: 1e-12 for fp64 (well above its
  round-off, below any fp32 comparison), else about 8 ulp of a unit-size state (1e-6 for fp32,
  the round-off floor of one cell evaluation; 8 ulp of their own for half precision)."""
  if jnp.dtype(dtype) == jnp.float64:
    return 1e-12
  return max(1e-6, 8 * float(jnp.finfo(dtype).eps))


def default_max_iters(dtype) -> int:
  """Newton iterations at most: 10, or 16 for fp64 (about one doubling of correct digits more).
  Contractive cells reach fp32 round-off in 3–4 (ParaRNN App. A); the spare iterations cover
  harder cells before the fallback."""
  return 16 if jnp.dtype(dtype) == jnp.float64 else 10


def jit_per_cell(solve: Callable) -> Callable:
  """``solve(cell, cfg, *arrays)`` under ``jax.jit`` with the cell and the config static, so a
  cell defined once compiles once; an unhashable cell (a closure over arrays) runs it unjitted."""
  jitted = jax.jit(solve, static_argnums=(0, 1))

  def run(cell, cfg, *arrays):
    try:
      hash(cell)
    except TypeError:
      return solve(cell, cfg, *arrays)
    return jitted(cell, cfg, *arrays)

  return run


def step_structs(xs: RNNInputs):
  """One time step of ``xs`` as ``jax.ShapeDtypeStruct`` s (the ``x_t`` a cell sees)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[2:], jnp.result_type(x)), xs)


# ----------------------------------------------------------------------------------------------
# Jacobian structure.


@dataclasses.dataclass(frozen=True)
class JacobianStructure:
  """Sparsity of ``J = ∂f/∂h_prev`` for a state of width ``D = k·d``: ``d`` blocks of ``k×k``.

  Attributes:
    kind: ``"diagonal"`` (``k = 1``), ``"block"`` or ``"dense"`` (``k = D``, one block).
    block_size: ``k``; ignored for ``"diagonal"`` and ``"dense"``.
    layout: where component ``a`` of block ``i`` sits in the state. ``"stacked"``: at
      ``a·d + i``, i.e. the state is ``k`` stacked vectors such as the ParaLSTM ``[c; h]`` whose
      blocks pair ``(c_i, h_i)``; ``"interleaved"``: at ``i·k + a`` (adjacent pairs, e.g. complex
      or rotation states).
  """

  kind: JacobianKind
  block_size: int = 1
  layout: JacobianLayout = "stacked"

  def __post_init__(self):
    _checks.check_choice("jacobian kind", self.kind, get_args(JacobianKind))
    _checks.check_choice("jacobian layout", self.layout, LAYOUTS)
    if self.kind == "block" and (not isinstance(self.block_size, int) or self.block_size < 1):
      raise ValueError(f"jacobian block_size: expected a positive int, got {self.block_size!r}")

  def __str__(self) -> str:
    if self.kind == "block":
      return f"block({self.block_size}x{self.block_size}, {self.layout})"
    return self.kind

  def k(self, width: int) -> int:
    """Block size for a state of width ``D``."""
    return {"diagonal": 1, "dense": width}.get(self.kind, self.block_size)

  def to_blocks(self, x: jax.Array) -> jax.Array:
    """``[..., D] -> [..., d, k]``."""
    k = self.k(x.shape[-1])
    d = x.shape[-1] // k
    if self.layout == "interleaved":
      return x.reshape(*x.shape[:-1], d, k)
    return jnp.swapaxes(x.reshape(*x.shape[:-1], k, d), -1, -2)

  def from_blocks(self, x: jax.Array) -> jax.Array:
    """``[..., d, k] -> [..., D]``."""
    if self.layout == "interleaved":
      return x.reshape(*x.shape[:-2], -1)
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)

  def tangents(self, width: int, dtype) -> jax.Array:
    """``[k, D]``: tangent ``a`` is one on component ``a`` of every block, zero elsewhere, so
    its JVP is column ``a`` of every block (the entries it mixes are structurally zero)."""
    k = self.k(width)
    eye = jnp.eye(k, dtype=dtype)[:, None, :]  # [k (tangent), 1 (block), k (component)]
    return self.from_blocks(jnp.broadcast_to(eye, (k, width // k, k)))

  def mask(self, width: int) -> np.ndarray:
    """Boolean ``[D, D]``: where ``J`` may be nonzero."""
    k = self.k(width)
    idx = np.arange(width)
    block = idx // k if self.layout == "interleaved" else idx % (width // k)
    return block[:, None] == block[None, :]


def parse_jacobian(
  jacobian: Literal["auto"] | JacobianKind | JacobianStructure,
) -> JacobianStructure | None:
  """The explicit structure named by ``jacobian``; ``None`` for ``"auto"``."""
  if isinstance(jacobian, JacobianStructure):
    return jacobian
  if jacobian not in JACOBIANS:
    raise ValueError(
      f"jacobian: expected one of {JACOBIANS} or a JacobianStructure, got {jacobian!r}"
    )
  if jacobian == "auto":
    return None
  # "block" without a size is the ParaLSTM case: a [c; h] state with 2×2 blocks.
  return JacobianStructure(jacobian, 2 if jacobian == "block" else 1)


def resolve_jacobian(
  jacobian: Literal["auto"] | JacobianKind | JacobianStructure,
  cell: Cell,
  params,
  xs: RNNInputs,
  h0: RNNState,
) -> JacobianStructure:
  """The structure named by ``jacobian``, or the detected one for ``"auto"``; its blocks must
  divide the state width ``D``."""
  structure = parse_jacobian(jacobian)
  if structure is None:
    structure = detect_jacobian_structure(cell, params, step_structs(xs), h0[0])
  width = h0.shape[-1]
  if width % structure.k(width):
    raise ValueError(
      f"jacobian: block size {structure.k(width)} does not divide the state width D={width}"
    )
  return structure


def detect_jacobian_structure(cell: Cell, params, x_t, h_t, *, num_points: int = 3):
  """Finds the sparsity of ``∂cell/∂h_prev`` by probing ``jax.jacfwd``.

  The pattern is the union of the nonzeros (and NaNs) of the Jacobian at ``num_points`` random
  points where ``h``, ``x`` *and every floating leaf of* ``params`` are standard normal. Random
  parameters make this the *structural* pattern, valid for every parameter value: an entry that
  is zero only because a weight happens to be zero (a zero-initialized recurrent matrix) still
  counts, since training will change it. Non-floating leaves are probed as zeros. The smallest
  fitting structure wins: diagonal, then ``k×k`` blocks for increasing divisors ``k`` of ``D`` in
  either layout, then dense. Runs eagerly (also under ``jit``) and is cached per cell and shapes.

  Args:
    cell: ``cell(params, h_prev [D], x_t) -> h_t [D]``.
    params: parameter pytree (arrays or tracers; only shapes and dtypes are used).
    x_t: one step of input, a pytree of arrays or ``jax.ShapeDtypeStruct`` without ``B, T``.
    h_t: one state ``[D]`` (array or ``jax.ShapeDtypeStruct``).
    num_points: random probe points.

  Returns:
    The detected ``JacobianStructure``.
  """
  spec = lambda tree: jax.tree.map(
    lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), tree
  )
  leaves, treedef = jax.tree.flatten(spec((params, x_t, h_t)))
  try:
    hash(cell)
    detect = _detect_cached
  except TypeError:  # an unhashable cell is probed on every call
    detect = _detect_cached.__wrapped__
  return detect(cell, treedef, tuple(leaves), num_points)


@functools.lru_cache(maxsize=128)
def _detect_cached(cell, treedef, leaves, num_points) -> JacobianStructure:
  rng = np.random.default_rng(0)

  def draw(leaf):
    shape = (num_points, *leaf.shape)
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return rng.standard_normal(shape).astype(leaf.dtype)
    return np.zeros(shape, leaf.dtype)

  params, x_t, h_t = jax.tree.unflatten(treedef, [draw(leaf) for leaf in leaves])
  with jax.ensure_compile_time_eval():
    jac = jax.jit(jax.vmap(jax.jacfwd(cell, argnums=1)))(params, h_t, x_t)
  jac = np.asarray(jac)
  pattern = np.any((jac != 0) | np.isnan(jac), axis=0)
  width = pattern.shape[0]
  candidates = [JacobianStructure("diagonal")] + [
    JacobianStructure("block", k, layout)
    for k in range(2, width)
    if width % k == 0
    for layout in LAYOUTS
  ]
  found = next(
    (s for s in candidates if not np.any(pattern & ~s.mask(width))), JacobianStructure("dense")
  )
  _log.info("newton_rnn: detected a %s Jacobian (D=%d) for cell %r", found, width, cell)
  return found


# ----------------------------------------------------------------------------------------------
# Linearization and the linear step.


def batched_cell(cell: Cell) -> Cell:
  """The per-step cell mapped over ``[B, T]`` (``h_prev [B, T, D]``, ``xs [B, T, ...]``)."""
  over_t = jax.vmap(cell, in_axes=(None, 0, 0))
  return jax.vmap(over_t, in_axes=(None, 0, 0))


def shift_states(h: RNNStates, h0: RNNState) -> RNNStates:
  """``h_prev [B, T, D]``: ``h0`` followed by ``h_0 … h_{T-2}``."""
  return jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)


def linearize_cell(cell: Cell, structure: JacobianStructure, params, h_prev, xs):
  """``f(h_prev_t, x_t)`` and its Jacobian blocks at every step, from ``k`` JVPs.

  Args:
    cell: per-step cell ``(params, h [D], x_t) -> h [D]``.
    structure: Jacobian structure with ``k×k`` blocks (``k = 1`` diagonal, ``k = D`` dense).
    params: parameter pytree.
    h_prev: ``[B, T, D]``.
    xs: ``[B, T, ...]`` pytree.

  Returns:
    ``(f, jac)``: ``f [B, T, D]`` and ``jac [B, T, d, k, k]`` with ``jac[..., i, a, b]`` the
    derivative of component ``a`` of block ``i`` of the output w.r.t. component ``b`` of the input.
  """
  width = h_prev.shape[-1]
  f, jvp = jax.linearize(lambda hp: batched_cell(cell)(params, hp, xs), h_prev)
  basis = structure.tangents(width, h_prev.dtype)
  columns = jax.vmap(jvp)(jnp.broadcast_to(basis[:, None, None], (len(basis), *h_prev.shape)))
  return f, jnp.moveaxis(structure.to_blocks(columns), 0, -1)


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


def _matmul(a, b):
  # Highest precision: TF32/bf16 passes would cap the solve far above the fp32 tolerance.
  return jnp.einsum("...ij,...jk->...ik", a, b, precision=lax.Precision.HIGHEST)


def _block_combine(x, y):
  """(A1, b1) then (A2, b2): δ -> A2 (A1 δ + b1) + b2."""
  return _matmul(y[0], x[0]), _matmul(y[0], x[1]) + y[1]


def _block_sequential(jac, rhs):
  step = lambda h, ab: (_matmul(ab[0], h) + ab[1],) * 2
  elems = (jnp.moveaxis(jac, 1, 0), jnp.moveaxis(rhs, 1, 0))
  _, out = lax.scan(step, jnp.zeros_like(rhs[:, 0]), elems)
  return jnp.moveaxis(out, 0, 1)


def _block_chunked(jac, rhs):
  """Sequential inside chunks of ``C ≈ √T`` steps (all chunks at once), then over the chunk
  carries, then one correction ``δ = δ_local + (A_t ⋯ A_start) δ_in``: ``T/C + C`` sequential
  steps, the block analogue of ``linear_scan(method="chunk")``."""
  batch, t = jac.shape[:2]
  c = max(8, 2 ** round(math.log2(max(math.sqrt(t), 1))))
  n = -(-t // c)
  eye = jnp.broadcast_to(jnp.eye(jac.shape[-1], dtype=jac.dtype), jac.shape[2:])
  pad = n * c - t
  jac = jnp.concatenate([jac, jnp.broadcast_to(eye, (batch, pad, *eye.shape))], axis=1)
  rhs = jnp.pad(rhs, ((0, 0), (0, pad)) + ((0, 0),) * (rhs.ndim - 2))
  # [C, B, n, ...]: the within-chunk step leads so one lax.scan covers every chunk.
  chunks = lambda x: jnp.moveaxis(x.reshape(batch, n, c, *x.shape[2:]), 2, 0)

  def local(carry, ab):
    h, prod = carry
    carry = (_matmul(ab[0], h) + ab[1], _matmul(ab[0], prod))
    return carry, carry

  start = (jnp.zeros_like(rhs[:, :n]), jnp.broadcast_to(eye, (batch, n, *eye.shape)))
  _, (h_loc, prod) = lax.scan(local, start, (chunks(jac), chunks(rhs)))

  def carry_step(h, ab):
    return _matmul(ab[0], h) + ab[1], h  # emit the state entering this chunk

  totals = (jnp.moveaxis(prod[-1], 1, 0), jnp.moveaxis(h_loc[-1], 1, 0))
  _, h_in = lax.scan(carry_step, jnp.zeros_like(h_loc[0, :, 0]), totals)  # [n, B, d, k, 1]
  h = h_loc + _matmul(prod, jnp.moveaxis(h_in, 0, 1)[None])
  return jnp.moveaxis(h, 0, 2).reshape(batch, n * c, *h.shape[3:])[:, :t]


def _block_associative(jac, rhs):
  return lax.associative_scan(_block_combine, (jac, rhs), axis=1)[1]


_BLOCK_FORMS = {
  "sequential": _block_sequential,
  "chunk": _block_chunked,
  "associative": _block_associative,
}


def solve_linear_recurrence(
  jac: jax.Array,
  rhs: RNNStates,
  structure: JacobianStructure,
  *,
  reverse: bool = False,
  method: SolveMethod = "auto",
) -> RNNStates:
  """Solves ``δ_t = J_t δ_{t∓1} + r_t`` from ``δ = 0`` (the Newton or the adjoint step).

  Args:
    jac: ``[B, T, d, k, k]`` blocks as returned by ``linearize_cell``.
    rhs: ``[B, T, D]``.
    structure: the structure ``jac`` was built with.
    reverse: run from ``t = T-1`` down to 0 (``δ_t = J_t δ_{t+1} + r_t``).
    method: ``"auto" | "associative" | "chunk" | "sequential"``. Diagonal systems go to
      ``jaxrec.ops.linear_scan`` (whose ``"auto"`` picks the backend's fastest form). ``k×k``
      blocks use the same forms over matrix products, ``"auto"`` being ``"chunk"`` on CPU and
      ``"associative"`` (O(log T) depth) on accelerators; O(T·d·k³) work and O(T·d·k²) memory,
      so O(T·D³) and O(T·D²) for dense Jacobians.

  Returns:
    ``δ [B, T, D]``.
  """
  if jac.shape[-1] == 1:
    a = structure.from_blocks(jac[..., 0])
    return linear_scan(a, rhs, reverse=reverse, method=method)[0]
  if reverse:
    flip = lambda x: jnp.flip(x, axis=1)
    return flip(solve_linear_recurrence(flip(jac), flip(rhs), structure, method=method))
  if method == "auto":
    method = "chunk" if _dispatch.default_backend() == "cpu" else "associative"
  out = _BLOCK_FORMS[method](jac, structure.to_blocks(rhs)[..., None])
  return structure.from_blocks(out[..., 0])


# ----------------------------------------------------------------------------------------------
# Convergence, finiteness and the reference solve.


def nan_max(x: jax.Array, axis) -> jax.Array:
  """``jnp.max`` that returns NaN wherever a reduced entry is NaN.

  XLA's max reductions are free to skip NaN operands (on CPU, inside a ``while_loop``, an
  all-NaN row reduces to ``-inf``), so a residual of a diverged iterate would read as ``-inf``:
  below any tolerance. This one is a real maximum.
  """
  return jnp.where(jnp.any(jnp.isnan(x), axis=axis), jnp.nan, jnp.max(x, axis=axis))


def max_residual(f: RNNStates, h: RNNStates) -> jax.Array:
  """Per sequence ``max_t ‖h_t - f(h_{t-1}, x_t)‖_∞``, ``[B]``: NaN if any entry is NaN, ``inf``
  if one is infinite (an infinite ``h_t`` or ``f_t`` gives ``inf`` or ``inf - inf = NaN``)."""
  return nan_max(jnp.abs(f - h), axis=(1, 2))


def state_scale(h: RNNStates) -> jax.Array:
  """Per sequence ``max |h|``, ``[B]``: what the tolerance is relative to (above 1)."""
  return jnp.max(jnp.abs(h), axis=(1, 2))


def is_converged(residual: jax.Array, scale: jax.Array, tol: float) -> jax.Array:
  """The convergence test, ``[B]``: ``residual ≤ tol·max(1, scale)`` and finite. A finite
  residual implies finite ``f`` and ``h`` (see ``max_residual``), so a non-finite iterate never
  passes, whatever the scale reads."""
  return jnp.isfinite(residual) & (residual <= tol * jnp.maximum(1.0, scale))


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


def scan_states(cell: Cell, params, xs: RNNInputs, h0: RNNState) -> RNNStates:
  """The reference solve: ``lax.scan`` over time of the cell mapped over the batch,
  ``xs [B, T, ...]``, ``h0 [B, D]`` -> ``h [B, T, D]``."""
  step = jax.vmap(cell, in_axes=(None, 0, 0))

  def body(h, x_t):
    h = step(params, h, x_t)
    return h, h

  _, h = lax.scan(body, h0, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs))
  return jnp.moveaxis(h, 0, 1)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["iterations", "residual", "converged", "fallback"],
  meta_fields=["structure", "tol"],
)
@dataclasses.dataclass(frozen=True)
class NewtonInfo:
  """Diagnostics of a Newton solve, one entry per sequence.

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


# ----------------------------------------------------------------------------------------------
# Argument validation and host-side warnings.


def validate_newton_args(
  cell: Cell,
  params,
  xs: RNNInputs,
  h0: RNNState,
  *,
  jacobian,
  max_iters: int | None,
  tol: float | None,
  damping: float | None,
  fallback: Fallback,
) -> tuple[int, int, int]:
  """Checks the arguments common to the Newton solvers and the cell's output; returns
  ``(B, T, D)``."""
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
  parse_jacobian(jacobian)
  _checks.check_choice("fallback", fallback, FALLBACKS)
  if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
    raise ValueError(f"max_iters: expected an int >= 0, got {max_iters!r}")
  if tol is not None and not (isinstance(tol, int | float) and tol > 0):
    raise ValueError(f"tol: expected a positive float, got {tol!r}")
  if damping is not None and not (isinstance(damping, int | float) and damping >= 0):
    raise ValueError(f"damping: expected None or a float >= 0, got {damping!r}")
  out = jax.eval_shape(cell, params, jax.ShapeDtypeStruct((width,), h0.dtype), step_structs(xs))
  if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != ((width,), h0.dtype):
    got = (out.shape, out.dtype) if isinstance(out, jax.ShapeDtypeStruct) else out
    raise ValueError(
      f"cell: expected an output of shape {(width,)} and dtype {h0.dtype} (those of h0[0]), "
      f"got {got}"
    )
  return batch, t, width


def warn_unconverged(converged, residual, *, name: str = "newton_rnn") -> None:
  """Host-side warning for sequences that stopped unconverged with ``fallback=None``."""
  if np.all(converged):
    return
  bad = np.flatnonzero(~np.asarray(converged))
  warnings.warn(
    f"{name}: {bad.size} of {converged.size} sequences did not converge (batch indices "
    f"{bad[:8].tolist()}, max residual {np.max(residual[bad]):.3g}) and fallback=None returned "
    "the unconverged iterate, as info.converged reports; raise max_iters, set damping or use "
    "fallback='sequential'.",
    RuntimeWarning,
    stacklevel=1,
  )


def warn_nonfinite_gradient(finite, params_finite, *, name: str = "newton_rnn") -> None:
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
