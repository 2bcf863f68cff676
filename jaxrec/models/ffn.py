"""The feed-forward of every block, and the options of the mixture-of-experts one.

``LMConfig.ffn`` picks it: ``"mlp"``, a SwiGLU ``layers.MLP`` of width ``cfg.mlp_dim``,
``"moe"``, a ``layers.MoE`` configured by ``cfg.moe``, or ``"none"``: blocks of a mixer alone
(JRT's and Zoology's synthetic-task models alternate BaseConv and a mixer without MLPs) (``MoEOptions``, flags
``--config.model.moe.<option>``). The feed-forward is the one option group that belongs to no
mixer: it is a field of ``LMConfig`` rather than an entry of ``LMConfig.mixer_options``, and its
builder is here rather than in the mixer registry.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxrec import layers
from jaxrec.models import _checks

FFNS = ("mlp", "moe", "none")


@dataclasses.dataclass(frozen=True)
class MoEOptions:
  """The mixture-of-experts feed-forward (``ffn="moe"``, ``layers.MoE``).

  Attributes:
    num_experts: experts per MoE layer.
    top_k: experts per token, at most ``num_experts``.
    capacity_factor: expert capacity as a multiple of the balanced load; ``None``: no drops.
    dispatch: ``"capacity"`` (one-hot slots, ``capacity_factor``) or ``"sorted"`` (dropless:
      tokens sorted by expert, grouped matmuls; ``layers.moe``).
    router: ``"linear" | "gru" | "gru_no_recurrence" | "gru_detached" | "mlp"``
      (``jaxrec.layers.moe``); the GRU routers share one ``GRURouterCell`` across layers.
    router_dim: the router state width ``p``.
    hidden: every expert's hidden width; ``None`` means the model's ``mlp_dim``.
    aux_weight: weight of the load-balancing loss added to the training loss.
  """

  num_experts: int = 8
  top_k: int = 2
  capacity_factor: float | None = 1.25
  dispatch: str = "capacity"
  router: str = "linear"
  router_dim: int = 128
  hidden: int | None = None
  aux_weight: float = 0.01

  def __post_init__(self):
    for field in ("num_experts", "top_k", "router_dim"):
      _checks.check_positive_int(field, getattr(self, field))
    _checks.check_positive_int_or_none("hidden", self.hidden)
    if self.top_k > self.num_experts:
      raise ValueError(f"top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
    _checks.check_positive_number("capacity_factor", self.capacity_factor, allow_none=True)
    _checks.check_choice("dispatch", self.dispatch, layers.moe.DISPATCHES)
    _checks.check_choice("router", self.router, layers.moe.ROUTERS)
    _checks.check_non_negative_number("aux_weight", self.aux_weight)


def build_ffn(
  cfg, *, router_cell: layers.GRURouterCell | None = None, rngs: nnx.Rngs
) -> nnx.Module:
  """The feed-forward of a block of the ``LMConfig`` ``cfg`` (not named here: ``config`` imports
  this module for ``MoEOptions``), ``None`` for ``ffn="none"``; ``router_cell`` is the GRU cell
  the model's MoE layers share (for a GRU router)."""
  if cfg.ffn == "none":
    return None
  shared = dict(
    init_std=cfg.init_std,
    num_layers=cfg.num_layers,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    rngs=rngs,
  )
  if cfg.ffn == "moe":
    moe = cfg.moe
    return layers.MoE(
      cfg.d_model,
      cfg.mlp_dim if moe.hidden is None else moe.hidden,
      moe.num_experts,
      top_k=moe.top_k,
      capacity_factor=moe.capacity_factor,
      dispatch=moe.dispatch,
      router=moe.router,
      router_dim=moe.router_dim,
      router_cell=router_cell,
      **shared,
    )
  return layers.MLP(cfg.d_model, cfg.mlp_dim, **shared)
