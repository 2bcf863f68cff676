r"""The RAT and RMoE papers' smallest experiments, on CPU (``seed_models.md`` §3-4).

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

Every run trains through ``jaxrec.train``'s optimizer, sharded init and jitted train/eval steps
(no checkpoints or samples: the runs are thrown away). It writes ``<out_dir>/rat_moe.{json,png}``
and the section "RAT and RMoE: the papers' smallest experiments" of ``RESULTS.md``.

  python -m experiments.rat_moe                          # 20-30 min on 2 shared CPU cores
  python -m experiments.rat_moe --config.experiments=moe --config.moe.seeds=0,1,2
  python -m experiments.rat_moe --config.lm.steps=2000 --config.lm.d_model=256  # scale up
"""

import dataclasses
import math
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import tqdm
from absl import app, logging
from flax import nnx
from ml_collections import config_flags

from experiments import _cli, _rat_moe_report, _results
from jaxrec import data as data_lib
from jaxrec import sharding
from jaxrec import train as train_lib
from jaxrec.data import tasks as tasks_lib
from jaxrec.inference import evaluate_recall
from jaxrec.models import LM, LMConfig, get_preset, param_count

PARTS = ("lm", "mqar", "moe")
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(__file__), "configs", "rat_moe.py"),
  "The experiment's configuration file.",
  lock_config=True,
)


def run_experiments(config, command: str) -> dict:
  """Runs the parts of ``config.experiments`` and returns their results; writes them into the
  JSON (keeping the parts that did not run from an earlier run), the plot and the RESULTS.md
  section, each part with ``command`` (the command line that ran it).

  Raises:
    ConfigError: a field is invalid; the message names its ``--config.*`` flag.
  """
  parts = _names(config.experiments, "--config.experiments")
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
        "machine": _machine(),
        "seconds": time.perf_counter() - start,
        "settings": {"seed": config.seed, **config[part].to_dict()},
        "runs": runs,
      }
  _rat_moe_report.write(results, config.out_dir, config.results_md, _results.write_section)
  return results


@dataclasses.dataclass
class _Runner:
  """Trains and scores one model per plan item; ``bar`` advances by every train step."""

  config: object
  mesh: object
  bar: tqdm.tqdm
  # The model's graphdef, abstract state, optimizer and jitted steps per (LMConfig, part): the
  # seeds of one MoE router share them, so their steps compile once.
  _compiled: dict = dataclasses.field(default_factory=dict)

  def lm(self, chunk_size: int, cfg: LMConfig) -> dict:
    record = self._byte_lm(cfg, self.config.lm, self.config.seed)
    return {"chunk_size": chunk_size, "label": _label(chunk_size, self.config.lm.seq_len), **record}

  def mqar(self, chunk_size: int, cfg: LMConfig) -> dict:
    c = self.config.mqar
    task = _mqar_task(c)
    rows = tasks_lib.task_dataset(
      task,
      num_examples=c.steps * c.batch_size,
      batch_size=c.batch_size,
      seq_len=c.seq_len,
      seed=self.config.seed,
      shuffle=False,
    )
    train = iter(tasks_lib.read_ahead(rows))
    graphdef, state, record = self._train(cfg, c, self.config.seed, train)
    with jax.set_mesh(self.mesh):
      scores = evaluate_recall(
        nnx.merge(graphdef, state.params, state.rest),
        task,
        num_examples=c.test_examples,
        batch_size=math.gcd(64, c.test_examples),
        seed=self.config.seed + 1,  # examples the training never saw
        seq_len=c.seq_len,
      )
    record |= {"accuracy": scores["accuracy"], "exact_match": scores["exact_match"]}
    return {"chunk_size": chunk_size, "label": _label(chunk_size, c.seq_len), **record}

  def moe(self, item: tuple[str, int], cfg: LMConfig) -> dict:
    router, seed = item
    return {"router": router, "seed": seed, **self._byte_lm(cfg, self.config.moe, seed)}

  def _byte_lm(self, cfg: LMConfig, c, seed: int) -> dict:
    """Trains ``LM(cfg)`` on the embedded corpus (parameters and data order from ``seed``) and
    evaluates it on the validation split."""
    tokenizer = data_lib.load_tokenizer("byte")
    byte_lengths = train_lib.token_byte_lengths(tokenizer)
    rows = dict(tokenizer=tokenizer, seq_len=c.seq_len, batch_size=c.batch_size, seed=seed)
    train = iter(data_lib.make_lm_dataset(data_lib.stdlib_corpus(split="train"), **rows))
    _, state, record = self._train(cfg, c, seed, train, byte_lengths)
    val = data_lib.make_lm_dataset(
      data_lib.stdlib_corpus(split="validation"), shuffle=False, **rows
    )
    return record | self._evaluate(cfg, c, state, val, byte_lengths)

  def _train(self, cfg: LMConfig, c, seed: int, batches, byte_lengths=None):
    """Trains a fresh ``LM(cfg)`` for ``c.steps``; returns its graphdef, train state and record
    (parameters, median step time after the compiling first step, the loss every tenth step)."""
    graphdef, abstract, tx, train_step, _ = self._steps(cfg, c, byte_lengths)
    state = train_lib.init_train_state(lambda: LM(cfg, rngs=nnx.Rngs(seed)), tx, abstract)
    seconds, curve = [], []
    with jax.set_mesh(self.mesh):
      for step in range(1, c.steps + 1):
        batch = train_lib.global_batch(next(batches), self.mesh)
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        seconds.append(time.perf_counter() - start)
        if step % 10 == 0 or step == c.steps:
          curve.append((step, loss))
        self.bar.update()
    logging.info("%s: train loss %.4f after %d steps", _describe(cfg), loss, c.steps)
    record = {
      "params": param_count(cfg),
      "train_loss": loss,
      "step_ms": 1e3 * statistics.median(seconds[1:] or seconds),
      "curve": curve,
    }
    return graphdef, state, record

  def _steps(self, cfg: LMConfig, c, byte_lengths):
    key = (cfg, id(c))
    if key not in self._compiled:
      schedule = train_lib.warmup_cosine_schedule(
        c.learning_rate, c.steps, c.warmup_steps, c.learning_rate * 0.1
      )
      tx = train_lib.make_optimizer(schedule, weight_decay=0.1)
      graphdef, abstract = train_lib.abstract_train_state(
        lambda: LM(cfg, rngs=nnx.Rngs(0)), tx, self.mesh
      )
      train_step = train_lib.make_train_step(
        graphdef, tx, schedule, abstract, self.mesh, byte_lengths=byte_lengths
      )
      eval_step = train_lib.make_eval_step(graphdef, byte_lengths)
      self._compiled[key] = (graphdef, abstract, tx, train_step, eval_step)
    return self._compiled[key]

  def _evaluate(self, cfg, c, state, dataset, byte_lengths) -> dict:
    """Validation loss, bits per byte and the ``moe/*`` routing statistics over
    ``c.eval_batches``."""
    eval_step = self._steps(cfg, c, byte_lengths)[-1]
    batches = iter(dataset)
    sums = None
    with jax.set_mesh(self.mesh):
      for _ in range(c.eval_batches):
        out = jax.device_get(eval_step(state, train_lib.global_batch(next(batches), self.mesh)))
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    summary = train_lib.summarize(jax.tree.map(np.float64, sums))
    return {
      ("val_" + k if k in ("loss", "bits_per_byte") else k): float(v) for k, v in summary.items()
    }


def _plans(config, parts: list[str]) -> dict[str, list[tuple]]:
  """Every run of ``parts`` as ``(key, LMConfig)``, all built before any trains so that a bad
  setting stops the experiment at once."""
  vocab = data_lib.load_tokenizer("byte").vocab_size
  plans = {}
  if "lm" in parts:
    plans["lm"] = [
      (size, _rat_config(config.lm, size, vocab, "--config.lm"))
      for size in _ints(config.lm.chunk_sizes, "--config.lm.chunk_sizes")
    ]
  if "mqar" in parts:
    tokens = _mqar_task(config.mqar).num_tokens
    plans["mqar"] = [
      (size, _rat_config(config.mqar, size, tokens, "--config.mqar"))
      for size in _ints(config.mqar.chunk_sizes, "--config.mqar.chunk_sizes")
    ]
  if "moe" in parts:
    plans["moe"] = [
      ((router, seed), _moe_config(config.moe, router, vocab))
      for router in _names(config.moe.routers, "--config.moe.routers")
      for seed in _ints(config.moe.seeds, "--config.moe.seeds")
    ]
  return plans


def _mqar_task(c) -> tasks_lib.MQAR:
  try:
    return tasks_lib.MQAR(vocab_size=c.vocab_size, seq_len=c.seq_len, num_pairs=c.num_pairs)
  except ValueError as e:
    raise train_lib.ConfigError(f"--config.mqar.{e}") from e


def _moe_config(c, router: str, vocab_size: int) -> LMConfig:
  return _checked(
    c,
    "--config.moe",
    lambda: get_preset(
      "tiny-moe",
      vocab_size=vocab_size,
      d_model=c.d_model,
      num_layers=c.num_layers,
      num_heads=c.num_heads,
      max_seq_len=c.seq_len,
      moe_num_experts=c.num_experts,
      moe_top_k=c.top_k,
      moe_hidden=c.expert_hidden,
      moe_router_dim=c.router_dim,
      moe_router=router,
    ),
    {
      "max_seq_len": "seq_len",
      "moe_router": "routers",
      "moe_num_experts": "num_experts",
      "moe_top_k": "top_k",
      "moe_hidden": "expert_hidden",
      "moe_router_dim": "router_dim",
    },
  )


def _rat_config(c, chunk_size: int, vocab_size: int, flag: str) -> LMConfig:
  if not 1 <= chunk_size <= c.seq_len:
    raise train_lib.ConfigError(
      f"{flag}.chunk_sizes: expected chunk lengths in [1, seq_len={c.seq_len}], got {chunk_size}"
    )
  return _checked(
    c,
    flag,
    lambda: get_preset(
      "tiny-rat",
      vocab_size=vocab_size,
      d_model=c.d_model,
      num_layers=c.num_layers,
      num_heads=c.num_heads,
      max_seq_len=c.seq_len,
      rat_chunk_size=chunk_size,
    ),
    {"rat_chunk_size": "chunk_sizes", "max_seq_len": "seq_len"},
  )


def _checked(c, flag: str, build, renamed: dict[str, str]) -> LMConfig:
  """``build()``, with ``LMConfig``'s ``ValueError`` (which starts with its field) turned into a
  ``ConfigError`` naming the flag of section ``c`` that sets the field (the section's flag when
  none does, e.g. ``head_dim`` from ``d_model / num_heads``)."""
  try:
    return build()
  except ValueError as e:
    name = renamed.get(field := str(e).split(":", 1)[0], field)
    raise train_lib.ConfigError(f"{flag}.{name}: {e}" if name in c else f"{flag}: {e}") from e


def _label(chunk_size: int, seq_len: int) -> str:
  if chunk_size == 1:
    return "attention (L=1)"
  if chunk_size == seq_len:
    return f"RNN (L=T={seq_len})"
  return f"RAT (L={chunk_size})"


def _describe(cfg: LMConfig) -> str:
  if cfg.ffn == "moe":
    return f"MoE router {cfg.moe_router}"
  return f"RAT L={cfg.rat_chunk_size}"


def _names(spec: str, flag: str) -> list[str]:
  names = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not names:
    raise train_lib.ConfigError(f"{flag}: expected comma-separated names, got {spec!r}")
  return names


def _ints(spec, flag: str) -> list[int]:
  try:
    return [int(s) for s in _names(spec, flag)]
  except ValueError as e:
    raise train_lib.ConfigError(f"{flag}: expected comma-separated integers, got {spec!r}") from e


def _machine() -> str:
  return (
    f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
    f"backend {jax.default_backend()}, jax {jax.__version__}; shared with other jobs"
  ).replace(" ,", ",")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    run_experiments(_CONFIG.value, " ".join(["python -m experiments.rat_moe", *sys.argv[1:]]))


if __name__ == "__main__":
  _cli.run(main)
