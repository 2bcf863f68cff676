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
from jaxrec.layers import logical_param
from jaxrec.models.config import LMConfig
from jaxrec.models.mixers import build_mixer

Cache = Any  # a pytree of the mixers' caches, laid out like the blocks (see LM.init_cache)


class Block(nnx.Module):
  """``x += mixer(norm(x)); x += mlp(norm(x))``; the mixer is the one registered as ``mixer``
  (``jaxrec.models.registry``), built from ``cfg``."""

  def __init__(self, cfg: LMConfig, mixer: str, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mixer_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.mixer = build_mixer(mixer, cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm)
    shared = dict(
      init_std=cfg.init_std,
      num_layers=cfg.num_layers,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    if cfg.ffn == "moe":
      self.mlp = layers.MoE(
        cfg.d_model,
        cfg.mlp_dim if cfg.moe_hidden is None else cfg.moe_hidden,
        cfg.moe_num_experts,
        top_k=cfg.moe_top_k,
        capacity_factor=cfg.moe_capacity_factor,
        router=cfg.moe_router,
        router_dim=cfg.moe_router_dim,
        **shared,
      )
    else:
      self.mlp = layers.MLP(cfg.d_model, cfg.mlp_dim, **shared)

  def __call__(
    self, x, *, segment_ids=None, cache=None, router_state=None, cell=None, policy=None, layer=0
  ):
    """Returns ``(x, cache, router_state, stats)``; the last two are an MoE feed-forward's
    (``router_state`` passes through and ``stats`` is ``None`` with the SwiGLU MLP). ``policy``
    is a long-context policy for an attention mixer at depth ``layer``."""
    kw = dict(policy=policy, layer=layer) if self._reads_policy(policy) else {}
    y, cache = self.mixer(self.mixer_norm(x), segment_ids=segment_ids, cache=cache, **kw)
    x = x + y
    if isinstance(self.mlp, layers.MoE):
      y, router_state, stats = self.mlp(self.mlp_norm(x), router_state, cell=cell)
      return x + y, cache, router_state, stats
    return x + self.mlp(self.mlp_norm(x)), cache, router_state, None

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype, policy=None):
    kw = dict(policy=policy) if self._reads_policy(policy) else {}
    return self.mixer.init_cache(batch_size, max_length, dtype, **kw)

  def _reads_policy(self, policy) -> bool:
    """A long-context policy governs the mixers that attend with ``Attention``'s own call; other
    mixers (recurrent ones, Liger's) run unchanged beside it."""
    return policy is not None and type(self.mixer).__call__ is layers.Attention.__call__


class BlockGroup(nnx.Module):
  """One repetition of ``mixer_pattern``: the unit that ``scan_layers`` stacks and scans."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, name, rngs=rngs) for name in cfg.mixer_pattern])

  def __call__(self, x, *, segment_ids=None, cache=None):
    caches = (None,) * len(self.blocks) if cache is None else cache
    new = []
    for block, c in zip(self.blocks, caches, strict=True):
      x, c, _, _ = block(x, segment_ids=segment_ids, cache=c)
      new.append(c)
    return x, None if cache is None else tuple(new)

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
    if cfg.scan_layers:
      self.layers = _stacked_groups(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, name, rngs=rngs) for name in cfg.layer_mixers])
    self.final_norm = layers.RMSNorm(
      cfg.d_model, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    gru = cfg.ffn == "moe" and cfg.moe_router in layers.moe.GRU_ROUTERS
    # RMoE's one GRU shared by the routers of all layers.
    self.router_cell = (
      layers.GRURouterCell(cfg.moe_router_dim, param_dtype=param_dtype, rngs=rngs) if gru else None
    )
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
    policy: Any | None = None,
    return_aux: bool = False,
  ) -> tuple[jax.Array, Cache | None] | tuple[jax.Array, Cache | None, dict]:
    """Next-token logits.

    Args:
      tokens: int ``[B, T]``.
      segment_ids: int ``[B, T]`` document ids of packed sequences; mixers neither attend nor
        carry state across a change of id.
      cache: from ``init_cache`` or a previous call; the tokens continue it.
      policy: a long-context policy (``jaxrec.inference.longctx``) for the attention layers, each
        told its depth; the cache must come from ``init_cache(..., policy=policy)``.
      return_aux: also return the auxiliary outputs (``_moe_aux``): ``{}`` for a dense model.

    Returns:
      ``(logits, cache)``: fp32 ``[B, T, vocab_size]`` and the advanced cache (``None`` without
      one); with ``return_aux``, ``(logits, cache, aux)``.
    """
    self._validate(tokens, segment_ids)
    self._check_policy(policy)
    cfg = self.cfg
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(cfg.compute_dtype)
    stats = []
    if cfg.scan_layers:
      x, cache = self._scan_blocks(x, segment_ids, cache)
    else:
      caches = (None,) * len(self.layers) if cache is None else cache
      new = []
      router_state = None
      for layer, (block, c) in enumerate(zip(self.layers, caches, strict=True)):
        x, c, router_state, s = _call(block, cfg.remat, self.router_cell, policy, layer)(
          x, segment_ids, c, router_state
        )
        new.append(c)
        stats += [] if s is None else [s]
      cache = None if cache is None else tuple(new)
    h = self.final_norm(x)
    if self.head is None:
      logits = jnp.einsum("btd,vd->btv", h, self.embedding[...].astype(h.dtype))
    else:
      logits = self.head(h)
    logits = layers.soft_cap(logits.astype(jnp.float32), cfg.logit_soft_cap)
    if return_aux:
      return logits, cache, _moe_aux(stats, cfg)
    return logits, cache

  def _scan_blocks(self, x, segment_ids, cache):
    graphdef, state = nnx.split(self.layers)

    def body(x, group_and_cache):
      group_state, c = group_and_cache
      return nnx.merge(graphdef, group_state)(x, segment_ids=segment_ids, cache=c)

    if self.cfg.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    return lax.scan(body, x, (state, cache))

  def init_cache(
    self,
    batch_size: int,
    max_length: int | None = None,
    dtype: jnp.dtype | None = None,
    policy: Any | None = None,
  ) -> Cache:
    """Empty decoding caches for every mixer.

    Args:
      batch_size: ``B``.
      max_length: the most tokens the cache will hold (prompt and generated); default
        ``cfg.max_seq_len``.
      dtype: dtype of attention KV caches; default the compute dtype. Recurrent states are fp32.
      policy: a long-context policy; its attention layers get the policy's caches.

    Returns:
      a tuple with one cache per layer, or with ``scan_layers`` one per ``mixer_pattern`` entry,
      stacked over the groups.
    """
    self._check_policy(policy)
    max_length = self.cfg.max_seq_len if max_length is None else max_length
    dtype = self.cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
    if policy is not None:
      return tuple(block.init_cache(batch_size, max_length, dtype, policy) for block in self.layers)
    if self.cfg.scan_layers:
      groups = self.cfg.num_layers // len(self.cfg.mixer_pattern)
      group = self.layers.init_cache(batch_size, max_length, dtype)
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)), group)
    return tuple(block.init_cache(batch_size, max_length, dtype) for block in self.layers)

  def _check_policy(self, policy):
    if policy is None:
      return
    # By the methods Attention calls rather than by type: a model imports nothing from
    # jaxrec.inference, where the Policy class lives (generate and loglikelihood check the type).
    if not all(callable(getattr(policy, name, None)) for name in ("attend", "init_cache")):
      raise ValueError(
        "policy: expected None or a jaxrec.inference.longctx policy (lm_infinite, recycled, "
        f"longheads, think, set_based), got {policy!r}"
      )
    if self.cfg.scan_layers:
      raise ValueError(
        "policy: long-context policies need each layer's depth; build the model with "
        "scan_layers=False (got scan_layers=True)"
      )

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


def _call(
  block: Block, remat: bool, cell: nnx.Module | None, policy: Any = None, layer: int = 0
) -> Callable:
  """``block`` as ``f(x, segment_ids, cache, router_state)`` with the shared router ``cell`` (at
  depth ``layer`` under ``policy``); with ``remat`` its activations are recomputed in the
  backward pass (``jax.checkpoint`` over the block's split state)."""
  kw = dict(cell=cell, policy=policy, layer=layer)
  if not remat:
    return lambda x, segment_ids, cache, rs: block(
      x, segment_ids=segment_ids, cache=cache, router_state=rs, **kw
    )
  graphdef, state = nnx.split((block, cell))

  @jax.checkpoint
  def f(state, x, segment_ids, cache, rs):
    block, cell = nnx.merge(graphdef, state)
    return block(x, segment_ids=segment_ids, cache=cache, router_state=rs, **(kw | dict(cell=cell)))

  return lambda x, segment_ids, cache, rs: f(state, x, segment_ids, cache, rs)


def _moe_aux(stats: list, cfg: LMConfig) -> dict:
  """The weighted load-balancing loss (``aux_loss``, for the objective) and the routing
  statistics (``moe/*``, for the metrics), pooled over the MoE layers; ``{}`` without any."""
  if not stats:
    return {}
  s = layers.RoutingStats(*(jnp.stack(x) for x in zip(*stats, strict=True)))
  balance = layers.load_balancing_loss(s.load, s.prob)
  return {
    "aux_loss": cfg.moe_aux_weight * balance,
    "moe/balance_loss": balance,
    "moe/load_max": jnp.mean(jnp.max(s.load, -1)) * cfg.moe_num_experts,
    "moe/entropy": jnp.mean(s.entropy),
    "moe/dropped": jnp.mean(s.dropped),
    "moe/layer_mi_bits": layers.routing_mutual_information(s.top1, cfg.moe_num_experts),
    "moe/selected_weight": jnp.mean(s.selected),
    "moe/top_ratio": jnp.mean(s.top_ratio),
  }


def param_count_of(model: nnx.Module) -> int:
  """Number of parameter scalars in ``model`` (concrete or abstract)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
