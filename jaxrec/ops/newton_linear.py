"""Jacobian structure, linearization and the linear step of a Newton-parallel RNN solve.

Axes: ``B`` batch, ``T`` time, ``D = k·d`` state width (``d`` blocks of ``k×k``). These are the
pieces of ``jaxrec.ops.newton.newton_rnn`` that do not depend on how the iteration is driven, so
kernels and sequence-parallel solvers reuse them (``jaxrec.ops.newton`` re-exports them):

* ``JacobianStructure`` / ``detect_jacobian_structure``: the sparsity of ``J_t = ∂f/∂h_{t-1}``
  (diagonal, ``k×k`` blocks in a stacked or interleaved layout, dense), given or found by probing
  ``jax.jacfwd`` of the cell.
* ``linearize_cell``: ``f(h_{t-1}, x_t)`` and the Jacobian blocks at every step from ``k``
  structured JVPs (ParaRNN's block-diagonal autograd default, arXiv 2510.21450 App. D).
* ``solve_linear_recurrence``: ``δ_t = J_t δ_{t∓1} + r_t`` — ``jaxrec.ops.linear_scan`` for
  diagonals, a sequential, chunked or associative scan over ``k×k`` products for blocks.
* ``shift_states``: ``h_{t-1}`` for every ``t``.
"""

import dataclasses
import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrec.ops import _dispatch
from jaxrec.ops.scan import linear_scan

# The logger of newton_rnn, whose entry point users configure.
_log = logging.getLogger("jaxrec.ops.newton")

JACOBIANS = ("auto", "diagonal", "block", "dense")
SCAN_METHODS = ("auto", "associative", "chunk", "sequential")
_LAYOUTS = ("stacked", "interleaved")

Cell = Callable[..., jax.Array]


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

  kind: str
  block_size: int = 1
  layout: str = "stacked"

  def __post_init__(self):
    if self.kind not in JACOBIANS[1:]:
      raise ValueError(f"jacobian kind: expected one of {JACOBIANS[1:]}, got {self.kind!r}")
    if self.layout not in _LAYOUTS:
      raise ValueError(f"jacobian layout: expected one of {_LAYOUTS}, got {self.layout!r}")
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


def _as_structure(jacobian) -> JacobianStructure | None:
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
    for layout in _LAYOUTS
  ]
  found = next(
    (s for s in candidates if not np.any(pattern & ~s.mask(width))), JacobianStructure("dense")
  )
  _log.info("newton_rnn: detected a %s Jacobian (D=%d) for cell %r", found, width, cell)
  return found


# ----------------------------------------------------------------------------------------------
# Linearization and the linear step.


def _batched(cell: Cell) -> Cell:
  """The per-step cell mapped over ``[B, T]`` (``h_prev [B, T, D]``, ``xs [B, T, ...]``)."""
  over_t = jax.vmap(cell, in_axes=(None, 0, 0))
  return jax.vmap(over_t, in_axes=(None, 0, 0))


def shift_states(h: jax.Array, h0: jax.Array) -> jax.Array:
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
  f, jvp = jax.linearize(lambda hp: _batched(cell)(params, hp, xs), h_prev)
  basis = structure.tangents(width, h_prev.dtype)
  columns = jax.vmap(jvp)(jnp.broadcast_to(basis[:, None, None], (len(basis), *h_prev.shape)))
  return f, jnp.moveaxis(structure.to_blocks(columns), 0, -1)


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
  jac, rhs, structure: JacobianStructure, *, reverse: bool = False, method: str = "auto"
):
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
