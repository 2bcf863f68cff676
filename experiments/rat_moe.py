r"""RAT and RMoE at small scale, on CPU (the reference note's CPU experiments, ``seed_models.md``
§3-4, scaled down: the papers' own runs are 1.3B-parameter RAT models and enwik8 RMoE models of
6-32 layers).

* **LM sweep over L**: byte-level LMs on the embedded corpus whose every layer is RAT with chunk
  length ``L`` (``L = 1`` is attention, ``L = T`` the gated RNN): validation bits per byte and the
  median train step time. RAT's claim: quality moves smoothly with ``L``, RAT(16) within about 1%
  of attention.
* **MQAR**: the same models trained on multi-query associative recall (``jaxrec.data.tasks.MQAR``)
  and scored on held-out examples (``jaxrec.inference.evaluate_recall``). RAT's claim: attention
  ≳ RAT(small L) > RAT(large L) ≫ RNN.
* **MoE routers**: attention LMs with an MoE feed-forward routed by the linear router (SMoE), the
  RMoE GRU router, and the ablations (an MLP router, the GRU without the state passed between
  layers, the GRU with it detached), over seeds: validation bits per byte and the routing
  statistics of ``LM``'s ``moe/*`` metrics. RMoE's claim: RMoE < no-recurrence ≈ SMoE < detach.

Every run trains through ``jaxrec.train.Trainer`` (no checkpoints or samples: the runs are thrown
away). It writes ``DIR/rat_moe.{json,png}`` and ``DIR/RESULTS.md`` (the report), ``DIR`` being
``--config.out_dir``; with ``--publish=.`` also ``results/rat_moe.{json,png}`` and the section
"RAT and RMoE at small scale" of the checkout's ``RESULTS.md``.

  python -m experiments.rat_moe --config.out_dir=DIR     # 20-30 min on 2 shared CPU cores
  python -m experiments.rat_moe --config.out_dir=DIR --config.experiments=moe \
    --config.moe.seeds=0,1,2
  python -m experiments.rat_moe --config.out_dir=DIR --config.lm.steps=2000 \
    --config.lm.d_model=256  # scale up
"""

import dataclasses
import math
import os
import statistics
import sys
import time

import jax
import tqdm
from absl import app, logging

from experiments import _bench, _cli, _rat_moe_report, _results
from jaxrec import data as data_lib
from jaxrec import sharding
from jaxrec import train as train_lib
from jaxrec.data import tasks as tasks_lib
from jaxrec.inference import evaluate_recall
from jaxrec.models import LMConfig, get_preset, param_count

PARTS = ("lm", "mqar", "moe")
_CONFIG = _cli.define_config_flag(
  "The experiment's configuration file.",
  os.path.join(os.path.dirname(__file__), "configs", "rat_moe.py"),
)
_PUBLISH = _results.define_publish_flag()


def run_experiments(config, command: str, publish: str | None = None) -> dict:
  """Runs the parts of ``config.experiments`` and returns their results; writes them into the
  JSON (keeping the parts that did not run from an earlier run), the plot and the report under
  ``config.out_dir`` (and the checkout ``publish``), each part with ``command`` (the command line
  that ran it).

  Raises:
    ConfigError: a field is invalid; the message names its ``--config.*`` flag.
  """
  if not config.out_dir:
    raise train_lib.ConfigError(
      "--config.out_dir: expected the folder for rat_moe.json, rat_moe.png and the report, got ''"
    )
  parts = train_lib.parse_list(config.experiments, "--config.experiments")
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise train_lib.ConfigError(f"--config.experiments: expected names of {PARTS}, got {unknown}")
  plans = _plans(config, parts)
  for p in parts:
    if not 0 <= config[p].warmup_steps <= config[p].steps:
      raise train_lib.ConfigError(
        f"--config.{p}.warmup_steps: expected at most --config.{p}.steps={config[p].steps}, got "
        f"{config[p].warmup_steps}"
      )
  total = sum(len(plan) * config[p].steps for p, plan in plans.items())
  mesh = sharding.make_mesh(sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1))
  results = {}
  with tqdm.tqdm(total=total, unit="step", disable=not config.progress, file=sys.stderr) as bar:
    runner = _Runner(config, mesh, bar)
    for part, plan in plans.items():
      start = time.perf_counter()
      runs = [getattr(runner, part)(key, cfg) for key, cfg in plan]
      results[part] = {
        "command": command,
        "machine": _bench.machine(),
        "seconds": time.perf_counter() - start,
        "settings": {"seeds": config.seeds, **config[part].to_dict()},
        "runs": runs,
      }
  _rat_moe_report.write(results, config.out_dir, publish)
  return results


@dataclasses.dataclass
class _Runner:
  """Trains and scores one model per plan item; ``bar`` advances by every train step."""

  config: object
  mesh: object
  bar: tqdm.tqdm
  # One trainer per (LMConfig, part): the seeds of one MoE router share it, so their steps
  # compile once.
  _trainers: dict = dataclasses.field(default_factory=dict)

  def lm(self, item: tuple[int, int], cfg: LMConfig) -> dict:
    chunk_size, seed = item
    record = self._byte_lm(cfg, self.config.lm, seed)
    label = _label(chunk_size, self.config.lm.seq_len)
    return {"chunk_size": chunk_size, "seed": seed, "label": label, **record}

  def mqar(self, item: tuple[int, int], cfg: LMConfig) -> dict:
    chunk_size, seed = item
    c = self.config.mqar
    task = _mqar_task(c)
    rows = tasks_lib.task_dataset(
      task,
      num_examples=c.steps * c.batch_size,
      batch_size=c.batch_size,
      seq_len=c.seq_len,
      seed=seed,
      shuffle=False,
    )
    trainer = self._trainer(cfg, c)
    state, record = self._train(trainer, cfg, c, seed, tasks_lib.read_ahead(rows))
    with jax.set_mesh(self.mesh):
      scores = evaluate_recall(
        trainer.model(state),
        task,
        num_examples=c.test_examples,
        batch_size=math.gcd(64, c.test_examples),
        seed=seed + 1_000_003,  # examples no training seed's stream holds
        seq_len=c.seq_len,
      )
    record |= {"accuracy": scores["accuracy"], "exact_match": scores["exact_match"]}
    return {
      "chunk_size": chunk_size,
      "seed": seed,
      "label": _label(chunk_size, c.seq_len),
      **record,
    }

  def moe(self, item: tuple[str, int], cfg: LMConfig) -> dict:
    router, seed = item
    record = self._byte_lm(cfg, self.config.moe, seed, at_init=True)
    return {"router": router, "seed": seed, **record}

  def _byte_lm(self, cfg: LMConfig, c, seed: int, at_init: bool = False) -> dict:
    """Trains ``LM(cfg)`` on the embedded corpus (parameters and data order from ``seed``) and
    evaluates it on the validation split: loss, bits per byte and the ``moe/*`` routing
    statistics over ``c.eval_batches``; with ``at_init`` also the routing statistics of the
    initial parameters (``init/moe/*``: how far training moved the routers)."""
    tokenizer = data_lib.load_tokenizer("byte")
    byte_lengths = train_lib.token_byte_lengths(tokenizer)
    rows = dict(tokenizer=tokenizer, seq_len=c.seq_len, batch_size=c.batch_size, seed=seed)
    train = data_lib.make_lm_dataset(data_lib.stdlib_corpus(split="train"), **rows)
    trainer = self._trainer(cfg, c, byte_lengths)
    state, record = self._train(trainer, cfg, c, seed, train)
    val = data_lib.make_lm_dataset(
      data_lib.stdlib_corpus(split="validation"), shuffle=False, **rows
    )
    summary = trainer.evaluate(state, val, c.eval_batches)
    record |= {
      ("val_" + k if k in ("loss", "bits_per_byte") else k): float(v) for k, v in summary.items()
    }
    if at_init:
      initial = trainer.evaluate(trainer.init(seed), val, c.eval_batches)
      record |= {f"init/{k}": float(v) for k, v in initial.items() if k.startswith("moe/")}
    return record

  def _train(self, trainer, cfg: LMConfig, c, seed: int, batches):
    """Trains a fresh ``LM(cfg)`` of ``seed`` for ``c.steps``; returns its train state and record
    (parameters, median step time after the compiling first step, the loss every tenth step).
    A step's time runs from the end of the previous one to its loss on the host, its batch
    included."""
    seconds, curve = [], []
    clock = time.perf_counter()

    def record(step, state, metrics):
      nonlocal clock
      loss = float(metrics["loss"])  # waits for the step
      seconds.append(time.perf_counter() - clock)
      if step % 10 == 0 or step == c.steps:
        curve.append((step, loss))
      self.bar.update()
      clock = time.perf_counter()

    state, metrics = trainer.fit(trainer.init(seed), batches, c.steps, callback=record)
    loss = float(metrics["loss"])
    logging.info("%s: train loss %.4f after %d steps", _describe(cfg), loss, c.steps)
    return state, {
      "params": param_count(cfg),
      "train_loss": loss,
      "step_ms": 1e3 * statistics.median(seconds[1:] or seconds),
      "curve": curve,
    }

  def _trainer(self, cfg: LMConfig, c, byte_lengths=None) -> train_lib.Trainer:
    key = (cfg, id(c))
    if key not in self._trainers:
      optim = train_lib.OptimConfig(learning_rate=c.learning_rate, warmup_steps=c.warmup_steps)
      self._trainers[key] = train_lib.Trainer(
        cfg, optim, steps=c.steps, mesh=self.mesh, byte_lengths=byte_lengths
      )
    return self._trainers[key]


def _plans(config, parts: tuple[str, ...]) -> dict[str, list[tuple]]:
  """Every run of ``parts`` as ``(key, LMConfig)``, all built before any trains so that a bad
  setting stops the experiment at once."""
  vocab = data_lib.load_tokenizer("byte").vocab_size
  seeds = train_lib.parse_list(config.seeds, "--config.seeds", int)
  plans = {}
  if "lm" in parts:
    plans["lm"] = [
      ((size, seed), _rat_config(config.lm, size, vocab, "--config.lm"))
      for size in train_lib.parse_list(config.lm.chunk_sizes, "--config.lm.chunk_sizes", int)
      for seed in seeds
    ]
  if "mqar" in parts:
    tokens = _mqar_task(config.mqar).num_tokens
    plans["mqar"] = [
      ((size, seed), _rat_config(config.mqar, size, tokens, "--config.mqar", _mqar_pattern(config)))
      for size in train_lib.parse_list(config.mqar.chunk_sizes, "--config.mqar.chunk_sizes", int)
      for seed in seeds
    ]
  if "moe" in parts:
    plans["moe"] = [
      ((router, seed), _moe_config(config.moe, router, vocab))
      for router in train_lib.parse_list(config.moe.routers, "--config.moe.routers")
      for seed in train_lib.parse_list(config.moe.seeds, "--config.moe.seeds", int)
    ]
  return plans


def _mqar_task(c) -> tasks_lib.MQAR:
  try:
    return tasks_lib.MQAR(vocab_size=c.vocab_size, seq_len=c.seq_len, num_pairs=c.num_pairs)
  except ValueError as e:
    raise train_lib.ConfigError(f"--config.mqar.{e}") from e


# The LMConfig field or option (group.option) each setting of a part's section gives, by the
# setting's name: an error of LMConfig (which starts with its field or option) names the flag to
# fix.
_RAT_SETTINGS = {
  "d_model": "d_model",
  "num_layers": "num_layers",
  "num_heads": "num_heads",
  "max_seq_len": "seq_len",
}
_MOE_SETTINGS = _RAT_SETTINGS | {
  "moe.num_experts": "num_experts",
  "moe.top_k": "top_k",
  "moe.hidden": "expert_hidden",
  "moe.router_dim": "router_dim",
}


def _moe_config(c, router: str, vocab_size: int) -> LMConfig:
  settings = _MOE_SETTINGS | {"moe.router": "routers", "moe.capacity_factor": "capacity_factor"}
  # Dropless: tokens sorted by expert and grouped matmuls (layers.moe); else the capacity path.
  dispatch = _capacity(c.capacity_factor)
  swept = {"moe.router": router, "moe.capacity_factor": dispatch[1], "moe.dispatch": dispatch[0]}
  return _model_config("tiny-moe", c, "--config.moe", settings, vocab_size, swept)


def _capacity(value) -> tuple[str, float | None]:
  """``(dispatch, capacity_factor)`` of ``--config.moe.capacity_factor``: ``"none"`` is the
  dropless sorted dispatch, a positive number the capacity dispatch with that factor."""
  if isinstance(value, str) and value.strip().lower() == "none":
    return "sorted", None
  try:
    factor = float(value)
  except (TypeError, ValueError):
    factor = -1.0
  if not factor > 0:
    raise train_lib.ConfigError(
      f"--config.moe.capacity_factor: expected 'none' (dropless) or a positive number, got "
      f"{value!r}"
    )
  return "capacity", factor


def _rat_config(
  c, chunk_size: int, vocab_size: int, flag: str, pattern: tuple[str, ...] = ("rat",)
) -> LMConfig:
  if not 1 <= chunk_size <= c.seq_len:
    raise train_lib.ConfigError(
      f"{flag}.chunk_sizes: expected chunk lengths in [1, seq_len={c.seq_len}], got {chunk_size}"
    )
  settings = _RAT_SETTINGS | {"rat.chunk_size": "chunk_sizes"}
  swept = {"rat.chunk_size": chunk_size, "mixer_pattern": pattern}
  return _model_config("tiny-rat", c, flag, settings, vocab_size, swept)


def _mqar_pattern(config) -> tuple[str, ...]:
  short_conv = config.mqar.short_conv  # a bool: ml_collections refuses any other type
  if short_conv and config.mqar.num_layers % 2:
    raise train_lib.ConfigError(
      f"--config.mqar.num_layers: expected an even number with --config.mqar.short_conv=True "
      f"(BaseConv and RAT layers alternate), got {config.mqar.num_layers}"
    )
  return ("baseconv", "rat") if short_conv else ("rat",)


def _model_config(preset: str, c, flag: str, settings, vocab_size: int, swept) -> LMConfig:
  """``preset`` with each field or option of ``settings`` from its setting in section ``c`` (a
  ``swept`` one from its value), ``LMConfig``'s ``ValueError`` turned into a ``ConfigError``
  naming the flag of the setting (the section's flag when no setting gives the field, e.g.
  ``head_dim`` from ``d_model / num_heads``)."""
  values = {key: c[name] for key, name in settings.items() if key not in swept} | swept
  overrides = {}
  for key, value in values.items():
    group, _, option = key.rpartition(".")
    if group:
      overrides.setdefault(group, {})[option] = value
    else:
      overrides[key] = value
  try:
    return get_preset(preset, vocab_size=vocab_size, **overrides)
  except ValueError as e:
    name = settings.get(str(e).split(":", 1)[0])
    raise train_lib.ConfigError(f"{flag}.{name}: {e}" if name else f"{flag}: {e}") from e


def _label(chunk_size: int, seq_len: int) -> str:
  if chunk_size == 1:
    return "attention (L=1)"
  if chunk_size == seq_len:
    return f"RNN (L=T={seq_len})"
  return f"RAT (L={chunk_size})"


def _describe(cfg: LMConfig) -> str:
  if cfg.ffn == "moe":
    return f"MoE router {cfg.moe.router}"
  return f"RAT L={cfg.options('rat').chunk_size}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    command = " ".join(["python -m experiments.rat_moe", *sys.argv[1:]])
    run_experiments(_CONFIG.value, command, _PUBLISH.value)


if __name__ == "__main__":
  _cli.run(main)
