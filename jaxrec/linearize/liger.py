"""Liger conversion (Lan et al. 2025): every softmax-attention layer of a pretrained ``LM``
becomes a gated recurrent layer (``jaxrec.layers.LigerAttention``) that reuses its query, key,
value and output weights; MLPs, norms, embeddings and head are unchanged, and no parameter is
added (unless the ablation ``gate_source="projection"`` asks for a random gate projection).

The converted model is a plain ``LM`` whose ``mixer_pattern`` names ``"liger"`` for the converted
layers, so it trains with ``jaxrec.train``, decodes with ``jaxrec.generate`` from a constant-size
state (the recurrent state plus the window's keys and values) and is saved like any model.
Quality comes back by fine-tuning, in the paper with LoRA on the query, key and value
projections (``jaxrec.linearize.lora``).
"""

import jax
from flax import nnx

from jaxrec.layers.liger import LigerGateSource, LigerVariant
from jaxrec.models import LM


def liger(
  model: LM,
  *,
  variant: LigerVariant = "gla",
  window: int | None = 64,
  recurrence: bool = True,
  hybrid_every: int | None = None,
  gate_source: LigerGateSource = "key",
  seed: int = 0,
) -> LM:
  """A linearized copy of ``model``, sharing its parameter arrays.

  Args:
    model: a pretrained ``LM`` with ``"attention"`` layers (``load_pretrained``, a jaxrec run);
      its other layers are kept as they are.
    variant: the recurrence, ``"gla"`` (Liger-GLA) or ``"hgrn2"``.
    window: keys seen by the sliding-window softmax branch of Liger Attention; ``None`` keeps
      the recurrence alone (the paper's "w/o SWA" ablation).
    recurrence: ``False`` keeps the sliding window alone (the "SWA only" ablation: what the
      recurrence adds).
    hybrid_every: keep softmax attention in every ``hybrid_every``-th attention layer (layers
      ``i`` with ``i % hybrid_every == hybrid_every - 1``; the paper's "-H" models keep about
      one in seven); ``None`` converts them all.
    gate_source: ``"key"`` (Liger) or ``"projection"``, a new random gate projection (ablation).
    seed: initializes the parameters the conversion adds (only ``gate_source="projection"``).

  Returns:
    The converted ``LM``; ``model`` is left as it was.

  Raises:
    ValueError: ``model`` is not an ``LM`` of attention layers in a loop (``scan_layers``
      models are stacked), or an option is out of range.
  """
  if not isinstance(model, LM):
    raise ValueError(f"model: expected a jaxrec.models.LM, got {type(model).__name__}")
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError("model: expected a model with scan_layers=False (its blocks are stacked)")
  if "attention" not in cfg.layer_mixers:
    raise ValueError(f"model: has no 'attention' layer to convert (mixers {cfg.layer_mixers})")
  if hybrid_every is not None and (
    isinstance(hybrid_every, bool) or not isinstance(hybrid_every, int) or hybrid_every < 2
  ):
    raise ValueError(f"hybrid_every: expected an int >= 2 or None, got {hybrid_every!r}")

  def converted(i: int, mixer: str) -> str:
    keep = hybrid_every is not None and i % hybrid_every == hybrid_every - 1
    return "liger" if mixer == "attention" and not keep else mixer

  pattern = tuple(converted(i, m) for i, m in enumerate(cfg.layer_mixers))
  # LMConfig validates the options and names the bad one (liger.variant, ...).
  new_cfg = cfg.replace(
    mixer_pattern=pattern,
    liger=dict(variant=variant, window=window, recurrence=recurrence, gate_source=gate_source),
  )
  return _with_parameters(new_cfg, nnx.state(model), seed)


def _with_parameters(cfg, source: nnx.State, seed: int) -> LM:
  """``LM(cfg)`` holding ``source``'s arrays wherever its parameter paths match; the others are
  initialized from ``seed`` in one jitted call that computes only them."""
  graphdef, target = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(seed))))
  given = dict(nnx.to_flat_state(source))
  flat = list(nnx.to_flat_state(target))
  new = {p for p, _ in flat if p not in given}

  @jax.jit
  def fresh():
    state = nnx.state(LM(cfg, rngs=nnx.Rngs(seed)))
    return {p: v.get_value() for p, v in nnx.to_flat_state(state) if p in new}

  made = fresh() if new else {}
  leaves = []
  for path, var in flat:
    if path in new:
      leaves.append((path, var.replace(made[path])))
      continue
    value = given[path].get_value()
    if (value.shape, value.dtype) != (var.shape, var.dtype):
      raise ValueError(
        f"model: parameter {path} is {value.dtype}{value.shape}; the converted layer needs "
        f"{var.dtype}{var.shape}"
      )
    leaves.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))
