"""``newton_solve``: fused Newton iterations of a channel-elementwise RNN in one Pallas kernel.

Axes: ``B`` batch, ``T`` time, ``d`` channels, ``k`` state components per channel (``D = k·d``).

The cell contract is ParaRNN's (arXiv 2510.21450, §3) with the input projections done outside:
``cell(params, h_prev [D], x_t) -> h_t [D]`` is *elementwise over channels*: output channel
``i`` (its ``k`` components) depends only on channel ``i`` of ``h_prev``, of every ``x_t`` leaf
and of every ``params`` leaf, the channel being the last axis of each leaf (0-d leaves are shared
by all channels). Then the step Jacobian is diagonal (``k = 1``) or made of ``k×k`` blocks, and
the kernel can run the cell on any block of channels. ``check_elementwise`` probes this with
``jax.jacfwd`` before the first call, as ``jaxrec.ops.newton_core`` probes the Jacobian structure.

This module is forward only: the result is the root of ``h_t = cell(h_{t-1}, x_t)``, whose
gradient is the adjoint (implicit) one rather than a derivative of the iterations;
``jaxrec.ops.newton_rnn(method="pallas")`` wraps this solve in that adjoint ``custom_vjp``.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Float, PyTree, Shaped

from pallas_kernels._backend import compiled_on
from pallas_kernels.newton import kernel

Layout = Literal["stacked", "interleaved"]
LAYOUTS = get_args(Layout)
RNNState = Float[jax.Array, "B D"]
RNNStates = Float[jax.Array, "B T D"]
RNNInputs = PyTree[Shaped[jax.Array, "B T *X"]]
_PROBE_CHANNELS = 4  # enough to see any coupling between channels


def newton_solve(
  cell: Callable,
  params,
  xs: RNNInputs,
  h0: RNNState,
  *,
  num_iters: int,
  block_size: int = 1,
  layout: Layout = "stacked",
  damping: float | None = None,
  block_t: int | None = None,
  block_f: int | None = None,
  time_blocks_per_program: int | None = None,
  interpret: bool = False,
) -> RNNStates:
  """``num_iters`` Newton iterations on ``h_t = cell(params, h_{t-1}, x_t)``, fused in a kernel.

  Starts from ``h_t = cell(0, x_t)`` (``h_0 = cell(h0, x_0)``) and runs exactly ``num_iters``
  iterations, the same as ``jaxrec.ops.newton_rnn(max_iters=num_iters, fallback=None)`` with no
  tolerance stop; check the residual to know whether it converged.

  Args:
    cell: ``(params, h_prev [D], x_t) -> h_t [D]``, elementwise over channels (module
      docstring).
    params: pytree of per-channel ``[..., d]`` or shared 0-d arrays (inside the kernel a 0-d
      leaf reaches the cell as one copy per channel, ``[Fb]``, which elementwise code cannot
      tell apart).
    xs: pytree of ``[B, T, ..., d]`` or ``[B, T]`` arrays (the same holds for the latter). On
      Triton every leaf must have one row per channel (``[d]`` per step); see ``kernel.py``.
    h0: ``[B, D]``, the state before step 0; its dtype is that of the states.
    num_iters: Newton iterations, ``>= 0``.
    block_size: ``k``: 1 for a diagonal Jacobian, 2 for ``2×2`` blocks.
    layout: where component ``a`` of channel ``i`` sits in the state: ``"stacked"`` at
      ``a·d + i`` (a ``[c; h]`` state), ``"interleaved"`` at ``i·k + a``.
    damping: ``None``, or ``λ >= 0`` to divide each step's Jacobian by ``max(1 + λ, ‖J_t‖_∞)``.
    block_t: ``Tb``, steps per time block (default ``min(64, T)`` rounded up to a power of 2,
      at least 16, the smallest ``tl.dot`` operand).
    block_f: ``Fb``, channels per program (default ``min(128, d)`` rounded up to a power of 2).
    time_blocks_per_program: time blocks one program loops over; default: all of them on GPU
      (programs run concurrently there), one elsewhere (a sequential grid axis).
    interpret: run the Pallas interpreter (CPU).

  Returns:
    ``h [B, T, D]`` in ``h0``'s dtype.
  """
  _validate(
    cell=cell,
    h0=h0,
    xs=xs,
    num_iters=num_iters,
    block_size=block_size,
    layout=layout,
    damping=damping,
    block_t=block_t,
    block_f=block_f,
    time_blocks_per_program=time_blocks_per_program,
  )
  width = h0.shape[1]
  k = block_size
  d = width // k
  t = jax.tree.leaves(xs)[0].shape[1]
  x_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), xs)
  check_elementwise(cell, params, x_t, h0[0], block_size=k, layout=layout)

  block_t = block_t or min(64, max(16, pl.next_power_of_2(t)))
  block_f = block_f or pl.next_power_of_2(min(128, d))
  n_t = -(-t // block_t)
  if time_blocks_per_program is None:
    on_gpu = compiled_on("gpu", interpret)
    time_blocks_per_program = n_t if on_gpu else 1
  span = block_t * time_blocks_per_program
  t_pad, d_pad = -(-t // span) * span, -(-d // block_f) * block_f

  # Channels last and padded: padded channels and the steps after T are computed and dropped
  # (causality and the channel contract keep them out of the real ones).
  def channels(x, lead):
    x = jnp.broadcast_to(x[..., None], (*x.shape, d)) if x.ndim == lead else x
    x = x.reshape(*x.shape[:lead], -1, d)
    pad = [(0, 0)] * (lead + 1) + [(0, d_pad - d)]
    if lead:
      pad[1] = (0, t_pad - t)
    return jnp.pad(x, pad)

  p_leaves, p_def = jax.tree.flatten(params)
  x_leaves, x_def = jax.tree.flatten(xs)
  tile_cell = _TileCell(
    cell,
    p_def,
    tuple(jnp.shape(p)[:-1] for p in p_leaves),
    x_def,
    tuple(jnp.shape(x)[2:-1] for x in x_leaves),
    layout,
  )
  h = kernel.newton_pallas_call(
    [channels(jnp.asarray(p), 0) for p in p_leaves],
    [channels(jnp.asarray(x), 2) for x in x_leaves],
    jnp.pad(_to_components(h0, k, layout), ((0, 0), (0, 0), (0, d_pad - d))),
    cell=tile_cell,
    num_iters=num_iters,
    block_t=block_t,
    block_f=block_f,
    blocks=time_blocks_per_program,
    damping=None if damping is None else float(damping),
    interpret=interpret,
  )
  h = jnp.moveaxis(h[:, :, :t, :d], 1, 2)  # [B, T, k, d]
  return _from_components(h, layout)


def _to_components(h: jax.Array, k: int, layout: Layout) -> jax.Array:
  """``[..., D] -> [..., k, d]``."""
  if layout == "interleaved":
    return jnp.swapaxes(h.reshape(*h.shape[:-1], -1, k), -1, -2)
  return h.reshape(*h.shape[:-1], k, -1)


def _from_components(h: jax.Array, layout: Layout) -> jax.Array:
  """``[..., k, d] -> [..., D]``."""
  if layout == "interleaved":
    h = jnp.swapaxes(h, -1, -2)
  return h.reshape(*h.shape[:-2], -1)


@dataclasses.dataclass(frozen=True)
class _TileCell:
  """The per-step ``cell`` on kernel tiles: ``params`` ``[P, Fb]`` (``[Fb]`` when ``P = 1``),
  ``h_prev`` ``k`` tiles ``[Tb, Fb]``, ``xs`` ``[Tb, P, Fb]`` (``[Tb, Fb]``) -> ``k`` tiles
  ``[Tb, Fb]``; each leaf gets its own middle axes back.

  A frozen dataclass, hashable by value, so that it can be a static argument of ``jit``.
  """

  cell: Callable
  params_def: jax.tree_util.PyTreeDef
  params_mid: tuple
  xs_def: jax.tree_util.PyTreeDef
  xs_mid: tuple
  layout: Layout

  def __call__(self, params, h_prev, xs):
    params = [p.reshape(*m, -1) if m else p for p, m in zip(params, self.params_mid)]
    xs = [x.reshape(x.shape[0], *m, -1) if m else x for x, m in zip(xs, self.xs_mid)]
    params = jax.tree.unflatten(self.params_def, params)
    xs = jax.tree.unflatten(self.xs_def, xs)
    k = len(h_prev)

    def step(h, x_t):
      if k == 1:  # no concatenation and split, which not every backend lowers
        return [self.cell(params, h[0], x_t)]
      out = self.cell(params, _from_components(jnp.stack(h), self.layout), x_t)
      return list(_to_components(out, k, self.layout))

    return jax.vmap(step)(h_prev, xs)


def check_elementwise(cell: Callable, params, x_t, h_t, *, block_size: int, layout: Layout) -> None:
  """Raises ``ValueError`` unless ``cell`` is elementwise over channels (module docstring).

  Probes ``jax.jacfwd`` of the cell restricted to a few channels at random points (floating leaves
  standard normal, others zero), so the check is structural, like the Jacobian-structure probe of
  ``jaxrec.ops.newton_core``; cached per cell and shapes.

  Args:
    cell: ``(params, h_prev [D], x_t) -> h_t [D]``.
    params: parameter pytree (arrays or tracers; only shapes and dtypes are used).
    x_t: one step of input (arrays or ``jax.ShapeDtypeStruct``), without ``B, T``.
    h_t: one state ``[D]``.
    block_size: ``k``.
    layout: ``"stacked"`` or ``"interleaved"``.
  """
  width = jnp.shape(h_t)[0]
  d = width // block_size
  names = ["h_prev"]
  for name, tree in (("params", params), ("xs", x_t)):
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
      names.append(name + jax.tree_util.keystr(path))
      if jnp.ndim(leaf) and jnp.shape(leaf)[-1] != d:
        raise ValueError(
          f"{names[-1]}: expected a last (channel) axis of size d={d} (D={width} / "
          f"k={block_size}) or a 0-d array, got shape {jnp.shape(leaf)}"
        )
  spec = lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v))
  leaves, treedef = jax.tree.flatten(jax.tree.map(spec, (params, x_t)))
  probe_d = min(d, _PROBE_CHANNELS)
  try:
    hash(cell)
    probe = _coupled_inputs
  except TypeError:  # an unhashable cell is probed on every call
    probe = _coupled_inputs.__wrapped__
  try:
    coupled = probe(
      cell,
      treedef,
      leaves=tuple(leaves),
      h_dtype=jnp.result_type(h_t),
      d=probe_d,
      k=block_size,
      layout=layout,
    )
  except (TypeError, ValueError, IndexError) as err:
    raise ValueError(
      f"cell: expected a cell elementwise over channels, which runs on any block of them; on "
      f"{probe_d} channels it raised {type(err).__name__}: {err}"
    ) from err
  if coupled:
    raise ValueError(
      f"cell: expected a cell elementwise over the {d} channels (output channel i depends only "
      f"on channel i of h_prev and of every params and xs leaf), but it mixes channels through "
      f"{', '.join(names[i] for i in coupled)}; precompute projections and reductions outside "
      "the cell, or use jaxrec.ops.newton_rnn(method='newton')"
    )


@functools.lru_cache(maxsize=128)
def _coupled_inputs(cell, treedef, leaves, h_dtype, d, k, layout) -> tuple[int, ...]:
  """Inputs (0: ``h_prev``, ``i``: leaf ``i - 1`` of ``(params, x_t)``) through which output
  channel ``i`` depends on some channel ``j ≠ i``, probed on ``d`` channels."""
  rng = np.random.default_rng(0)

  def draw(leaf):
    shape = (*leaf.shape[:-1], d) if leaf.shape else ()
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      return rng.standard_normal(shape).astype(leaf.dtype)
    return np.zeros(shape, leaf.dtype)

  inputs = [rng.standard_normal((k, d)).astype(h_dtype)] + [draw(leaf) for leaf in leaves]
  floating = [i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim]

  def f(float_inputs):
    merged = list(inputs)
    for i, x in zip(floating, float_inputs):
      merged[i] = x
    params, x_t = jax.tree.unflatten(treedef, merged[1:])
    return _to_components(cell(params, _from_components(merged[0], layout), x_t), k, layout)

  with jax.ensure_compile_time_eval():
    jacs = [np.asarray(j) for j in jax.jit(jax.jacfwd(f))([inputs[i] for i in floating])]
  # Jacobians are [k, d (output channel), ..., d (input channel)]: the entries of different
  # channels must be zero (a NaN counts as a dependence). 0-d leaves are shared by design.
  off = ~np.eye(d, dtype=bool)
  depends = [np.moveaxis((jac != 0) | np.isnan(jac), 1, -2) for jac in jacs]
  return tuple(i for i, dep in zip(floating, depends) if np.any(dep & off))


def _validate(
  *, cell, h0, xs, num_iters, block_size, layout, damping, block_t, block_f, time_blocks_per_program
):
  try:
    hash(cell)
  except TypeError as err:
    raise ValueError(
      f"cell: expected a hashable callable (it is a static argument of the kernel), got {cell!r}"
    ) from err
  if jnp.ndim(h0) != 2 or not jnp.issubdtype(jnp.result_type(h0), jnp.floating):
    raise ValueError(
      f"h0: expected a floating [B, D] array, got {jnp.shape(h0)} {jnp.result_type(h0)}"
    )
  batch, width = h0.shape
  leaves = jax.tree.leaves(xs)
  shapes = [jnp.shape(x) for x in leaves]
  if not leaves or any(len(s) < 2 or s[0] != batch for s in shapes):
    raise ValueError(f"xs: expected [B, T, ...] arrays with B={batch} (from h0), got {shapes}")
  if len({s[1] for s in shapes}) != 1 or shapes[0][1] < 1:
    raise ValueError(f"xs: expected one T >= 1 for every leaf, got shapes {shapes}")
  if not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"num_iters: expected an int >= 0, got {num_iters!r}")
  if time_blocks_per_program is not None and (
    not isinstance(time_blocks_per_program, int) or time_blocks_per_program < 1
  ):
    raise ValueError(
      f"time_blocks_per_program: expected a positive int, got {time_blocks_per_program!r}"
    )
  if block_size not in (1, 2) or width % block_size:
    raise ValueError(f"block_size: expected 1 or 2 dividing D={width}, got {block_size!r}")
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
  if damping is not None and not (isinstance(damping, int | float) and damping >= 0):
    raise ValueError(f"damping: expected None or a float >= 0, got {damping!r}")
  for name, block in (("block_t", block_t), ("block_f", block_f)):
    if block is not None and (not isinstance(block, int) or block < 1):
      raise ValueError(f"{name}: expected a positive int, got {block!r}")
