"""Mixture-of-experts feed-forward with top-k capacity routing, and the RMoE GRU router.

**Experts** are SwiGLU MLPs stored stacked, ``[E, D, F]`` and ``[E, F, D]``, their leading axis
named ``"expert"``, which ``jaxrec.sharding``'s rules shard over the mesh's ``expert`` axis
(``EXPERT_AXIS``). Under a mesh (``jax.set_mesh``) whose ``expert`` axis is larger than 1 the
layer runs expert-parallel in a ``shard_map``: each device routes its own tokens, with the
capacity of its own group of tokens (GShard), and two ``all_to_all`` s carry the expert slots to
the experts' devices and back. Without such a mesh the same routing runs on all tokens as one
group (XLA partitions it as it can).

**Routing** (GShard/Switch): ``p = softmax(logits)`` per token, its ``top_k`` experts, their
weights renormalized to sum to one. Every expert takes at most ``C = ceil(capacity_factor · k ·
N / E)`` of the ``N`` tokens; assignments are served in order of choice (every token's first
choice before any second choice), then of position, and those past capacity are dropped (the
token keeps its residual stream) and counted. ``capacity_factor=None`` never drops.

**Dispatch** (``dispatch``): ``"capacity"`` gathers every expert's ``C`` slots with one-hot
matmuls (``[N, E, C]`` dispatch and combine tensors) and runs the experts as one batched matmul
over ``[E, C, D]``: static shapes, but ``E · C`` rows of work however few are filled, and
``C = N`` without a capacity limit. ``"sorted"`` (dropless, as in MegaBlocks and maxtext) sorts
the ``k · N`` assignments by expert, runs each expert's matmuls on its own contiguous rows with
``jax.lax.ragged_dot`` (group sizes: the experts' loads; on CPU, whose ``ragged_dot`` computes
every expert on every row, as tiles of one expert each), and un-sorts by the inverse
permutation: the work of the active parameters, and nothing is dropped (``capacity_factor`` is
not used). Under an expert-parallel mesh the ``all_to_all`` s move fixed-size slot buffers, so
``"sorted"`` sends every device's tokens with a capacity of all its tokens (dropless: buffers
sized for the worst case) and each device runs its experts' slots as grouped matmuls.

**Load balancing** (Switch Transformer): ``aux = E · Σ_n f_n P_n`` with ``f_n`` the fraction of
the ``k · N`` assignments that chose expert ``n`` and ``P_n`` its mean router probability; 1 when
balanced. Each layer sows its ``RoutingStats`` (``f``, ``P``, ...) under ``ROUTING``
(``jaxrec.layers.observe``), and the model pools them over all layers with
``pooled_routing_statistics`` (the RMoE code's loss over the concatenated logits).

**Routers** (``router``), for layer ``i`` with input ``x_i`` (the block's normed input):

* ``"linear"``: ``logits = W_i x_i``, the baseline (SMoE).
* ``"gru"`` (RMoE, arXiv 2408.06793): ``h_i = GRU(P_i x_i, h_{i-1})`` with one ``GRURouterCell``
  shared by all layers (given to each at construction), ``h_0 = 0``, ``logits = G_i h_i``; the
  state goes layer to layer per token, never along the sequence.
* ``"gru_no_recurrence"`` (the paper's NP ablation): ``h_i = GRU(P_i x_i, 0)``.
* ``"gru_detached"``: the previous state enters through ``stop_gradient`` (the paper: worse than
  no recurrence).
* ``"mlp"``: a per-layer Elman step ``h_i = tanh(A_i P_i x_i + B_i h_{i-1} + b_i)``: the previous
  layer's state without the shared gated cell.
"""

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrec.layers import _checks, observe
from jaxrec.layers._params import logical_param
from jaxrec.sharding import EXPERT_AXIS, batch_axes
from jaxrec.typing import Activations

RouterKind = Literal["linear", "gru", "gru_no_recurrence", "gru_detached", "mlp"]
ROUTERS = get_args(RouterKind)
DispatchKind = Literal["capacity", "sorted"]
DISPATCHES = get_args(DispatchKind)
GRU_ROUTERS = ("gru", "gru_no_recurrence", "gru_detached")
# The routers that take the previous layer's state (the ablations block it but keep the form):
# a model of these hands the state on from each MoE layer to the next.
RECURRENT_ROUTERS = (*GRU_ROUTERS, "mlp")
RouterState = jax.Array  # [B, T, P] fp32, the router's state handed from layer to layer
ROUTING = "routing"  # the sow name of every MoE layer's RoutingStats


class RoutingStats(NamedTuple):
  """One layer's routing, for the auxiliary loss and the metrics.

  Attributes:
    load: ``[E]`` fraction of the ``k · N`` assignments that chose each expert (before drops).
    prob: ``[E]`` mean router probability of each expert.
    entropy: mean entropy of the router distribution (nats).
    dropped: fraction of assignments dropped for capacity.
    top1: int32 ``[N]`` every token's first choice (cross-layer routing statistics).
    selected: mean router probability on the selected experts (the paper's OB).
    top_ratio: mean ratio of the first to the second selected probability (IB; 1 with top-1).
  """

  load: jax.Array
  prob: jax.Array
  entropy: jax.Array
  dropped: jax.Array
  top1: jax.Array
  selected: jax.Array
  top_ratio: jax.Array


def _uniform(bound):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class GRURouterCell(nnx.Module):
  """A GRU cell in PyTorch ``GRUCell`` form (gates ``r, z, n`` in that order, two biases,
  ``U(-1/sqrt(P), 1/sqrt(P))`` initialization)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)      z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))      h' = (1 - z) ⊙ n + z ⊙ h

  Args:
    size: input and state width ``P``.
    param_dtype: parameter storage dtype; the cell computes in fp32.
    rngs: the ``params`` stream.
  """

  def __init__(self, size: int, *, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    _checks.check_positive_int("size", size)
    init = _uniform(size**-0.5)
    names = ("router", None)
    self.w_ih = logical_param(init, rngs.params(), (size, 3 * size), param_dtype, names)
    self.w_hh = logical_param(init, rngs.params(), (size, 3 * size), param_dtype, names)
    self.b_ih = logical_param(init, rngs.params(), (3 * size,), param_dtype, (None,))
    self.b_hh = logical_param(init, rngs.params(), (3 * size,), param_dtype, (None,))

  def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
    """``x, h [..., P]`` -> ``h' [..., P]`` fp32."""
    f32 = jnp.float32
    gi = x.astype(f32) @ self.w_ih[...].astype(f32) + self.b_ih[...].astype(f32)
    gh = h.astype(f32) @ self.w_hh[...].astype(f32) + self.b_hh[...].astype(f32)
    i_r, i_z, i_n = jnp.split(gi, 3, -1)
    h_r, h_z, h_n = jnp.split(gh, 3, -1)
    r, z = jax.nn.sigmoid(i_r + h_r), jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


class MoE(nnx.Module):
  """Top-k mixture of SwiGLU experts (equations in the module docstring).

  Args:
    dim: model width ``D``.
    hidden: every expert's hidden width ``F``.
    num_experts: ``E``.
    top_k: experts per token, at most ``num_experts``.
    capacity_factor: expert capacity as a multiple of the balanced load; ``None``: no drops.
      The ``"capacity"`` dispatch only.
    dispatch: ``"capacity"`` (one-hot slots) or ``"sorted"`` (dropless, grouped matmuls).
    grouped_matmul: how ``"sorted"`` runs the experts: ``"ragged_dot"`` (``jax.lax.ragged_dot``,
      the grouped-GEMM kernels of TPU and GPU) or ``"tiles"`` (tiles of one expert each in one
      batched matmul: XLA's CPU ``ragged_dot`` computes every expert on every row, ``E`` times
      the work); ``None``: ``"tiles"`` on CPU, ``"ragged_dot"`` elsewhere.
    router: one of ``ROUTERS``.
    router_dim: the router state width ``P`` (GRU and MLP routers).
    router_cell: the ``GRURouterCell`` of width ``router_dim`` that the GRU routers run, one
      object shared by the MoE layers of a model; ``None`` for the other routers.
    init_std: standard deviation of the expert and router input projections.
    num_layers: depth of the model; the experts' output projections start at
      ``init_std / sqrt(2 num_layers)``.
    dtype: compute dtype of the experts; routing is fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  def __init__(
    self,
    dim: int,
    hidden: int,
    num_experts: int,
    *,
    top_k: int = 2,
    capacity_factor: float | None = 1.25,
    dispatch: DispatchKind = "capacity",
    grouped_matmul: Literal["ragged_dot", "tiles"] | None = None,
    router: RouterKind = "linear",
    router_dim: int = 128,
    router_cell: GRURouterCell | None = None,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts)):
      _checks.check_positive_int(name, value)
    _checks.check_positive_int("top_k", top_k)
    if top_k > num_experts:
      raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
    if capacity_factor is not None:
      _checks.check_positive("capacity_factor", capacity_factor)
    if dispatch not in DISPATCHES:
      raise ValueError(f"dispatch: expected one of {DISPATCHES}, got {dispatch!r}")
    if router not in ROUTERS:
      raise ValueError(f"router: expected one of {ROUTERS}, got {router!r}")
    _checks.check_positive_int("router_dim", router_dim)
    if router in GRU_ROUTERS:
      if not isinstance(router_cell, GRURouterCell):
        raise ValueError(
          f"router_cell: router={router!r} needs the shared GRURouterCell, got {router_cell!r}"
        )
      if router_cell.w_ih.shape[0] != router_dim:
        raise ValueError(
          f"router_cell: expected a cell of width router_dim={router_dim}, got width "
          f"{router_cell.w_ih.shape[0]}"
        )
    elif router_cell is not None:
      raise ValueError(f"router_cell: router={router!r} runs no GRU cell, expected None")
    _checks.check_positive("init_std", init_std, allow_zero=True)
    self.dtype = _checks.check_float_dtype("dtype", dtype)
    param_dtype = _checks.check_float_dtype("param_dtype", param_dtype)
    self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
    self.dispatch = dispatch
    if grouped_matmul is None:
      grouped_matmul = "tiles" if jax.default_backend() == "cpu" else "ragged_dot"
    if grouped_matmul not in ("ragged_dot", "tiles"):
      raise ValueError(
        f"grouped_matmul: expected 'ragged_dot', 'tiles' or None, got {grouped_matmul!r}"
      )
    self.grouped_matmul = grouped_matmul
    self.router = router
    self.router_cell = router_cell
    e, d, f, p = num_experts, dim, hidden, router_dim
    normal = nnx.initializers.normal
    out_std = init_std / math.sqrt(2 * num_layers)

    def param(std, shape, names, **kw):
      return logical_param(normal(std), rngs.params(), shape, param_dtype, names, **kw)

    self.w_gate = param(init_std, (e, d, f), ("expert", "embed", "mlp"))
    self.w_up = param(init_std, (e, d, f), ("expert", "embed", "mlp"))
    self.w_down = param(out_std, (e, f, d), ("expert", "mlp", "embed"))
    if router == "linear":
      self.router_proj = None
      self.router_out = param(init_std, (d, e), ("embed", None))
    else:
      self.router_proj = param(init_std, (d, p), ("embed", "router"))
      self.router_out = param(p**-0.5, (p, e), ("router", None))
    if router == "mlp":
      self.mlp_in = param(p**-0.5, (p, p), ("router", None))
      self.mlp_state = param(p**-0.5, (p, p), ("router", None))
      self.mlp_bias = logical_param(
        nnx.initializers.zeros_init(), rngs.params(), (p,), param_dtype, ("router",)
      )

  def __call__(
    self, x: Activations, router_state: RouterState | None = None
  ) -> tuple[Activations, RouterState | None]:
    """Routes ``x [B, T, D]`` and sows this layer's ``RoutingStats`` under ``ROUTING``.

    Args:
      x: the tokens.
      router_state: the previous MoE layer's router state ``[B, T, P]`` (``None``: zeros).

    Returns:
      ``(y [B, T, D], router_state for the next layer)``; the state is ``None`` for the
      stateless routers (``"linear"``, ``"gru_no_recurrence"``).
    """
    logits, state = self._route(x.astype(jnp.float32), router_state)
    weights = (self.w_gate[...], self.w_up[...], self.w_down[...])
    mesh = jax.sharding.get_abstract_mesh()
    rows = math.prod(mesh.shape[a] for a in batch_axes(mesh))
    # A batch that does not split over the batch axes (sampling one prompt) takes the GSPMD
    # path below, whose capacity counts the whole batch as one group.
    if mesh.shape.get(EXPERT_AXIS, 1) > 1 and x.shape[0] % rows == 0:
      y, stats = self._expert_parallel(mesh, x, logits, weights)
    elif self.dispatch == "sorted":
      y, stats = self._sorted(x, logits, weights)
    else:
      y, stats = self._dispatch(x, logits, weights)
    observe.sow(self, ROUTING, stats)
    return y, state

  def _route(self, x, h):
    if self.router == "linear":
      return x @ self.router_out[...].astype(jnp.float32), None
    xp = x @ self.router_proj[...].astype(jnp.float32)
    h = jnp.zeros_like(xp) if h is None else h.astype(jnp.float32)
    if self.router == "gru_detached":
      h = lax.stop_gradient(h)
    if self.router in GRU_ROUTERS:
      h = self.router_cell(xp, jnp.zeros_like(xp) if self.router == "gru_no_recurrence" else h)
    else:
      f32 = jnp.float32
      h = jnp.tanh(
        xp @ self.mlp_in[...].astype(f32)
        + h @ self.mlp_state[...].astype(f32)
        + self.mlp_bias[...].astype(f32)
      )
    state = None if self.router == "gru_no_recurrence" else h
    return h @ self.router_out[...].astype(jnp.float32), state

  def _expert_parallel(self, mesh, x, logits, weights):
    """Expert parallelism under a mesh with an ``expert`` axis: every device routes its own
    tokens (capacity per device, GShard's groups), ``all_to_all`` sends each expert its slots and
    the results back, and each device runs only its ``E / expert`` experts."""
    ep = mesh.shape[EXPERT_AXIS]
    if self.num_experts % ep:
      raise ValueError(
        f"num_experts: expected a multiple of the mesh's expert axis ({ep}), got {self.num_experts}"
      )
    batch = batch_axes(mesh)
    rows = P(batch)

    def local(x, logits, *weights):
      y, stats = self._dispatch(x, logits, weights, expert_axis=EXPERT_AXIS)
      mean = lambda v: lax.pmean(v, batch)
      return y, stats._replace(**{f: mean(getattr(stats, f)) for f in stats._fields if f != "top1"})

    stat_specs = RoutingStats(*(rows if f == "top1" else P() for f in RoutingStats._fields))
    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(rows, rows, P(EXPERT_AXIS), P(EXPERT_AXIS), P(EXPERT_AXIS)),
      out_specs=(rows, stat_specs),
    )(x, logits, *weights)

  def _choose(self, logits):
    """``(probs [N, E], top_p [N, k], top_i [N, k], share [N, k])``: the router's distribution,
    each token's ``k`` experts and their renormalized weights."""
    probs = jax.nn.softmax(logits, -1)
    top_p, top_i = lax.top_k(probs, self.top_k)
    return probs, top_p, top_i, top_p / jnp.sum(top_p, -1, keepdims=True)

  def _stats(self, probs, top_p, top_i, kept) -> RoutingStats:
    k = self.top_k
    second = top_p[:, 1] if k > 1 else top_p[:, 0]
    load = jnp.mean(jax.nn.one_hot(top_i, self.num_experts, dtype=jnp.float32), 0)
    return RoutingStats(
      load=jnp.sum(load, 0) / k,
      prob=jnp.mean(probs, 0),
      entropy=-jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), -1)),
      dropped=1.0 - jnp.mean(kept.astype(jnp.float32)),
      top1=top_i[:, 0],
      selected=jnp.mean(jnp.sum(top_p, -1)),
      top_ratio=jnp.mean(top_p[:, 0] / jnp.maximum(second, 1e-30)),
    )

  def _experts(self, rows, group_sizes, weights):
    """The SwiGLU of each expert on its contiguous ``rows [M, D]`` (``group_sizes [E]`` of them
    per expert, in expert order; rows past their sum give zeros)."""
    w_gate, w_up, w_down = (w.astype(self.dtype) for w in weights)
    rows = rows.astype(self.dtype)
    if self.grouped_matmul == "ragged_dot":
      gate = lax.ragged_dot(rows, w_gate, group_sizes)
      up = lax.ragged_dot(rows, w_up, group_sizes)
      return lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)
    return _tiled_swiglu(rows, group_sizes, (w_gate, w_up, w_down), TILE)

  def _sorted(self, x, logits, weights):
    """Dropless dispatch (module docstring): ``x [B, T, D]`` by ``logits [B, T, E]``."""
    batch, t, d = x.shape
    x, logits = x.reshape(batch * t, d), logits.reshape(batch * t, -1)
    n, k = x.shape[0], self.top_k
    probs, top_p, top_i, share = self._choose(logits)
    expert = top_i.reshape(n * k)  # assignment a = token a // k, its (a % k)-th choice
    order = jnp.argsort(expert, stable=True)  # by expert, then token
    group_sizes = jnp.bincount(expert, length=self.num_experts).astype(jnp.int32)
    out = self._experts(x[order // k], group_sizes, weights)  # [N·k, D] sorted by expert
    unsorted = out[jnp.argsort(order)].reshape(n, k, d)  # the inverse permutation
    y = jnp.einsum("nkd,nk->nd", unsorted, share.astype(self.dtype)).reshape(batch, t, d)
    return y, self._stats(probs, top_p, top_i, jnp.ones((k, n), bool))

  def _dispatch(self, x, logits, weights, expert_axis=None):
    """Routes ``x [B, T, D]`` by ``logits [B, T, E]`` into capacity slots; with ``expert_axis``
    (inside the ``shard_map``) ``weights`` hold this device's experts and the slots travel by
    all-to-all (the ``"sorted"`` dispatch there: slots for all tokens, run by ``_experts``)."""
    batch, t, d = x.shape
    x, logits = x.reshape(batch * t, d), logits.reshape(batch * t, -1)
    n, e, k = x.shape[0], self.num_experts, self.top_k
    probs, top_p, top_i, share = self._choose(logits)  # [N, E], [N, k] x 3
    dropless = self.capacity_factor is None or self.dispatch == "sorted"
    capacity = n if dropless else math.ceil(self.capacity_factor * k * n / e)
    capacity = min(capacity, n)
    # Slots: assignments in order (choice, token); the slot is the expert's running count.
    choice = jax.nn.one_hot(top_i.T, e, dtype=jnp.int32)  # [k, N, E]
    slot = jnp.cumsum(choice.reshape(k * n, e), 0).reshape(k, n, e) - 1
    slot = jnp.sum(slot * choice, -1)  # [k, N]
    kept = slot < capacity
    place = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
    dispatch = jnp.einsum("kne,knc->nec", choice.astype(jnp.float32), place)
    combine = jnp.einsum("kne,knc,nk->nec", choice.astype(jnp.float32), place, share)
    dt = self.dtype
    w_gate, w_up, w_down = (w.astype(dt) for w in weights)
    expert_in = jnp.einsum("nec,nd->ecd", dispatch.astype(dt), x.astype(dt))
    if expert_axis is not None:
      # [E, C, D] -> [devices, E / devices, C, D]: block i to device i; what comes back holds
      # every device's slots for this device's experts.
      expert_in = expert_in.reshape(-1, w_gate.shape[0], *expert_in.shape[1:])
      expert_in = lax.all_to_all(expert_in, expert_axis, 0, 0)
    if self.dispatch == "sorted":
      # The slots of each local expert (from every device) as one contiguous group of rows.
      local = jnp.moveaxis(expert_in, -3, 0) if expert_axis is not None else expert_in
      shape = local.shape
      sizes = jnp.full((shape[0],), math.prod(shape[1:-1]), jnp.int32)
      out = self._experts(local.reshape(-1, d), sizes, weights).reshape(shape)
      out = jnp.moveaxis(out, 0, -3) if expert_axis is not None else out
    else:
      gate = jnp.einsum("...ecd,edf->...ecf", expert_in, w_gate)
      up = jnp.einsum("...ecd,edf->...ecf", expert_in, w_up)
      out = jnp.einsum("...ecf,efd->...ecd", jax.nn.silu(gate) * up, w_down)
    if expert_axis is not None:
      out = lax.all_to_all(out, expert_axis, 0, 0).reshape(e, *out.shape[2:])
    y = jnp.einsum("nec,ecd->nd", combine.astype(dt), out).reshape(batch, t, d)
    return y, self._stats(probs, top_p, top_i, kept)


# Rows per tile of the tiled grouped matmul: each expert's rows are padded to a multiple of it.
TILE = 128


def _tiled_swiglu(rows, group_sizes, weights, tile: int):
  """``ragged_dot``'s grouped SwiGLU as dense tiles (MegaBlocks' block layout, for backends whose
  ``ragged_dot`` computes every group on every row, as XLA's CPU one does): each expert's rows go
  to their own ``tile``-row tiles (its last tile padded with zeros), every tile is multiplied by
  its expert's weights in one batched matmul, and the rows are gathered back. Work: ``M`` rows
  plus at most ``tile - 1`` of padding per expert."""
  m, d = rows.shape
  w_gate, w_up, w_down = weights
  e = w_gate.shape[0]
  num_tiles = -(-(m + e * (tile - 1)) // tile)  # enough for any group sizes summing to <= M
  padded = -(-group_sizes // tile) * tile
  start = jnp.cumsum(group_sizes) - group_sizes
  padded_end = jnp.cumsum(padded)
  expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")
  expert = jnp.minimum(expert, e - 1)
  valid = jnp.arange(m) < jnp.sum(group_sizes)
  dest = padded_end[expert] - padded[expert] + jnp.arange(m) - start[expert]
  # Rows past the groups' sum go nowhere (an out-of-range index is dropped).
  dest = jnp.where(valid, dest, num_tiles * tile)
  tiles = jnp.zeros((num_tiles * tile, d), rows.dtype).at[dest].set(rows, mode="drop")
  tiles = tiles.reshape(num_tiles, tile, d)
  tile_expert = jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side="right")
  tile_expert = jnp.minimum(tile_expert, e - 1)  # tiles past every group: zeros, any expert
  gate = jnp.einsum("tbd,tdf->tbf", tiles, w_gate[tile_expert])
  up = jnp.einsum("tbd,tdf->tbf", tiles, w_up[tile_expert])
  out = jnp.einsum("tbf,tfd->tbd", jax.nn.silu(gate) * up, w_down[tile_expert])
  out = out.reshape(num_tiles * tile, d)
  return jnp.where(valid[:, None], out[jnp.minimum(dest, num_tiles * tile - 1)], 0)


def pooled_routing_statistics(
  stats: Sequence[RoutingStats], aux_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The load-balancing loss and routing metrics of a model, pooled over its MoE layers' sown
  ``stats`` (in layer order).

  Args:
    stats: every MoE layer's ``RoutingStats``, first layer first.
    aux_weight: the weight of the balancing loss in the objective.

  Returns:
    ``(aux_loss, metrics)``: ``aux_weight`` times the pooled Switch loss, and the
    ``moe/balance_loss`` (unweighted), ``moe/load_max`` (busiest expert's mean load relative to
    a balanced one), ``moe/entropy``, ``moe/dropped``, ``moe/layer_mi_bits`` (between
    consecutive layers' first choices), ``moe/selected_weight`` and ``moe/top_ratio``.
  """
  s = RoutingStats(*(jnp.stack(x) for x in zip(*stats, strict=True)))
  num_experts = s.load.shape[-1]
  balance = load_balancing_loss(s.load, s.prob)
  metrics = {
    "moe/balance_loss": balance,
    "moe/load_max": jnp.mean(jnp.max(s.load, -1)) * num_experts,
    "moe/entropy": jnp.mean(s.entropy),
    "moe/dropped": jnp.mean(s.dropped),
    "moe/layer_mi_bits": routing_mutual_information(s.top1, num_experts),
    "moe/selected_weight": jnp.mean(s.selected),
    "moe/top_ratio": jnp.mean(s.top_ratio),
  }
  return aux_weight * balance, metrics


def load_balancing_loss(loads: jax.Array, probs: jax.Array) -> jax.Array:
  """Switch loss ``E · Σ_n f̄_n P̄_n`` pooled over layers: ``loads, probs [layers, E]``."""
  return loads.shape[-1] * jnp.sum(jnp.mean(loads, 0) * jnp.mean(probs, 0))


def routing_mutual_information(top1: jax.Array, num_experts: int) -> jax.Array:
  """Mean mutual information (bits) between consecutive layers' first choices, ``top1 [layers,
  N]``: 0 when a layer's routing says nothing about the next one's."""
  if top1.shape[0] < 2:
    return jnp.zeros((), jnp.float32)
  a = jax.nn.one_hot(top1[:-1], num_experts, dtype=jnp.float32)
  b = jax.nn.one_hot(top1[1:], num_experts, dtype=jnp.float32)
  joint = jnp.einsum("lna,lnb->lab", a, b) / top1.shape[1]
  outer = jnp.sum(joint, 2, keepdims=True) * jnp.sum(joint, 1, keepdims=True)
  terms = jnp.where(joint > 0, joint * jnp.log2(joint / jnp.maximum(outer, 1e-30)), 0.0)
  return jnp.mean(jnp.sum(terms, (1, 2)))
