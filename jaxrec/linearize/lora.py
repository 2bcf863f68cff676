"""LoRA (Hu et al. 2021): low-rank updates of chosen projections, trained while the rest stays
frozen, then merged into the weights.

``y = W x + (α / r) · B A x`` with ``A`` drawn at random and ``B = 0``, so the model is unchanged
until ``B`` trains. The factors are flax's ``nnx.LoRA`` (parameters of type ``nnx.LoRAParam``, a
``nnx.Param``); jaxrec's ``Dense`` keeps head axes separate (a query kernel is ``[D, H, K]``), so
``LoRADense`` flattens the contracted and produced axes around it. Training only the factors is a
filter: ``jaxrec.train.train_state_from_model(model, tx, mesh, trainable=nnx.LoRAParam)`` keeps
every other parameter out of the gradients and the optimizer state.

The factors carry logical axis names (the base kernel's first input and first output axis,
``"rank"`` between) so the sharding rules place them too.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import Dense

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


class LoRADense(nnx.Module):
  """``base(x) + (alpha / rank) · B A x`` around a ``Dense``.

  Args:
    base: the frozen projection.
    rank: ``r``, the width of the update.
    alpha: the update's scale is ``alpha / rank``.
    rngs: draws ``A`` (``nnx.LoRA``'s default, He-uniform); ``B`` starts at zero.
  """

  def __init__(self, base: Dense, *, rank: int, alpha: float, rngs: nnx.Rngs):
    kernel = base.kernel
    names = kernel.get_metadata()["out_sharding"]
    self.base = base
    self.in_shape = tuple(kernel.shape[: base.num_in])
    self.out_shape = tuple(kernel.shape[base.num_in :])
    self.scale = alpha / rank
    # Created on the default device like any new array; the train state places them.
    self.lora = nnx.LoRA(
      math.prod(self.in_shape),
      rank,
      math.prod(self.out_shape),
      dtype=base.dtype,
      param_dtype=kernel.dtype,
      a_metadata={"out_sharding": (names[0], "rank"), "eager_sharding": False},
      b_metadata={"out_sharding": ("rank", names[base.num_in]), "eager_sharding": False},
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[: x.ndim - len(self.in_shape)]
    update = self.lora(x.reshape(*lead, -1)).reshape(*lead, *self.out_shape)
    return self.base(x) + self.scale * update

  def merged_kernel(self) -> jax.Array:
    """``W + (alpha / rank) · A B`` in the kernel's shape and dtype (computed in fp32)."""
    kernel = self.base.kernel[...]
    a, b = (p[...].astype(jnp.float32) for p in (self.lora.lora_a, self.lora.lora_b))
    update = (self.scale * a @ b).reshape(kernel.shape)
    return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def apply_lora(
  model: nnx.Module,
  *,
  rank: int = 8,
  alpha: float = 8.0,
  targets: Sequence[str] = DEFAULT_TARGETS,
  seed: int = 0,
) -> nnx.Module:
  """Wraps every ``Dense`` attribute named in ``targets`` in a ``LoRADense``, in place.

  Args:
    model: an ``LM`` (or any module holding ``Dense`` projections) with unstacked layers.
    rank: ``r``.
    alpha: the update scale is ``alpha / rank`` (Liger: ``r = α = 8``).
    targets: attribute names of the projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
      the MLP's ``gate``, ``up``, ``down``, the LM's ``head``).
    seed: draws the ``A`` factors.

  Returns:
    ``model``, changed.

  Raises:
    ValueError: bad ``rank`` / ``alpha``, no projection named in ``targets``, LoRA already
      applied, or stacked (``scan_layers``) blocks.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank: expected a positive int, got {rank!r}")
  if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
    raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
  if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
    raise ValueError(f"targets: expected a sequence of attribute names, got {targets!r}")
  if getattr(getattr(model, "cfg", None), "scan_layers", False):
    raise ValueError("model: expected unstacked blocks (scan_layers=False)")
  if any(isinstance(node, LoRADense) for _, node in nnx.iter_graph(model)):
    raise ValueError("model: already has LoRA projections (merge_lora them first)")
  rngs = nnx.Rngs(seed)
  found = [
    (parent, name)
    for _, parent in nnx.iter_graph(model)
    if isinstance(parent, nnx.Module)
    for name in targets
    if isinstance(getattr(parent, name, None), Dense)
  ]
  if not found:
    raise ValueError(f"targets: no Dense projection named {tuple(targets)} in the model")
  for parent, name in found:
    setattr(parent, name, LoRADense(getattr(parent, name), rank=rank, alpha=alpha, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every ``LoRADense`` into its base kernel and puts the ``Dense`` back, in place;
  returns ``model``, whose outputs are unchanged (up to rounding) and which has no LoRA left."""
  found = [
    (parent, name, child)
    for _, parent in nnx.iter_graph(model)
    if isinstance(parent, nnx.Module)
    for name, child in vars(parent).items()
    if isinstance(child, LoRADense)
  ]
  for parent, name, child in found:
    child.base.kernel[...] = child.merged_kernel()
    setattr(parent, name, child.base)
  return model
