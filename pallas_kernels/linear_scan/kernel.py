"""The ``pallas_call`` for ``h_t = a_t * h_{t-1} + b_t`` on ``[B, T, D]`` arrays.

Layout (after padding): features are split into lanes, ``D -> [R, 128]``, so one time step of a
feature block is an ``[Rb, 128]`` tile (one ``[8, 128]`` fp32 vreg on TPU) and time is a leading,
untiled axis that the kernel indexes dynamically. The grid is ``(B, R / Rb, T / Tb)``:

* batch and feature blocks are independent ("parallel");
* time is the innermost, sequential ("arbitrary") axis. The carry lives in the ``h_last`` output,
  whose block index does not depend on time, so the same ``[Rb, 128]`` block stays resident across
  the time axis and is written back once (recurrentgemma's trick; it needs no scratch buffer, which
  the GPU Triton backend does not implement).

``reverse`` walks the time blocks last to first (a reversed ``index_map``) and each block from its
last row to its first, so the backward pass reuses this kernel.

On GPU, grid programs run concurrently rather than in order, so a carry cannot pass between time
blocks there: the whole sequence is one block and the time loop runs inside one program,
one ``[1, 128]`` lane row per program for parallelism over features.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._backend import compiled_on, compiler_params

_LANES = 128
# TPU tiles: 8 sublanes x 128 lanes fp32 per time step, 128 steps per block keeps the three
# double-buffered [128, 8, 128] fp32 blocks (a, b, h) at 3 MiB of VMEM.
_TPU_ROWS = 8
_TPU_BLOCK_T = 128


def _scan_kernel(h0_ref, a_ref, b_ref, h_ref, carry_ref, *, block_t: int, reverse: bool):
  """One (batch, feature block, time block) grid step; refs are ``[Tb, Rb, 128]`` / ``[Rb, 128]``."""

  @pl.when(pl.program_id(2) == 0)
  def _init():
    carry_ref[...] = h0_ref[...]

  def step(i, h):
    t = block_t - 1 - i if reverse else i
    h = a_ref[t] * h + b_ref[t]
    h_ref[t] = h
    return h

  carry_ref[...] = lax.fori_loop(0, block_t, step, carry_ref[...])


def _tiling(t: int, rows: int, interpret: bool, block_t: int | None) -> tuple[int, int]:
  """(time steps per block, lane rows per block)."""
  if compiled_on("gpu", interpret):
    # Triton loads must have a power-of-2 size, so one lane row per program; see module docstring.
    return t, 1
  tile_rows = min(rows, _TPU_ROWS)  # a block dim must be 8-aligned or the full dim
  return min(block_t or _TPU_BLOCK_T, t), tile_rows


def _compiler_params(interpret: bool):
  # On GPU four warps (one thread per lane) measured fastest on an H200.
  return compiler_params(interpret, dimension_semantics=("parallel", "parallel", "arbitrary"))


def _pad_to(x: jax.Array, axis: int, size: int, value: float) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("reverse", "interpret", "block_t"))
def scan_pallas_call(
  a: jax.Array,
  b: jax.Array,
  h0: jax.Array,
  *,
  reverse: bool = False,
  interpret: bool = False,
  block_t: int | None = None,
) -> jax.Array:
  """Runs the kernel on ``a, b: [B, T, D]`` and ``h0: [B, D]``; returns ``h: [B, T, D]``.

  Args:
    a: decay, ``[B, T, D]``.
    b: input, ``[B, T, D]``.
    h0: state before the first step (after the last one when ``reverse``), ``[B, D]``.
    reverse: ``h_t = a_t * h_{t+1} + b_t``, from ``t = T-1`` down to 0.
    interpret: run the Pallas interpreter (CPU).
    block_t: time steps per grid step (TPU and interpreter); default 128.

  Returns:
    ``h``, ``[B, T, D]``, in the dtype of ``a``.
  """
  batch, t, d = a.shape
  rows = -(-d // _LANES)
  block_t, tile_rows = _tiling(t, rows, interpret, block_t)
  rows = -(-rows // tile_rows) * tile_rows
  t_pad = -(-t // block_t) * block_t

  # Padded steps go at the end with a=1, b=0: identity steps. Forward they come after every real
  # step; reverse they come first and hand h0 on unchanged, so they never alter a real state.
  # Padded features are zeros and are sliced off.
  def lanes(x, time_value):
    x = _pad_to(_pad_to(x, 2, rows * _LANES, 0.0), 1, t_pad, time_value)
    return x.reshape(batch, t_pad, rows, _LANES)

  a4 = lanes(a, 1.0)
  b4 = lanes(b, 0.0)
  h03 = _pad_to(h0, 1, rows * _LANES, 0.0).reshape(batch, rows, _LANES)

  n_t = t_pad // block_t

  def time_block(i):
    return n_t - 1 - i if reverse else i

  seq_spec = pl.BlockSpec(
    (pl.Squeezed(), block_t, tile_rows, _LANES), lambda i, j, k: (i, time_block(k), j, 0)
  )
  state_spec = pl.BlockSpec((pl.Squeezed(), tile_rows, _LANES), lambda i, j, k: (i, j, 0))
  h, _ = pl.pallas_call(
    functools.partial(_scan_kernel, block_t=block_t, reverse=reverse),
    out_shape=(
      jax.ShapeDtypeStruct(a4.shape, a.dtype),
      jax.ShapeDtypeStruct(h03.shape, a.dtype),
    ),
    grid=(batch, rows // tile_rows, n_t),
    in_specs=[state_spec, seq_spec, seq_spec],
    out_specs=(seq_spec, state_spec),
    compiler_params=_compiler_params(interpret),
    interpret=interpret,
    name="linear_scan",
  )(h03, a4, b4)
  return h.reshape(batch, t_pad, rows * _LANES)[:, :t, :d]
