"""The ``pallas_call`` of fused Newton iterations for channel-elementwise cells.

Axes: ``B`` batch, ``T`` time, ``k`` state components per channel (1 diagonal, 2 for ``2×2``
blocks), ``F`` channels, ``P`` flattened non-channel axes of a parameter or input leaf.

Layout. ``ops.py`` hands states over as components ``[B, k, T, F]``, per-step inputs as
``[B, T, P, F]`` and per-channel parameters as ``[P, F]``. One program owns one sequence and one
block of ``Fb`` channels; it walks time in blocks of ``Tb`` steps, each a ``[Tb, Fb]`` tile per
component (time on sublanes, channels on lanes), and runs every Newton iteration on a time block
before moving to the next one. Grid ``(B, F / Fb, T / (nb·Tb))``: batch and channel blocks are
independent; a program takes ``nb`` consecutive time blocks and loops over them (the whole
sequence on GPU, where programs run concurrently; one on TPU and in the interpreter, where the
time axis of the grid is sequential).

Per iteration ``i`` and time block (all ``Tb`` steps at once, elementwise):

1. ``h_prev`` is ``h`` shifted down one step, its first row the iteration-``i`` state at the end
   of the previous time block;
2. ``f = cell(h_prev, x)`` and ``J = ∂f/∂h_prev`` from ``k`` JVPs of the user's cell traced into
   the kernel body (one tangent per component), ``r = f - h``;
3. ``δ_t = J_t δ_{t-1} + r_t`` by a Hillis–Steele scan along the tile's time axis: ``log2 Tb``
   levels of ``(A_t, b_t) ← (A_t A_{t-s}, A_t b_{t-s} + b_t)``, then
   ``δ_t = b_t + A_t δ_in`` with ``δ_in`` the iteration-``i`` ``δ`` at the end of the previous
   block; for ``2×2`` blocks ``A`` is a ``2×2`` matrix of tiles multiplied elementwise;
4. ``h ← h + δ``.

Fusing the iterations. Iteration ``i`` at block ``j`` only needs the iteration-``i`` state and
``δ`` at the end of block ``j - 1`` (causality: nothing later feeds back), so one carry pair
``(h_end, δ_end)`` per iteration level, ``[n, 2, k, Fb]``, lets the blocks be processed in order
with all ``n`` iterations done per block: the tiles of ``x``, ``h``, ``J``, ``r`` never leave the
chip between iterations and the sequence is read once and written once. The carries live in an
output block whose index ignores time, so it stays resident across the sequential time axis
(recurrentgemma's trick; no scratch buffer, which the Triton backend lacks).

Shifts along time are products with a constant ``[Tb, Tb]`` 0/1 shift matrix, which Mosaic
(MXU) and Triton (``tl.dot``) both lower, unlike a sublane roll or a gather; they run at
``HIGHEST`` precision so that fp32 values pass through unrounded. A shift costs ``Tb``
multiply-adds per element on the matrix unit, so the scan of a diagonal system is about
``2·Tb·log2 Tb`` (768 at ``Tb = 64``) per element and iteration there (``2×2``: three times
that), an estimate not yet measured on hardware against the cell's transcendental functions on
the vector unit. Rows before the shift are
filled with ``where`` selects (identity ``A``, zero ``b``), and the last row is read by a masked
sum, both of which lower everywhere. A NaN or inf in a tile leaks into the other rows of its
channel through the 0/1 products (``0·inf = NaN``), so a diverging sequence turns entirely NaN
instead of only from the failing step on; the caller's residual check catches it either way.

Compared with ParaRNN's CUDA (``csrc/parallel_reduction_kernel.h``, fused forward): there, a
thread owns one channel and ``chunk_size`` (2–4) consecutive steps held in registers, solves them
by a Thomas sweep, then reduces across threads with warp shuffles and shared memory and
back-substitutes; the cell and its Jacobian are hand-written CUDA per cell and the iteration
count is compiled in (3). Here the parallel unit is a ``[Tb, Fb]`` tile instead of a thread:
Pallas exposes neither threads nor shuffles, but a whole tile is one value, so the scan is
written over tiles (a Hillis–Steele scan is ``Tb log Tb`` work instead of ParaRNN's ``O(Tb)``,
traded for ``log Tb`` depth without back-substitution; its shifts ride on the matrix unit), and
the cell is any JAX function — its JVP is traced into the kernel, so a new cell needs no kernel
code. Both read the sequence once per call and keep the Jacobians on chip.

Lowering, checked on CPU with ``jit(...).trace(...).lower(lowering_platforms=...)`` (no device
was available to compile or run it): Mosaic TPU lowers the ParaGRU and ParaLSTM cells as written
in the tests; Pallas-Triton lowers the diagonal path when every parameter and input leaf has one
row per channel (``P = 1``, e.g. a tuple of ``[B, T, D]`` projections rather than one
``[B, T, 3, D]``), since it lowers neither value slicing (``u[0]``, the ``[c; h]`` split of a
``2×2`` cell) nor arrays whose size is not a power of 2. Mosaic GPU, the default ``pallas_call``
backend on GPU in JAX >= 0.11, stages whole blocks in shared memory, which a whole-sequence block
overflows, so GPU runs select Triton.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._backend import compiler_params

# Values are lists of 2-D ``[Tb, Fb]`` tiles: ``h[a]`` (component ``a``) and ``jac[a][b]``
# (``∂f_a/∂h_b``). Tiles rather than stacked arrays keep every operation 2-D and free of value
# slicing, which Triton does not lower.


def _rows(shape) -> jax.Array:
  """Row (time) index of a ``[Tb, Fb]`` tile."""
  return lax.broadcasted_iota(jnp.int32, shape, 0)


def _shift(x: jax.Array, s: int) -> jax.Array:
  """``x [Tb, Fb]`` moved ``s`` rows down (row ``t`` gets ``x[t - s]``), zeros on top."""
  tb = x.shape[0]
  shift = (_rows((tb, tb)) - lax.broadcasted_iota(jnp.int32, (tb, tb), 1) == s).astype(x.dtype)
  return jnp.dot(shift, x, precision=lax.Precision.HIGHEST, preferred_element_type=x.dtype)


def _last_row(x: jax.Array) -> jax.Array:
  """``x [Tb, Fb] -> [Fb]``, the row of the last step."""
  return jnp.sum(jnp.where(_rows(x.shape) == x.shape[0] - 1, x, 0), axis=0)


def _matmul(x, y):
  """Product of ``k×k`` matrices of tiles, elementwise over the tiles."""
  k = len(y)
  return [[sum(x[i][c] * y[c][j] for c in range(k)) for j in range(k)] for i in range(k)]


def _matvec(x, v):
  return [sum(x_i[c] * v[c] for c in range(len(v))) for x_i in x]


def _scan(jac, rhs, delta_in):
  """``δ_t = J_t δ_{t-1} + r_t`` over a tile, ``δ_{-1} = δ_in``.

  Args:
    jac: ``k×k`` tiles ``[Tb, Fb]``.
    rhs: ``k`` tiles ``[Tb, Fb]``.
    delta_in: ``k`` rows ``[Fb]``.

  Returns:
    ``δ``, ``k`` tiles ``[Tb, Fb]``.
  """
  k, tb = len(rhs), rhs[0].shape[0]
  a, b = jac, rhs
  # Hillis–Steele: after the level with shift s, (a_t, b_t) composes steps t-2s+1 .. t; rows
  # t < s have nothing before them in the tile and compose with the identity.
  for level in range(math.ceil(math.log2(tb)) if tb > 1 else 0):
    s = 2**level
    head = _rows(rhs[0].shape) < s
    a_prev = [
      [jnp.where(head, float(i == j), _shift(a[i][j], s)) for j in range(k)] for i in range(k)
    ]
    b_prev = [jnp.where(head, 0.0, _shift(b_i, s)) for b_i in b]
    a, b = _matmul(a, a_prev), [x + y for x, y in zip(_matvec(a, b_prev), b)]
  return [x + y for x, y in zip(_matvec(a, [d[None] for d in delta_in]), b)]


def _damp(jac, damping: float):
  """``J / max(1 + λ, ‖J‖_∞)`` per channel and step (``‖·‖_∞``: max row sum)."""
  norm = functools.reduce(jnp.maximum, [sum(jnp.abs(x) for x in row) for row in jac])
  scale = 1.0 / jnp.maximum(1.0 + damping, norm)
  return [[x * scale for x in row] for row in jac]


def _newton_kernel(*refs, cell, n_params, n_xs, num_iters, block_t, blocks, damping):
  """One (batch, channel block, time range) program; see the module docstring."""
  param_refs, refs = refs[:n_params], refs[n_params:]
  x_refs, (h0_ref, h_ref, carry_ref) = refs[:n_xs], refs[n_xs:]
  k = h0_ref.shape[0]

  # program_id is read here: the interpreter does not substitute it inside loop bodies.
  first_block = pl.program_id(2) * blocks

  @pl.when(first_block == 0)
  def _init():
    @pl.loop(0, carry_ref.shape[0])
    def _(i):
      for a in range(k):
        carry_ref[i, 0, a] = h0_ref[a]
        carry_ref[i, 1, a] = jnp.zeros_like(h0_ref[a])

  # Leaves with one row are read as [Fb] / [Tb, Fb]: no reshape needed in the cell.
  params = [ref[0] if ref.shape[0] == 1 else ref[...] for ref in param_refs]

  def time_block(j, _):
    start = pl.multiple_of(j * block_t, block_t)
    rows = pl.ds(start, block_t)
    xs = [ref[rows, 0] if ref.shape[1] == 1 else ref[rows] for ref in x_refs]
    step = lambda h_prev: cell(params, h_prev, xs)
    zero = jnp.zeros((block_t, h0_ref.shape[-1]), h_ref.dtype)
    # Initial guess h_t = f(0, x_t), except at the very first step, h_0 = f(h0, x_0).
    first = (first_block + j) * block_t + _rows(zero.shape) == 0
    h = step([jnp.where(first, h0_ref[a][None], zero) for a in range(k)])

    def iteration(i, h):
      h_prev = [
        jnp.where(_rows(zero.shape) == 0, carry_ref[i, 0, a][None], _shift(h[a], 1))
        for a in range(k)
      ]
      f, jvp = jax.linearize(step, h_prev)
      # Column b of the k×k blocks is the JVP along component b.
      columns = [jvp([zero + (a == b) for a in range(k)]) for b in range(k)]
      jac = [[columns[b][a] for b in range(k)] for a in range(k)]
      if damping is not None:
        jac = _damp(jac, damping)
      delta = _scan(jac, [x - y for x, y in zip(f, h)], [carry_ref[i, 1, a] for a in range(k)])
      for a in range(k):
        carry_ref[i, 0, a] = _last_row(h[a])
        carry_ref[i, 1, a] = _last_row(delta[a])
      return [x + y for x, y in zip(h, delta)]

    h = lax.fori_loop(0, num_iters, iteration, h)
    for a in range(k):
      h_ref[a, rows] = h[a]

  lax.fori_loop(0, blocks, time_block, None)


def _compiler_params(interpret: bool):
  return compiler_params(interpret, dimension_semantics=("parallel", "parallel", "arbitrary"))


@functools.partial(
  jax.jit,
  static_argnames=("cell", "num_iters", "block_t", "block_f", "blocks", "damping", "interpret"),
)
def newton_pallas_call(
  params: list[jax.Array],
  xs: list[jax.Array],
  h0: jax.Array,
  *,
  cell: Callable,
  num_iters: int,
  block_t: int,
  block_f: int,
  blocks: int,
  damping: float | None,
  interpret: bool,
) -> jax.Array:
  """Runs the kernel on padded, blocked arrays.

  Args:
    params: per-channel parameters, each ``[P, F]``.
    xs: per-step inputs, each ``[B, T, P, F]``.
    h0: ``[B, k, F]``.
    cell: ``cell(params, h_prev, xs) -> h`` on tiles: ``h_prev`` and ``h`` lists of ``k``
      ``[Tb, Fb]`` tiles, ``params`` and ``xs`` lists of ``[P, Fb]`` and ``[Tb, P, Fb]`` tiles
      (``[Fb]`` and ``[Tb, Fb]`` when ``P = 1``); ``ops.py`` builds it from the user's per-step
      cell.
    num_iters: Newton iterations, all run (no early exit).
    block_t: ``Tb``; ``T`` must be a multiple of ``blocks · Tb``.
    block_f: ``Fb``; ``F`` must be a multiple.
    blocks: time blocks per program.
    damping: ``λ`` of the damped Jacobian, or ``None``.
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``h [B, k, T, F]`` after ``num_iters`` iterations.
  """
  batch, k, width = h0.shape
  t = xs[0].shape[1]
  span = blocks * block_t
  levels = max(num_iters, 1)  # a zero-size carry block is not allowed
  param_specs = [pl.BlockSpec((p.shape[0], block_f), lambda b, f, j: (0, f)) for p in params]
  x_specs = [
    pl.BlockSpec((pl.Squeezed(), span, x.shape[2], block_f), lambda b, f, j: (b, j, 0, f))
    for x in xs
  ]
  h0_spec = pl.BlockSpec((pl.Squeezed(), k, block_f), lambda b, f, j: (b, 0, f))
  h_spec = pl.BlockSpec((pl.Squeezed(), k, span, block_f), lambda b, f, j: (b, 0, j, f))
  carry_spec = pl.BlockSpec((pl.Squeezed(), levels, 2, k, block_f), lambda b, f, j: (b, 0, 0, 0, f))
  kernel = functools.partial(
    _newton_kernel,
    cell=cell,
    n_params=len(params),
    n_xs=len(xs),
    num_iters=num_iters,
    block_t=block_t,
    blocks=blocks,
    damping=damping,
  )
  h, _ = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((batch, k, t, width), h0.dtype),
      jax.ShapeDtypeStruct((batch, levels, 2, k, width), h0.dtype),
    ),
    grid=(batch, width // block_f, t // span),
    in_specs=[*param_specs, *x_specs, h0_spec],
    out_specs=(h_spec, carry_spec),
    compiler_params=_compiler_params(interpret),
    interpret=interpret,
    name="newton_rnn",
  )(*params, *xs, h0)
  return h
