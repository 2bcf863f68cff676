r"""The recall suite: every registered mixer on MQAR, set disjointness and counting.

  python -m experiments.recall --config.out_dir=DIR [--config=experiments/configs/recall.py]
    [--config.FIELD=VALUE] [--publish=.]

For every mixer of the registry (``--config.mixers``; ``swa`` is attention with
``--config.window``) and every width of ``--config.d_models`` (the state sizes), models of
``(baseconv, mixer)`` layers are trained from scratch, with early stopping at
``--config.target_accuracy``:

1. on MQAR (``--config.num_layers`` layers), trained on the mix of settings
   ``--config.mqar.train_mix`` and scored on ``--config.mqar`` with the plain prompt and with
   JRT-Prompt at test time only;
2. on set disjointness (``--config.sets.num_layers`` layers, each layout of
   ``--config.sets.ffns``: with and without MLPs), the size pairs of ``--config.sets.sizes``
   mixed (both orders), scored per pair;
3. on set disjointness shown with JRT-Prompt (the context twice), trained and scored that way, for
   every mixer but full attention (order cannot matter to it) and PLA (it already reads the
   context non-causally); it shares the compiled train step of 2.

``--config.tasks`` picks some of them (``mqar``, ``sets``, ``sets_jrt``, ``counting``). Then the
counting mixers (``--config.counting.mixers``) are trained on counting in each format with a small
BPE tokenizer trained on the task's texts (where the formats tokenize differently, every count one
token), scored per length range.

Outputs, under ``--config.out_dir``: ``recall.json`` (every number, the config and the machine),
``mqar.png``, ``sets.png`` (accuracy against recurrent-state bytes), ``counting.png`` (each when
its task ran), the BPE ``tokenizer.json``, and the report ``RESULTS.md`` with the verdict on the
papers' claims; with ``--publish=.`` the same files in ``results/recall/`` and the section "Recall:
MQAR, set disjointness, counting" of the checkout's ``RESULTS.md``. This file parses flags and
calls ``run_sweep``.
"""

import dataclasses
import functools
import os
import sys
import tempfile
import time

import jax
import tqdm
from absl import app, logging
from flax import nnx

from experiments import _bench, _cli, _recall_report, _results
from experiments.configs import recall as recall_config
from jaxrec import sharding
from jaxrec import train as train_lib
from jaxrec.data import tasks as tasks_lib
from jaxrec.inference import recall_dataset, score_batches
from jaxrec.inference import state_bytes as inference_state_bytes
from jaxrec.models import LM, LMConfig, mixer_names, param_count

_CONFIG = _cli.define_config_flag(
  "Recall sweep configuration file.", default=os.path.abspath(recall_config.__file__)
)
_PUBLISH = _results.define_publish_flag()

EVAL_BATCH = 64
TASKS = ("mqar", "sets", "sets_jrt", "counting")
# Full attention and PLA are not trained with JRT-Prompt: reading order cannot matter to the one,
# the other already reads the context non-causally.
_NO_JRT = ("attention", "pla")


@dataclasses.dataclass(frozen=True)
class Variant:
  """A mixer as swept: ``name`` in the results, the registered ``mixer``, attention's window."""

  name: str
  mixer: str
  window: int | None = None


def sweep_variants(config) -> tuple[list[Variant], list[str]]:
  """The registered mixers the sweep runs (with ``swa``), and notes on those it leaves out."""
  registered = mixer_names()
  candidates = [Variant(m, m) for m in registered]
  if "attention" in registered:
    candidates.append(Variant("swa", "attention", config.window))
  wanted = train_lib.parse_list(config.mixers, "--config.mixers")
  known = {v.name for v in candidates}
  if wanted != ("all",):
    unknown = [w for w in wanted if w not in known]
    if unknown:
      raise train_lib.ConfigError(
        f"--config.mixers: unknown {unknown}; expected 'all' or names of {sorted(known)}"
      )
    candidates = [v for v in candidates if v.name in wanted]
  variants, notes = [], []
  width = train_lib.parse_list(config.d_models, "--config.d_models", int)[0]
  for variant in candidates:
    try:  # a mixer that needs settings this sweep does not give cannot run here
      _model_config(config, variant, width, 16, 8, config.num_layers, config.ffn)
    except ValueError as e:
      notes.append(f"{variant.name}: left out, its model cannot be built here ({e})")
      continue
    variants.append(variant)
  return variants, notes


def run_sweep(config, given: set[str] | frozenset = frozenset()) -> dict:
  """Runs the sweep of ``config`` (module docstring); returns what ``recall.json`` holds."""
  config = _resolve(config, given)
  if not config.out_dir:
    raise train_lib.ConfigError(
      "--config.out_dir: expected the folder for recall.json, the plots and the report, got ''"
    )
  variants, notes = sweep_variants(config)
  widths = train_lib.parse_list(config.d_models, "--config.d_models", int)
  tasks = _tasks(config)
  mqar = _mqar_tasks(config)
  sizes = _set_sizes(config.sets.sizes)
  sets = [tasks_lib.SetDisjointness(config.sets.vocab_size, a, b) for a, b in sizes]
  ffns = _ffns(config)
  # One device: the models are tiny, and the sweep's time goes to compiling them.
  mesh = sharding.make_mesh(sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1))
  runs = []
  set_runs = len(ffns) * sum(
    ("sets" in tasks) + ("sets_jrt" in tasks and _jrt_trained(v)) for v in variants
  )
  total = len(widths) * (len(variants) * ("mqar" in tasks) + set_runs)
  if "counting" in tasks:
    total += len(_counting_mixers(config)) * len(_counting_formats(config))
  bar = tqdm.tqdm(total=total, desc="recall sweep", disable=not config.progress, unit="run")
  start = time.perf_counter()
  for variant in variants:
    for width in widths:
      if "mqar" in tasks:
        runs.append(_run_mqar(config, variant, width, mqar, mesh, bar))
      if not {"sets", "sets_jrt"} & set(tasks):
        continue
      # Set disjointness and its JRT-Prompt form share a model configuration (one compile).
      row = max(s.max_prompt_length(config.sets.jrt_repeats) for s in sets)
      for ffn in ffns:
        cfg = _model_config(
          config, variant, width, sets[0].num_tokens, row, config.sets.num_layers, ffn
        )
        trainer = _trainer(cfg, config, config.sets.learning_rate, config.sets.steps, mesh)
        if "sets" in tasks:
          runs.append(_run_sets(trainer, config, variant, sets, sizes, 1, row, bar))
        if "sets_jrt" in tasks and _jrt_trained(variant):
          repeats = config.sets.jrt_repeats
          runs.append(_run_sets(trainer, config, variant, sets, sizes, repeats, row, bar))
  if "counting" in tasks:
    runs += _run_counting(config, mesh, bar)
  bar.close()
  _drawn_cached.cache_clear()
  seconds = time.perf_counter() - start
  return {
    "command": " ".join(["python -m experiments.recall", *sys.argv[1:]]),
    "config": config.to_dict(),
    "machine": _bench.machine(),
    "seconds": seconds,
    "notes": notes,
    "runs": runs,
  }


def _jrt_trained(variant: Variant) -> bool:
  """Whether set disjointness is also trained with JRT-Prompt for ``variant`` (``_NO_JRT``)."""
  return variant.mixer not in _NO_JRT or variant.window is not None


# ----------------------------------------------------------------------------------------------
# Training.


def _trainer(cfg: LMConfig, config, learning_rate: float, steps: int, mesh) -> train_lib.Trainer:
  """One model configuration, compiled once; every run it trains starts from the same
  initialization (``config.seed``)."""
  optim = train_lib.OptimConfig(
    learning_rate=learning_rate,
    warmup_steps=config.warmup_steps,
    weight_decay=config.weight_decay,
  )
  return train_lib.Trainer(cfg, optim, steps=steps, mesh=mesh, seed=config.seed)


def _fit(trainer: train_lib.Trainer, config, rows, validate) -> tuple[nnx.Module, dict]:
  """Trains a fresh model on ``rows`` until ``validate(model) >= target_accuracy`` (checked every
  ``eval_every`` steps) or the rows run out; returns it and its training record."""
  curve, start = [], time.perf_counter()
  steps = len(rows)

  def check(step, state, metrics):
    if step % config.eval_every and step != steps:
      return False
    accuracy = validate(trainer.model(state))
    curve.append({"step": step, "loss": float(metrics["loss"]), "accuracy": accuracy})
    logging.info("step %d: loss %.4f, validation accuracy %.3f", *curve[-1].values())
    return accuracy >= config.target_accuracy

  state, _ = trainer.fit(trainer.init(), rows, steps, callback=check)
  record = {"steps": int(state.step), "seconds": time.perf_counter() - start, "curve": curve}
  return trainer.model(state), record


def _train_rows(tasks, config, steps, repeats, row, prefix_len=None) -> tuple[dict, ...]:
  return _drawn(
    tasks, repeats, row, steps * config.batch_size, config.batch_size, config.seed, prefix_len
  )


def _score(model, task, config, *, repeats=1, row, examples=None, seed=2):
  examples = examples or config.test_examples
  return score_batches(model, _drawn(task, repeats, row, examples, EVAL_BATCH, config.seed + seed))


def _drawn(tasks, repeats, row, num_examples, batch_size, seed, prefix_len=None):
  """The batches of ``recall_dataset``, drawn once per sweep: every model trains and is scored on
  the same examples, and drawing one in Python costs more than its share of a train step."""
  tasks = tuple(tasks) if isinstance(tasks, list | tuple) else (tasks,)
  return _drawn_cached(tasks, repeats, row, num_examples, batch_size, seed, prefix_len)


@functools.lru_cache(maxsize=64)
def _drawn_cached(tasks, repeats, row, num_examples, batch_size, seed, prefix_len):
  ds = recall_dataset(
    tasks,
    num_examples=num_examples,
    batch_size=batch_size,
    seed=seed,
    repeats=repeats,
    seq_len=row,
    prefix_len=prefix_len,
    shuffle=False,
  )
  return tuple(ds[i] for i in range(len(ds)))


@dataclasses.dataclass(frozen=True)
class _MqarTasks:
  """MQAR as swept: ``test`` is scored; the models train on the mix ``train`` (Zoology's
  curriculum: fewer pairs in shorter sequences with the scored setting)."""

  test: tasks_lib.MQAR
  train: tuple[tasks_lib.MQAR, ...]

  @property
  def context_len(self) -> int:
    return 2 * self.test.num_pairs


def _run_mqar(config, variant, width, mqar: _MqarTasks, mesh, bar) -> dict:
  # PLA reads the first M tokens non-causally: M is the scored setting's context, and every
  # training context is left-padded to it (JRT-RNN's padding), else a shorter context's prefix
  # would hold questions and their answers.
  prefix_len = mqar.context_len if variant.mixer == "pla" else None
  test_row = {r: mqar.test.max_prompt_length(r) for r in (1, 2)}
  # PLA's training contexts are padded to its prefix: up to prefix_len - 2 D tokens longer.
  pad = lambda t: prefix_len - 2 * t.num_pairs if prefix_len else 0
  row = max(test_row[1], *(t.max_prompt_length(1) + pad(t) for t in mqar.train))
  cfg = _model_config(
    config,
    variant,
    width,
    mqar.test.num_tokens,
    max(row, test_row[2]),
    config.num_layers,
    config.ffn,
    prefix_len=mqar.context_len,
  )
  trainer = _trainer(cfg, config, config.learning_rate, config.steps, mesh)
  validate = functools.partial(
    _accuracy, task=mqar.test, config=config, repeats=1, row=test_row[1], metric="accuracy"
  )
  rows = _train_rows(mqar.train, config, config.steps, 1, row, prefix_len)
  model, record = _fit(trainer, config, rows, validate)
  scores = {
    f"repeats={r}": _score(model, mqar.test, config, repeats=r, row=test_row[r]) for r in (1, 2)
  }
  return _finish(bar, "mqar", variant, model.cfg, record, scores, test_row[1])


def _run_sets(trainer, config, variant, sets, sizes, repeats, row, bar) -> dict:
  validate = functools.partial(
    _accuracy, task=sets, config=config, repeats=repeats, row=row, metric="accuracy"
  )
  model, record = _fit(
    trainer, config, _train_rows(sets, config, config.sets.steps, repeats, row), validate
  )
  scores = {
    f"{a}x{b}": _score(model, task, config, repeats=repeats, row=row)
    for (a, b), task in zip(sizes, sets, strict=True)
  }
  family = "sets" if repeats == 1 else "sets_jrt"
  prompt = max(s.max_prompt_length(repeats) for s in sets)
  return _finish(bar, family, variant, model.cfg, record, scores, prompt)


def _accuracy(model, *, task, config, repeats, row, metric) -> float:
  return _score(
    model, task, config, repeats=repeats, row=row, examples=config.eval_examples, seed=1
  )[metric]


def _finish(bar, family, variant, cfg, record, scores, prompt_len) -> dict:
  run = {
    "family": family,
    "variant": variant.name,
    "d_model": cfg.d_model,
    "num_layers": cfg.num_layers,
    "ffn": cfg.ffn,
    "params": param_count(cfg),
    "state_bytes": state_bytes(cfg, prompt_len),
    **record,
    "scores": scores,
  }
  metric = "exact_match" if family.startswith("counting") else "accuracy"
  best = ", ".join(f"{k} {v[metric]:.3f}" for k, v in scores.items())
  bar.write(
    f"{family:9s} {variant.name:9s} {cfg.ffn:4s} d={cfg.d_model:<4d} state {run['state_bytes']:>8,d} B  "
    f"{record['steps']:>5d} steps {record['seconds']:5.0f} s  {best}"
  )
  bar.update()
  return run


# ----------------------------------------------------------------------------------------------
# Counting.


def _run_counting(config, mesh, bar) -> list[dict]:
  mixers, formats = _counting_mixers(config), _counting_formats(config)
  ranges = _ranges(config.counting.lengths)
  lo, hi = ranges[0][0], ranges[-1][1]
  path = os.path.join(config.out_dir, "tokenizer.json")
  tokenizer = _recall_report.train_bpe(config, lo, hi, path)
  counting = functools.partial(
    tasks_lib.Counting, tokenizer, alphabet=config.counting.alphabet, letter=config.counting.letter
  )
  try:
    train_tasks = {f: counting(format=f, min_length=lo, max_length=hi) for f in formats}
  except ValueError as e:
    raise train_lib.ConfigError(f"--config.counting: {e}") from e
  row = max(t.max_prompt_length(1) for t in train_tasks.values())
  runs = []
  for mixer in mixers:
    variant = Variant(mixer, mixer)
    cfg = _model_config(
      config,
      variant,
      config.counting.d_model,
      tokenizer.vocab_size,
      row,
      config.num_layers,
      config.ffn,
    )
    trainer = _trainer(cfg, config, config.learning_rate, config.counting.steps, mesh)
    for fmt, task in train_tasks.items():
      validate = functools.partial(
        _accuracy, task=task, config=config, repeats=1, row=row, metric="exact_match"
      )
      rows = _train_rows(task, config, config.counting.steps, 1, row)
      model, record = _fit(trainer, config, rows, validate)
      scores = {
        f"{a}-{b}": _score(model, counting(format=fmt, min_length=a, max_length=b), config, row=row)
        for a, b in ranges
      }
      record["tokens_per_letter"] = _recall_report.tokens_per_letter(task)
      runs.append(_finish(bar, f"counting:{fmt}", variant, cfg, record, scores, row))
  return runs


# ----------------------------------------------------------------------------------------------
# Configuration.


def _model_config(config, variant, width, vocab, row, num_layers, ffn, prefix_len=None) -> LMConfig:
  """The ``num_layers``-layer ``(baseconv, mixer)`` model of ``variant``; PLA's non-causal prefix
  is ``prefix_len`` tokens (default: the whole ``row``)."""
  feature_dim = max(1, width // config.feature_dim_ratio)
  return LMConfig(
    vocab_size=vocab,
    d_model=width,
    num_layers=num_layers,
    mixer_pattern=("baseconv", variant.mixer),
    ffn=ffn,
    num_heads=config.num_heads,
    max_seq_len=row,
    mixer_options={
      "attention": {"window": variant.window},
      "based": {"feature_dim": feature_dim},
      "pla": {"prefix_len": row if prefix_len is None else prefix_len, "feature_dim": feature_dim},
    },
  )


def state_bytes(cfg: LMConfig, prompt_len: int) -> int:
  """Bytes of the decoding state of a model of ``cfg`` after ``prompt_len`` tokens (batch 1)."""
  return inference_state_bytes(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))), prompt_len)


def _resolve(config, given):
  """``--config.full`` sets the paper-scale values of fields not given on the command line; then
  the fields that nothing else checks are checked."""
  config = config.copy_and_resolve_references()
  if config.full:
    for field, value in recall_config.FULL.items():
      if field not in given:
        section, _, name = field.rpartition(".")
        (config[section] if section else config)[name] = value
  for field in ("steps", "sets.steps", "counting.steps"):
    section, _, name = field.rpartition(".")
    steps = (config[section] if section else config)[name]
    if not isinstance(steps, int) or steps <= config.warmup_steps:
      raise train_lib.ConfigError(
        f"--config.{field}: expected more than --config.warmup_steps={config.warmup_steps} "
        f"(the cosine schedule decays after the warmup), got {steps!r}"
      )
  for field in (
    "batch_size",
    "eval_every",
    "eval_examples",
    "test_examples",
    "num_layers",
    "sets.num_layers",
  ):
    section, _, name = field.rpartition(".")
    value = (config[section] if section else config)[name]
    if not isinstance(value, int) or value < 1:
      raise train_lib.ConfigError(f"--config.{field}: expected a positive int, got {value!r}")
  for field in ("eval_examples", "test_examples"):
    if config[field] % EVAL_BATCH:
      raise train_lib.ConfigError(
        f"--config.{field}: expected a multiple of the evaluation batch {EVAL_BATCH}, got "
        f"{config[field]}"
      )
  if config.ffn not in ("mlp", "none"):
    raise train_lib.ConfigError(
      f"--config.ffn: expected 'mlp' or 'none' (the mixers alone), got {config.ffn!r}"
    )
  return config


def _ffns(config) -> tuple[str, ...]:
  ffns = train_lib.parse_list(config.sets.ffns, "--config.sets.ffns")
  unknown = [f for f in ffns if f not in ("mlp", "none")]
  if unknown:
    raise train_lib.ConfigError(
      f"--config.sets.ffns: expected 'mlp' and/or 'none' (the mixers alone), got {unknown}"
    )
  return ffns


def _mqar_tasks(config) -> _MqarTasks:
  """The scored MQAR setting and the training mix of ``--config.mqar.train_mix``."""
  c = config.mqar

  def task(seq_len, num_pairs, flag):
    try:
      return tasks_lib.MQAR(vocab_size=c.vocab_size, seq_len=seq_len, num_pairs=num_pairs)
    except ValueError as e:
      raise train_lib.ConfigError(f"{flag}: {e}") from e

  test = task(c.seq_len, c.num_pairs, "--config.mqar")
  mix = train_lib.parse_int_pairs(c.train_mix, "--config.mqar.train_mix", "x", "32x4,128x16")
  more = [f"{t}x{d}" for t, d in mix if d > c.num_pairs]
  if more:
    raise train_lib.ConfigError(
      f"--config.mqar.train_mix: expected at most the scored --config.mqar.num_pairs="
      f"{c.num_pairs} pairs (PLA's prefix is the scored context), got {more}"
    )
  return _MqarTasks(test, tuple(task(t, d, "--config.mqar.train_mix") for t, d in mix))


def _counting_mixers(config) -> tuple[str, ...]:
  return train_lib.parse_list(config.counting.mixers, "--config.counting.mixers")


def _counting_formats(config) -> tuple[str, ...]:
  formats = train_lib.parse_list(config.counting.formats, "--config.counting.formats")
  unknown = [f for f in formats if f not in tasks_lib.FORMATS]
  if unknown:
    raise train_lib.ConfigError(
      f"--config.counting.formats: unknown {unknown}; expected names of {tasks_lib.FORMATS}"
    )
  return formats


def _tasks(config) -> tuple[str, ...]:
  tasks = train_lib.parse_list(config.tasks, "--config.tasks")
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise train_lib.ConfigError(f"--config.tasks: unknown {unknown}; expected names of {TASKS}")
  return tasks


def _set_sizes(spec: str) -> tuple[tuple[int, int], ...]:
  return train_lib.parse_int_pairs(spec, "--config.sets.sizes", "x", "4x16,16x4")


def _ranges(spec: str) -> list[tuple[int, int]]:
  return sorted(train_lib.parse_int_pairs(spec, "--config.counting.lengths", "-", "4-8,9-12"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # Compiling dominates the sweep on a CPU; a persistent cache makes a rerun mostly training.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxrec-recall-xla-cache")
    )
  with _cli.short_errors():
    results = run_sweep(config, given=_cli.given_fields(_CONFIG))
    _recall_report.write(results, config.out_dir, _PUBLISH.value)


if __name__ == "__main__":
  _cli.run(main)
