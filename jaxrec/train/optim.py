"""Optimizer and learning-rate schedules.

* ``warmup_cosine_schedule``: linear warmup from 0 to the peak, cosine decay to ``end_lr``.
* ``wsd_schedule``: warmup-stable-decay. Its warmup starts from ``init_lr``, so continued
  pretraining can *re-warm* from the learning rate a previous run ended at up to the peak, hold it,
  then cool down (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train
  LLMs": re-warming and re-decaying recovers the loss of training from scratch on the union of the
  data; Hägele et al. 2024 for the ``1-sqrt`` cooldown shape).
* ``make_optimizer``: global-norm clipping, then AdamW with the weight decay masked off norms,
  biases, the input embedding and recurrent-gate parameters (``weight_decay_mask``).
* ``OptimConfig``: the ``optim`` section of an experiment config as one value, which builds the
  schedule and the optimizer for a run of a given length (what ``Trainer`` takes).

Gradient accumulation is not an optax wrapper here: the train step (``step.py``) scans over
microbatches and sums the token-weighted loss, so an accumulated step equals the large-batch step
exactly (see there).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer and learning-rate schedule of a run, as its config's ``optim`` section holds
  them (``OptimConfig(**config.optim)``); the run's length is given when they are built.

  Attributes:
    learning_rate: the peak (``cosine``, ``wsd``) or only (``constant``) learning rate.
    schedule: ``"cosine"`` (``warmup_cosine_schedule``), ``"wsd"`` (``wsd_schedule``) or
      ``"constant"`` (``learning_rate`` throughout, no warmup).
    warmup_steps: linear warmup steps (``cosine``, ``wsd``).
    end_lr_ratio: the final learning rate over the peak (``cosine``, ``wsd``).
    init_lr: where the ``wsd`` warmup starts (re-warming a continued run).
    decay_steps: the ``wsd`` cooldown; ``None`` is a fifth of the run (``wsd_decay_steps``).
    decay_shape: the ``wsd`` cooldown's shape, one of ``DECAY_SHAPES``.
    weight_decay, b1, b2, eps, clip_norm: ``make_optimizer``'s.
  """

  learning_rate: float
  schedule: str = "cosine"
  warmup_steps: int = 0
  end_lr_ratio: float = 0.1
  init_lr: float = 0.0
  decay_steps: int | None = None
  decay_shape: str = "1-sqrt"
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
    if self.schedule == "constant" and self.warmup_steps:
      raise ValueError(
        f"warmup_steps: the constant schedule has no warmup, expected 0, got {self.warmup_steps}"
      )

  def make_schedule(self, total_steps: int) -> optax.Schedule:
    """The learning rate of each step of a run of ``total_steps`` updates."""
    end_lr = self.learning_rate * self.end_lr_ratio
    if self.schedule == "constant":
      return optax.constant_schedule(self.learning_rate)
    if self.schedule == "wsd":
      return wsd_schedule(
        self.learning_rate,
        total_steps,
        self.warmup_steps,
        wsd_decay_steps(total_steps, self.decay_steps),
        init_lr=self.init_lr,
        end_lr=end_lr,
        decay_shape=self.decay_shape,
      )
    return warmup_cosine_schedule(self.learning_rate, total_steps, self.warmup_steps, end_lr)

  def make_optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``make_optimizer`` with this config's settings, following ``schedule``."""
    return make_optimizer(
      schedule,
      weight_decay=self.weight_decay,
      b1=self.b1,
      b2=self.b2,
      eps=self.eps,
      clip_norm=self.clip_norm,
    )


def wsd_decay_steps(total_steps: int, decay_steps: int | None = None) -> int:
  """The WSD cooldown of a run of ``total_steps``: ``decay_steps``, or a fifth of the run."""
  return total_steps // 5 if decay_steps is None else decay_steps


def warmup_cosine_schedule(
  peak_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0
) -> optax.Schedule:
  """``0 -> peak_lr`` linearly over ``warmup_steps``, then cosine to ``end_lr`` at ``total_steps``."""
  _check_steps(total_steps, warmup_steps, 0)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end_lr,
  )


def wsd_schedule(
  peak_lr: float,
  total_steps: int,
  warmup_steps: int,
  decay_steps: int,
  *,
  init_lr: float = 0.0,
  end_lr: float = 0.0,
  decay_shape: str = "1-sqrt",
) -> optax.Schedule:
  """Warmup-stable-decay, with re-warming from ``init_lr``.

  Steps ``[0, warmup)``: linear ``init_lr -> peak_lr``; ``[warmup, total - decay)``: constant
  ``peak_lr``; ``[total - decay, total]``: ``peak_lr -> end_lr`` with the given shape; constant
  ``end_lr`` afterwards.

  Args:
    peak_lr: the stable learning rate.
    total_steps: length of the schedule.
    warmup_steps: steps of the (re-)warmup.
    decay_steps: steps of the final cooldown.
    init_lr: where the warmup starts; the last learning rate of the previous phase when
      continuing pretraining, 0 for a fresh run.
    end_lr: learning rate at the end of the cooldown.
    decay_shape: ``"linear"``, ``"cosine"`` or ``"1-sqrt"`` (``1 - sqrt(progress)``).
  """
  _check_steps(total_steps, warmup_steps, decay_steps)
  if decay_shape not in DECAY_SHAPES:
    raise ValueError(f"decay_shape: expected one of {DECAY_SHAPES}, got {decay_shape!r}")
  decay_start = total_steps - decay_steps

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = init_lr + (peak_lr - init_lr) * count / max(warmup_steps, 1)
    progress = jnp.clip((count - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    if decay_shape == "linear":
      remaining = 1.0 - progress
    elif decay_shape == "cosine":
      remaining = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    else:
      remaining = 1.0 - jnp.sqrt(progress)
    cool = end_lr + (peak_lr - end_lr) * remaining
    return jnp.where(count < warmup_steps, warm, jnp.where(count < decay_start, peak_lr, cool))

  return schedule


def weight_decay_mask(params):
  """True for the parameters AdamW should decay.

  A parameter's own say comes first: ``weight_decay`` metadata on its ``nnx.Variable``, set with
  ``jaxrec.layers.logical_param(..., weight_decay=False)``, is obeyed whatever its shape.
  Recurrent-gate parameters use it: ParaRNN's recurrent diagonals and peepholes are ``[3, H, N/H]``
  arrays, matrices by their shape, but decay would pull them towards a cell that ignores its
  state (Mamba keeps its ``A_log`` out of weight decay for the same reason). Later mixers'
  recurrent diagonals and gate biases opt out the same way.

  Without that metadata, the shape rules. Decayed: weight matrices, i.e. two or more logical axes
  besides a stacked ``layers`` axis. Not decayed: biases (named ``bias``, whatever their rank),
  norm scales (a ``norm`` axis), and the input embedding table (first axis ``vocab``), whose
  decay pulls rare tokens' rows to zero. Parameters without logical names fall back to their
  rank.

  Args:
    params: a pytree of parameters: an ``nnx.State`` of ``nnx.Param`` (their metadata is read),
      or of plain arrays (rank rules only), as optax hands it over (parameters or updates).

  Returns:
    The same tree with a bool per parameter.
  """

  def decays(path, v):
    metadata = v.get_metadata() if isinstance(v, nnx.Variable) else {}
    if metadata.get("weight_decay") is not None:
      return bool(metadata["weight_decay"])
    if getattr(path[-1], "key", None) == "bias":
      return False
    names = metadata.get("out_sharding")
    if not names:
      return jnp.ndim(v) >= 2
    axes = [n for n in names if n != "layers"]
    return len(axes) >= 2 and "norm" not in axes and axes[0] != "vocab"

  return jax.tree_util.tree_map_with_path(
    decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def make_optimizer(
  schedule: optax.Schedule,
  *,
  weight_decay: float = 0.1,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
  """Clip by global norm (when ``clip_norm``), then AdamW with ``weight_decay_mask``."""
  if clip_norm is not None and clip_norm <= 0:
    raise ValueError(f"clip_norm: expected a positive number or None, got {clip_norm}")
  adamw = optax.adamw(
    schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
  )
  if clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def _check_steps(total_steps: int, warmup_steps: int, decay_steps: int) -> None:
  if total_steps < 1:
    raise ValueError(f"total_steps: expected a positive integer, got {total_steps}")
  if warmup_steps < 0 or decay_steps < 0:
    raise ValueError(
      f"warmup_steps, decay_steps: expected non-negative, got {warmup_steps}, {decay_steps}"
    )
  if warmup_steps + decay_steps > total_steps:
    raise ValueError(
      f"warmup_steps + decay_steps: expected at most total_steps={total_steps}, "
      f"got {warmup_steps} + {decay_steps}"
    )
