"""The language model: embedding → blocks (mixer + SwiGLU MLP, pre-norm residual) → head.

With ``mixer_pattern=("mlstm",)``, an untied head and ``logit_soft_cap=30`` this is exactly the
xLSTM 7B architecture (``jaxrec.models.xlstm``): its blocks are the same pre-norm residual pair of
mixer and SwiGLU feed-forward, and its feed-forward width ``round_up(2.667 · D, 64)`` is
``LMConfig.mlp_dim`` with ``mlp_ratio=2.667``.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxrec import layers
from jaxrec.layers import logical_param, observe
from jaxrec.models.config import LMConfig
from jaxrec.models.ffn import build_ffn
from jaxrec.models.mixers import build_mixer

Cache = Any  # a pytree of the mixers' caches, laid out like the blocks (see LM.init_cache)


class Block(nnx.Module):
  """``x += mixer(norm(x)); x += ffn(norm(x))``; the mixer is the one registered as ``mixer``
  (``jaxrec.models.registry``), built from ``cfg``, and the feed-forward a SwiGLU ``MLP``, with
  ``cfg.ffn="moe"`` an ``MoE`` whose GRU router runs ``router_cell``, the one cell shared by the
  model's MoE layers, or with ``cfg.ffn="none"`` nothing (no second norm either).

  What passes from block to block is the *carry*: the residual stream ``x``, or in a model whose
  MoE router takes a state (``router_carry(cfg)``) the pair ``(x, router_state)``, the state
  the MoE layer hands to the next one (``None`` before the first: zeros).
  """

  def __init__(
    self,
    cfg: LMConfig,
    mixer: str,
    *,
    router_cell: layers.GRURouterCell | None = None,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mixer_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.mixer = build_mixer(mixer, cfg, rngs=rngs)
    # Built before the feed-forward, as always: the order the parameters draw their keys in.
    self.mlp_norm = None if cfg.ffn == "none" else layers.RMSNorm(cfg.d_model, **norm)
    self.carries_router_state = router_carry(cfg)
    self.mlp = build_ffn(cfg, router_cell=router_cell, rngs=rngs)

  def __call__(self, carry, *, segment_ids=None, cache=None):
    """Returns ``(carry, cache)``."""
    x, router_state = carry if self.carries_router_state else (carry, None)
    y, cache = self.mixer(self.mixer_norm(x), segment_ids=segment_ids, cache=cache)
    x = x + y
    if isinstance(self.mlp, layers.MoE):
      y, router_state = self.mlp(self.mlp_norm(x), router_state)
      x = x + y
    elif self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x))
    return ((x, router_state) if self.carries_router_state else x), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype):
    return self.mixer.init_cache(batch_size, max_length, dtype)


class BlockGroup(nnx.Module):
  """One repetition of ``mixer_pattern``: the unit that ``scan_layers`` stacks and scans."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, name, rngs=rngs) for name in cfg.mixer_pattern])

  def __call__(self, x, *, segment_ids=None, cache=None):
    return _run_blocks(self.blocks, x, segment_ids, cache)

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype):
    return tuple(block.init_cache(batch_size, max_length, dtype) for block in self.blocks)


class LM(nnx.Module):
  """Decoder-only language model configured by an ``LMConfig``.

  Blocks are a list of ``Block`` (``layers[i]``), or with ``cfg.scan_layers`` one ``BlockGroup``
  whose parameters carry a leading ``"layers"`` axis of ``num_layers / len(mixer_pattern)``
  groups, run with ``lax.scan``. Parameters are annotated with logical axis names (see
  ``jaxrec.layers.logical_param``).

  Usage::

    model = LM(cfg, rngs=nnx.Rngs(0))
    logits, _ = model(tokens)                              # training / scoring
    cache = model.init_cache(batch_size, max_length)
    logits, cache = model(prompt, cache=cache)             # prefill
    logits, cache = model(next_tokens[:, None], cache=cache)  # one decoding step
  """

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, LMConfig):
      raise ValueError(f"cfg: expected an LMConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init = nnx.initializers.normal(cfg.init_std)
    self.embedding = logical_param(
      init, rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype, ("vocab", "embed")
    )
    # RMoE's one GRU, shared by the routers of all MoE layers: each holds it from its
    # construction, and its state path is the first one's (layers/0/mlp/router_cell). Built
    # with placeholder values, drawn below.
    cell = None
    if cfg.ffn == "moe" and cfg.moe.router in layers.moe.GRU_ROUTERS:
      cell = layers.GRURouterCell(cfg.moe.router_dim, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    if cfg.scan_layers:
      self.layers = _stacked_groups(cfg, rngs)
    else:
      self.layers = nnx.List(
        [Block(cfg, name, router_cell=cell, rngs=rngs) for name in cfg.layer_mixers]
      )
    self.final_norm = layers.RMSNorm(
      cfg.d_model, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    if cell is not None:
      # The cell's parameters are drawn here, after the blocks' and the final norm's, where the
      # model drew them when it owned the cell itself: a seed gives the model it always gave.
      drawn = layers.GRURouterCell(cfg.moe.router_dim, param_dtype=param_dtype, rngs=rngs)
      nnx.update(cell, nnx.state(drawn))
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = layers.Dense(
        cfg.d_model,
        cfg.vocab_size,
        ("embed", "vocab"),
        std=cfg.init_std,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Next-token logits.

    Under ``nnx.capture(..., nnx.Intermediate)`` the layers report what they observe
    (``jaxrec.layers.observe``); the model adds, for its MoE layers, the balancing loss pooled
    over them (``aux_loss``) and their pooled routing statistics (``metrics``, ``moe/*``).

    Args:
      tokens: int ``[B, T]``.
      segment_ids: int ``[B, T]`` document ids of packed sequences; mixers neither attend nor
        carry state across a change of id.
      cache: from ``init_cache`` or a previous call; the tokens continue it.

    Returns:
      ``(logits, cache)``: fp32 ``[B, T, vocab_size]`` and the advanced cache (``None`` without
      one).
    """
    self._validate(tokens, segment_ids)
    cfg = self.cfg
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(cfg.compute_dtype)
    if cfg.scan_layers:
      x, cache = self._scan_blocks(x, segment_ids, cache)
    else:
      caches = (None,) * len(self.layers) if cache is None else cache
      new = []
      carry = (x, None) if router_carry(cfg) else x
      for block, c in zip(self.layers, caches, strict=True):
        carry, c = _call(block, cfg.remat)(carry, segment_ids, c)
        new.append(c)
      x = carry[0] if router_carry(cfg) else carry
      cache = None if cache is None else tuple(new)
      self._pool_routing()
    h = self.final_norm(x)
    if self.head is None:
      logits = jnp.einsum("btd,vd->btv", h, self.embedding[...].astype(h.dtype))
    else:
      logits = self.head(h)
    logits = layers.soft_cap(logits.astype(jnp.float32), cfg.logit_soft_cap)
    return logits, cache

  def _pool_routing(self):
    """Sows the balancing loss and routing metrics pooled over what the MoE layers sowed in this
    call (nothing outside a capture, or without MoE layers)."""
    stats = [
      s
      for block in self.layers
      if isinstance(block.mlp, layers.MoE)
      for s in observe.sown(block.mlp, layers.moe.ROUTING)
    ]
    if stats:
      aux_loss, metrics = layers.pooled_routing_statistics(stats, self.cfg.moe.aux_weight)
      observe.sow(self, observe.AUX_LOSS, aux_loss)
      observe.sow(self, observe.METRICS, metrics)

  def _scan_blocks(self, x, segment_ids, cache):
    """The groups run by ``lax.scan`` over their stacked parameters. Each block of the group is
    split on its own (see ``_sown``: the group's ``nnx.List`` would hold a store under
    ``nnx.capture``), and what it sows comes out stacked over the groups."""
    blocks = tuple(self.layers.blocks)
    graphdefs, states = zip(*(nnx.split(block) for block in blocks), strict=True)
    paths = [[] for _ in blocks]

    def body(x, states_and_cache):
      states, c = states_and_cache
      copies = [nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True)]
      x, c = _run_blocks(copies, x, segment_ids, c)
      values = []
      for i, copy in enumerate(copies):
        paths[i], sown = _sown(copy)
        values.append(sown)
      return x, (c, values)

    if self.cfg.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    x, (cache, values) = lax.scan(body, x, (states, cache))
    for block, block_paths, block_values in zip(blocks, paths, values, strict=True):
      _resow(block, block_paths, block_values)
    return x, cache

  def init_cache(
    self,
    batch_size: int,
    max_length: int | None = None,
    dtype: jnp.dtype | None = None,
  ) -> Cache:
    """Empty decoding caches for every mixer.

    Args:
      batch_size: ``B``.
      max_length: the most tokens the cache will hold (prompt and generated); default
        ``cfg.max_seq_len``.
      dtype: dtype of attention KV caches; default the compute dtype. Recurrent states are fp32.

    Returns:
      a tuple with one cache per layer, or with ``scan_layers`` one per ``mixer_pattern`` entry,
      stacked over the groups.
    """
    max_length = self.cfg.max_seq_len if max_length is None else max_length
    dtype = self.cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
    if self.cfg.scan_layers:
      groups = self.cfg.num_layers // len(self.cfg.mixer_pattern)
      group = self.layers.init_cache(batch_size, max_length, dtype)
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)), group)
    return tuple(block.init_cache(batch_size, max_length, dtype) for block in self.layers)

  def _validate(self, tokens, segment_ids):
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
      raise ValueError(
        f"tokens: expected an integer [B, T] array, got {jnp.result_type(tokens)} "
        f"shape {jnp.shape(tokens)}"
      )
    if segment_ids is not None and (
      jnp.shape(segment_ids) != jnp.shape(tokens)
      or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer)
    ):
      raise ValueError(
        f"segment_ids: expected an integer array of shape {jnp.shape(tokens)} [B, T], got "
        f"{jnp.result_type(segment_ids)} shape {jnp.shape(segment_ids)}"
      )


def _stacked_groups(cfg: LMConfig, rngs: nnx.Rngs) -> BlockGroup:
  """``num_layers / len(mixer_pattern)`` groups with independent initializations, stacked."""

  @nnx.split_rngs(splits=cfg.num_layers // len(cfg.mixer_pattern))
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return BlockGroup(cfg, rngs=rngs)

  return make(rngs)


def router_carry(cfg: LMConfig) -> bool:
  """Whether the carry between ``cfg``'s blocks holds a router state besides ``x``: with an MoE
  feed-forward whose router takes one (``layers.moe.RECURRENT_ROUTERS``)."""
  return cfg.ffn == "moe" and cfg.moe.router in layers.moe.RECURRENT_ROUTERS


def _call(block: Block, remat: bool) -> Callable:
  """``block`` as ``f(carry, segment_ids, cache)``; with ``remat`` its activations are recomputed
  in the backward pass (``jax.checkpoint`` over the block's split state), and what it sows inside
  comes back to ``block``."""
  if not remat:
    return lambda carry, segment_ids, cache: block(carry, segment_ids=segment_ids, cache=cache)
  graphdef, state = nnx.split(block)
  paths = []

  @jax.checkpoint
  def f(state, carry, segment_ids, cache):
    inner = nnx.merge(graphdef, state)
    out = inner(carry, segment_ids=segment_ids, cache=cache)
    paths[:], values = _sown(inner)
    return out, values

  def call(carry, segment_ids, cache):
    out, values = f(state, carry, segment_ids, cache)
    _resow(block, paths, values)
    return out

  return call


def _run_blocks(blocks, x, segment_ids, cache):
  caches = (None,) * len(blocks) if cache is None else cache
  new = []
  for block, c in zip(blocks, caches, strict=True):
    x, c = block(x, segment_ids=segment_ids, cache=c)
    new.append(c)
  return x, None if cache is None else tuple(new)


def _sown(module: nnx.Module) -> tuple[list, list]:
  """The paths and values of the stores of ``module`` and its submodules.

  Under ``nnx.capture`` every module holds a store (an ``nnx.Intermediate``) for what it sows,
  which a split carries like any variable. Inside a jax transform over a block's split state
  (remat, the scan over layers) the merged copy sows into copies of the stores; their values
  leave the transform as plain outputs, the paths recorded while tracing, and ``_resow`` puts
  them back into the block's own stores. Blocks are split one by one: flax 0.12 cannot flatten
  the state of an ``nnx.List`` under a capture (its store's key sorts against the list's integer
  keys).
  """
  flat = nnx.to_flat_state(nnx.state(module, nnx.Intermediate))
  return [path for path, _ in flat], [variable.get_value() for _, variable in flat]


def _resow(module: nnx.Module, paths: list, values: list) -> None:
  """Puts ``values`` (from ``_sown`` of a copy of ``module``) into the stores of ``module``."""
  if paths:
    flat = [(path, nnx.Intermediate(value)) for path, value in zip(paths, values, strict=True)]
    nnx.update(module, nnx.from_flat_state(flat))


def param_count_of(model: nnx.Module) -> int:
  """Number of parameter scalars in ``model`` (concrete or abstract)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
