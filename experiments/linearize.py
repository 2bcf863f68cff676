r"""Liger: linearize a pretrained transformer into a gated recurrent LM and recover its quality
with LoRA. ``python -m experiments.linearize --workdir DIR [--config.FIELD=VALUE ...]``.

The config is ``experiments/configs/linearize.py``. In order:

1. The teacher: ``--config.teacher`` names a jaxrec run (its ``run.json``), a Hugging Face
   checkpoint directory, or a real model by name or GGUF file (``models.load_model``:
   ``--config.teacher=smollm2-135m``); without it a small Llama-style teacher is trained on the embedded corpus
   into ``DIR/teacher`` (``--config.teacher_run``), and reused by later runs in ``DIR``.
2. Its validation bits per byte (bits per token with a subword tokenizer) and an MQAR probe: key
   and value tokens, ``--config.probe.gap`` filler tokens (more than the window), then the keys
   again; the probe scores the values predicted from the keys (argmax), so only a memory of what
   the window no longer holds can answer.
3. For each setting (one, or ``--config.study=ablations``: Liger-GLA, HGRN2, the layer-wise
   hybrid, the paper's ablations without sliding window, without LoRA and with a random gate
   projection, and the sliding window alone, what the recurrence adds):
   ``jaxrec.linearize.liger``, evaluation, LoRA on ``--config.lora.targets``
   fine-tuned with ``jaxrec.train.Trainer`` on ``--config.finetune_tokens`` tokens (the LoRA
   factors, and a random gate projection, are the only trainable parameters), evaluation, the
   probe, and the merged model exported to ``DIR/<setting>/export``: a Hugging Face directory
   for a Hugging Face teacher, a jaxrec run (``experiments.sample --workdir`` reads it) otherwise.
4. ``DIR/linearize.json`` and a table; with ``--config.study=ablations`` also the report:
   ``DIR/linearize[_TEACHER].{json,png}`` and ``DIR/RESULTS.md``, and with ``--publish=.`` the
   same files in ``results/`` and the section of the checkout's ``RESULTS.md``.
"""

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import _cached_run, _cli, _results
from experiments import set_based as mcq_lib
from experiments.configs import default as default_train_config
from experiments.configs import linearize as linearize_config
from jaxrec import data as data_lib
from jaxrec import generate, models, sharding, train
from jaxrec.inference import longctx
from jaxrec.linearize import apply_lora, liger, merge_lora
from jaxrec.train import checkpoint, config_checks, run_record

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "linearize.py")
SECTION = "Liger: linearizing a small Llama-style teacher"
# --config.study=ablations: each setting's changes to --config.liger / --config.lora.
STUDY = {
  "liger-gla": {},
  "liger-hgrn2": {"variant": "hgrn2"},
  "liger-gla-hybrid": {"hybrid_every": 4},
  "no-swa": {"window": 0},
  "swa-only": {"recurrence": False},
  "no-lora": {"rank": 0},
  "random-gate": {"gate_source": "projection"},
}

# --config.corpus: the text of fine-tuning and evaluation.
CORPORA = {
  "stdlib": lambda split: data_lib.stdlib_corpus(split=split),
  "python_reference": lambda split: data_lib.python_reference_corpus(split),
  "python_reference+stdlib": lambda split: [
    *data_lib.python_reference_corpus(split),
    *data_lib.stdlib_corpus(split=split),
  ],
}

_CONFIG = _cli.define_config_flag("Linearization configuration file.", CONFIG_FILE)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the teacher, runs and exports.")
flags.mark_flags_as_required(["workdir"])
_PUBLISH = _results.define_publish_flag()


def linearize(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment; returns ``{setting: measurements}`` with ``"teacher"`` first."""
  config = resolved(config)
  settings = _settings(config, workdir)
  for name in settings if config.export else ():
    if os.path.exists(os.path.join(workdir, name, "export")):
      raise train.ConfigError(
        f"--workdir: {workdir}/{name}/export exists from an earlier run; pick another --workdir "
        "(the teacher under DIR/teacher is reused) or set --config.export=False"
      )
  mesh = sharding.make_mesh(
    sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, jax.device_count())
  )
  teacher, tokenizer, source = _teacher(config, workdir)
  seq_len = config.seq_len or source.get("seq_len", 128)
  data = _Data(config, tokenizer, seq_len, mesh)
  probe = _probe_batch(config, tokenizer, data, seq_len)
  extras = _Extras(config, tokenizer, teacher.cfg.max_seq_len)
  start = time.perf_counter()
  results = {"teacher": data.measure(teacher, probe) | extras.measure(teacher)}
  results["teacher"]["seconds"] = time.perf_counter() - start
  logging.info("teacher: %s", results["teacher"])
  for name, options in settings.items():
    start = time.perf_counter()
    results[name] = _run_setting(
      name, options, config, teacher, data, probe, workdir, source, extras
    )
    results[name]["seconds"] = time.perf_counter() - start
    logging.info("%s: %s", name, {k: v for k, v in results[name].items() if k != "curve"})
  with open(os.path.join(workdir, "linearize.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(_table(results, data.unit))
  return results


# ----------------------------------------------------------------------------------------------
# Settings and the teacher.


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config``, with the accelerator version's fields (``FULL``) when ``config.full``."""
  if not config.full:
    return config
  config = config.copy_and_resolve_references()
  config.update(linearize_config.FULL)
  return config


def _settings(config, workdir: str) -> dict[str, dict]:
  """The settings to run, after checking what can be checked before any work."""
  lig, lora = config.liger, config.lora
  base = {
    "variant": lig.variant,
    "window": lig.window,
    "recurrence": lig.recurrence,
    "hybrid_every": lig.hybrid_every,
    "gate_source": lig.gate_source,
    "rank": lora.rank,
  }
  if config.corpus not in CORPORA:
    raise train.ConfigError(
      f"--config.corpus: expected one of {', '.join(CORPORA)}, got {config.corpus!r}"
    )
  checks = (
    ("liger.window", lig.window, 0),
    ("liger.hybrid_every", lig.hybrid_every, 0),
    ("lora.rank", lora.rank, 0),
    ("finetune_tokens", config.finetune_tokens, 1),
    ("batch_size", config.batch_size, 1),
    ("eval_batches", config.eval_batches, 1),
  )
  for flag, value, least in checks:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise train.ConfigError(f"--config.{flag}: expected an int >= {least}, got {value!r}")
  if not isinstance(lig.recurrence, bool) or (not lig.recurrence and not lig.window):
    raise train.ConfigError(
      f"--config.liger.recurrence: False needs a window (--config.liger.window > 0), got "
      f"recurrence={lig.recurrence!r} with window={lig.window!r}"
    )
  if config.study not in ("", "ablations"):
    raise train.ConfigError(f"--config.study: expected '' or 'ablations', got {config.study!r}")
  if config.study:
    names = (
      train.parse_list(config.settings, "--config.settings")
      if config.settings.strip()
      else list(STUDY)  # "": every setting
    )
    unknown = [n for n in names if n not in STUDY]
    if unknown:
      raise train.ConfigError(
        f"--config.settings: expected names of {', '.join(STUDY)}, got {', '.join(unknown)}"
      )
    return {name: base | STUDY[name] for name in STUDY if name in names}
  return {"liger": base}


def _teacher(config, workdir: str):
  """``(model, tokenizer, source)``; ``source`` says where the teacher came from."""
  path = config.teacher
  if path and (path in models.NAMED_MODELS or os.path.isfile(path)):
    try:
      model, tokenizer = models.load_model(path)
    except (ValueError, FileNotFoundError, ImportError) as e:
      raise train.ConfigError(f"--config.teacher: {e}") from e
    return model, tokenizer, {"kind": "gguf", "path": path, "tokenizer": tokenizer}
  if path and os.path.isfile(os.path.join(path, models.hf.CONFIG_FILE)):
    tokenizer = models.load_pretrained_tokenizer(path)
    return models.load_pretrained(path), tokenizer, {"kind": "hf", "path": path}
  if path:
    if not os.path.isfile(os.path.join(path, run_record.RECORD_FILE)):
      raise train.ConfigError(
        f"--config.teacher: expected a jaxrec run (with {run_record.RECORD_FILE}) or a Hugging "
        f"Face checkpoint (with {models.hf.CONFIG_FILE}), got {path!r}"
      )
    run_dir = path
  else:
    run_dir = os.path.join(workdir, "teacher")
    _cached_run.train_unless_finished(
      config.teacher_run, run_dir, name="teacher", progress=config.progress
    )
  model, tokenizer, run_config = train.restore_model(
    default_train_config.get_config(), run_dir, given=set()
  )
  source = {"kind": "jaxrec", "path": run_dir, "seq_len": run_config.data.seq_len}
  return model, tokenizer, source | {"run_config": run_config}


# ----------------------------------------------------------------------------------------------
# Data, evaluation, the probe.


class _Data:
  """The corpus as batches for fine-tuning and evaluation, and compiled evaluations per model
  structure (the converted model before and after fine-tuning share one)."""

  def __init__(self, config, tokenizer, seq_len: int, mesh):
    self.config, self.tokenizer, self.seq_len, self.mesh = config, tokenizer, seq_len, mesh
    self.byte_lengths = train.token_byte_lengths(tokenizer)
    self.unit = "bits_per_byte" if self.byte_lengths is not None else "bits_per_token"
    self._evals, self._forwards = {}, {}

  def batches(self, split: str):
    dataset = data_lib.make_lm_dataset(
      CORPORA[self.config.corpus](split),
      tokenizer=self.tokenizer,
      seq_len=self.seq_len,
      batch_size=self.config.batch_size,
      seed=self.config.seed,
      shuffle=split == "train",
    )
    return iter(dataset)

  def evaluate(self, model) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if graphdef not in self._evals:
      self._evals[graphdef] = train.make_eval_step(graphdef, self.byte_lengths)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=())
    batches = self.batches("validation")
    scores = train.evaluate(
      self._evals[graphdef], state, batches, self.config.eval_batches, self.mesh
    )
    return scores[self.unit]

  def recall(self, model, probe) -> float:
    """Share of the probe's query values predicted (argmax) from their keys."""
    graphdef, state = nnx.split(model)
    if graphdef not in self._forwards:
      self._forwards[graphdef] = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0].argmax(-1))
    tokens, positions, values = probe
    predicted = np.asarray(self._forwards[graphdef](state, tokens))
    return float(np.mean(np.take_along_axis(predicted, positions, axis=1) == values))

  def measure(self, model, probe) -> dict:
    return {self.unit: self.evaluate(model), "mqar": self.recall(model, probe)}


class _Extras:
  """What a real teacher's conversion is also measured by: the decoding state after
  ``state_context`` tokens (shapes only), the multiple-choice accuracy of the committed
  general-knowledge set (log-likelihood pick in the written order, as
  ``experiments/set_based.py`` scores it; the paper reports zero-shot multiple-choice accuracy),
  and a greedy answer to ``sample.prompt`` (chat template when the tokenizer has one)."""

  def __init__(self, config, tokenizer, context: int):
    self.config, self.tokenizer = config, tokenizer
    self.context = config.state_context or context
    self.chat = getattr(tokenizer, "chat_template", None) is not None
    self.ends = data_lib.end_of_turn_ids(tokenizer) if self.chat else []
    self.questions = None
    if config.mcq and self.chat and self.ends:
      questions = mcq_lib.load_questions(mcq_lib.QUESTIONS)
      self.questions = questions if config.mcq < 0 else questions[: config.mcq]

  def measure(self, model, *, sample: bool = False) -> dict:
    cache = jax.eval_shape(lambda: model.init_cache(1, self.context))
    out = {"state_bytes": longctx.cache_bytes(cache), "state_context": self.context}
    if self.questions:
      out["mcq"] = self._mcq(model)
      out["mcq_chance"] = 1 / len(self.questions[0]["options"])
      out["mcq_questions"] = len(self.questions)
    if (sample or self.config.sample.always) and self.config.sample.prompt:
      out["sample"] = self._sample(model)
    return out

  def _mcq(self, model) -> float:
    qs = self.questions
    order = tuple(range(len(qs[0]["options"])))
    width = mcq_lib.prompt_width(self.tokenizer, qs)
    batch = mcq_lib.build_batch(self.tokenizer, qs, [order] * len(qs), width, self.ends[0])
    _, scores = mcq_lib.ask(model, batch, set_based=False, steps=1, batch_size=16)
    return float(np.mean(scores.argmax(-1) == np.array([q["answer"] for q in qs])))

  def _sample(self, model) -> str:
    prompt = self.config.sample.prompt
    if self.chat:
      messages = [{"role": "user", "content": prompt}]
      prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = self.tokenizer.encode(prompt)
    stops = self.ends or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else None)
    gen = generate(model, [ids], self.config.sample.max_new_tokens, stop_tokens=stops)
    return self.tokenizer.decode(gen.rows()[0], skip_special_tokens=True)


def _probe_batch(config, tokenizer, data: _Data, seq_len: int):
  """MQAR: ``bos, k1 v1 .. kn vn, filler (gap tokens of validation text), kσ1 vσ1 ..`` with
  distinct letter keys and digit values (single tokens); returns ``(tokens, positions, values)``,
  the positions whose next token is a queried value."""
  p = config.probe
  letters = [i for c in "abcdefghijklmnopqrstuvwxyz" if len(i := tokenizer.encode(c)) == 1]
  digits = [i for c in "0123456789" if len(i := tokenizer.encode(c)) == 1]
  length = 1 + 4 * p.pairs + p.gap
  if not 1 <= p.pairs <= len(letters) or len(digits) < 2 or length > seq_len:
    raise train.ConfigError(
      f"--config.probe.pairs: expected 1..{len(letters)} pairs whose sequence "
      f"(1 + 4 pairs + gap = {length} tokens) fits in seq_len={seq_len}, got {p.pairs}"
    )
  rng = np.random.default_rng(config.seed)
  filler = np.concatenate([b["inputs"].ravel() for b in _take(data.batches("validation"), 4)])
  tokens, positions, values = [], [], []
  for _ in range(p.sequences):
    keys = np.array(letters)[rng.choice(len(letters), p.pairs, replace=False), 0]
    vals = np.array(digits)[rng.integers(len(digits), size=p.pairs), 0]
    order = rng.permutation(p.pairs)
    start = rng.integers(len(filler) - p.gap)
    context = np.stack([keys, vals], 1).ravel()
    queries = np.stack([keys[order], vals[order]], 1).ravel()
    tokens.append(
      np.concatenate([[tokenizer.bos_id], context, filler[start : start + p.gap], queries])
    )
    positions.append(length - 2 * p.pairs + 2 * np.arange(p.pairs))  # each query key
    values.append(vals[order])
  return np.array(tokens, np.int32), np.array(positions), np.array(values)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# One setting: convert, fine-tune, measure, export.


def _run_setting(name, options, config, teacher, data, probe, workdir, source, extras) -> dict:
  run_dir = os.path.join(workdir, name)
  os.makedirs(run_dir, exist_ok=True)
  student = liger(
    teacher,
    variant=options["variant"],
    window=options["window"] or None,
    recurrence=options.get("recurrence", True),
    hybrid_every=options["hybrid_every"] or None,
    gate_source=options["gate_source"],
    seed=config.seed,
  )
  out = {"options": options, "converted": data.measure(student, probe) | extras.measure(student)}
  steps = 0
  if options["rank"]:
    targets = train.parse_list(config.lora.targets, "--config.lora.targets")
    apply_lora(student, rank=options["rank"], alpha=config.lora.alpha, targets=targets)
    steps = math.ceil(config.finetune_tokens / (config.batch_size * data.seq_len))
    start = time.perf_counter()
    student, out["curve"] = _finetune(student, config, data, steps, run_dir)
    out["finetune_seconds"] = time.perf_counter() - start
  out |= {"steps": steps, "tokens": steps * config.batch_size * data.seq_len}
  out["finetuned"] = data.measure(student, probe) | extras.measure(student, sample=True)
  if config.export:
    export = os.path.join(run_dir, "export")
    if source["kind"] == "hf":
      models.save_pretrained(student, export, source=source["path"])
    elif source["kind"] == "gguf":
      models.save_pretrained(student, export, tokenizer=source["tokenizer"])
    else:
      _export_run(student, source["run_config"], export, max(steps, 1), data)
    out["export"] = export
  return out


def _finetune(student, config, data: _Data, steps: int, run_dir: str):
  """LoRA factors (and a random gate projection, which has no pretrained value) trained with a
  constant learning rate; returns the merged model and the training loss per step."""
  optim = train.OptimConfig(
    learning_rate=config.learning_rate,
    schedule="constant",
    weight_decay=0.0,
    b2=0.999,
    clip_norm=config.clip_norm,
  )
  trainer = train.Trainer(
    student,
    optim,
    steps=steps,
    mesh=data.mesh,
    trainable=nnx.Any(nnx.LoRAParam, nnx.PathContains("g_proj")),
    byte_lengths=data.byte_lengths,
  )
  curve = []
  with train.MetricsWriter(run_dir, steps, progress=config.progress) as writer:

    def log(step, state, metrics):
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      curve.append(metrics[data.unit])
      writer.write(step, "train", metrics)
      writer.advance()

    state, _ = trainer.fit(trainer.init(), data.batches("train"), steps, callback=log)
  return merge_lora(trainer.model(state)), curve


def _export_run(model, run_config, export: str, step: int, data: _Data) -> None:
  """The model as a jaxrec run: ``run.json`` with its config, and a checkpoint (fresh optimizer
  state) that ``experiments.sample`` and ``--config.init_from`` read."""
  run_config = copy.deepcopy(run_config)
  run_config.model.update(config_checks.model_section(model.cfg))
  num_params = models.param_count_of(model)
  run_record.write(export, run_config, model.cfg, num_params)
  optim = dataclasses.replace(
    train.OptimConfig(**run_config.optim), schedule="constant", warmup_steps=0
  )
  tx = optim.make_optimizer(optim.make_schedule(step))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del graphdef
  state = train.TrainState(
    step=jnp.asarray(step, jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
  )
  ckpt_dir = os.path.join(export, checkpoint.CHECKPOINT_DIR)
  with train.Checkpointer(ckpt_dir, resume=False) as ckpt:
    ckpt.save(step, state, data.batches("train"), force=True)


# ----------------------------------------------------------------------------------------------
# Tables, plot, RESULTS.md.


def _table(results: dict, unit: str) -> str:
  t = results["teacher"]
  teacher = t[unit]
  mcq = "mcq" in t
  lines = [
    f"| model | {unit.replace('_', ' ')}: converted → fine-tuned | gap to teacher closed | "
    "teacher ÷ fine-tuned | "
    + ("multiple-choice accuracy: converted → fine-tuned (÷ teacher) | " if mcq else "")
    + f"MQAR recall: converted → fine-tuned | decode state MB at {t['state_context']} tokens | "
    "fine-tune tokens |",
    "|---|---:|---:|---:|" + ("---:|" if mcq else "") + "---:|---:|---:|",
    f"| teacher | {teacher:.4f} | – | – | "
    + (f"{t['mcq']:.3f} | " if mcq else "")
    + f"{t['mqar']:.3f} | {t['state_bytes'] / 1e6:.1f} (KV cache) | – |",
  ]
  for name, r in results.items():
    if name == "teacher":
      continue
    c, f = r["converted"], r["finetuned"]
    before, after = c[unit], f[unit]
    closed = (before - after) / (before - teacher) if before > teacher else math.nan
    ratio = f"{f['mcq']:.3f} ({f['mcq'] / t['mcq']:.0%})" if mcq and t["mcq"] else ""
    lines.append(
      f"| {name} | {before:.4f} → {after:.4f} | {closed:.0%} | {teacher / after:.1%} | "
      + (f"{c['mcq']:.3f} → {ratio} | " if mcq else "")
      + f"{c['mqar']:.3f} → {f['mqar']:.3f} | {f['state_bytes'] / 1e6:.2f} | {r['tokens']:,} |"
    )
  return "\n".join(lines)


def _plot(results: dict, unit: str, path: str) -> None:
  fig = Figure(figsize=(6.5, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for name, r in results.items():
    if r.get("curve"):
      ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], label=name)
  ax.axhline(results["teacher"][unit], color="k", ls="--", label="teacher (validation)")
  ax.set_xlabel("LoRA fine-tuning step")
  ax.set_ylabel(f"train {unit.replace('_', ' ')}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


REAL_SECTION = "Liger on SmolLM2-135M-Instruct: linearizing a pretrained chat model"
CLAIM = (
  "**Claim** (Lan et al., 2025): an attention layer's own query and key projections make a "
  "gated recurrence (the key projection is the gate; Liger-GLA), mixed half and half with a "
  "64-token sliding window, and LoRA (rank 8 on q, k, v) recovers about 93% of the teacher's "
  "zero-shot multiple-choice accuracy with 0.02% of its pretraining tokens (Llama-3-8B: 20M "
  "tokens), at a decoding memory that does not grow with the context. Ablations: without the "
  "sliding window, or with a random gate projection, much less is recovered; HGRN2 is close to "
  "GLA; keeping some softmax layers (hybrid) recovers more."
)
PROTOCOL = (
  "**Protocol**: the conversion as the paper's (gate from the key projection, window 64, LoRA "
  "rank 8 on q/k/v, constant learning rate), fine-tuned on real English text (the Python "
  "language reference, `pydoc_data.topics`, and the embedded stdlib sources) for the CPU budget "
  "below; held-out bits per byte of the same text (validation split); the paper's metric as "
  "far as it goes here: multiple-choice accuracy (log-likelihood pick, the written order) on the "
  "committed general-knowledge set of `experiments/set_based.py`; the decoding state after the "
  "teacher's context, from the shapes; a greedy chat answer."
)


def _outputs(config) -> tuple[str, str]:
  """The RESULTS.md section and the file stem of ``config``'s teacher's results."""
  if not config.teacher:
    return SECTION, "linearize"
  name = os.path.basename(os.path.normpath(config.teacher))
  title = REAL_SECTION if config.teacher == "smollm2-135m" else f"Liger on {name}"
  return title, "linearize_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


# The paper's ablations, each against Liger-GLA after fine-tuning: the direction its Table 3 / 5
# reports ("worse": higher bits per token; "close": within 10%; "better": not worse).
ABLATION_EXPECTED = {
  "no-swa": ("without the sliding window", "worse"),
  "random-gate": ("with a random gate projection", "worse"),
  "no-lora": ("without LoRA", "worse"),
  "swa-only": ("the sliding window alone (what the recurrence adds)", "worse"),
  "liger-hgrn2": ("HGRN2", "close"),
  "liger-gla-hybrid": ("the layer-wise hybrid", "better"),
}


def verdict(results: dict, unit: str, questions: int, seq_len: int) -> str:
  """The verdict on CLAIM that follows from ``results`` (a real teacher's ablation study):
  recovery (at least half the gap closed), the multiple-choice accuracy only where the teacher is
  more than two standard errors above chance over ``questions`` questions (else the set cannot
  tell the models apart), and each ablation's direction (``ABLATION_EXPECTED``). Reproduced when
  all hold, partly when the recovery does, not reproduced otherwise."""
  t = results["teacher"]
  main = results.get("liger-gla")
  if main is None or "mcq" not in t:
    return ""
  f = main["finetuned"]
  before = main["converted"][unit]
  closed = (before - f[unit]) / (before - t[unit]) if before > t[unit] else math.nan
  lines = [
    f"Liger-GLA after {main['tokens']:,} fine-tuning tokens closes {closed:.0%} of the "
    f"{unit.replace('_', ' ')} gap the conversion opened ({before:.3f} → {f[unit]:.3f}, teacher "
    f"{t[unit]:.3f}); its decoding state is {f['state_bytes'] / 1e6:.2f} MB against the "
    f"teacher's {t['state_bytes'] / 1e6:.0f} MB KV cache at {t['state_context']} tokens."
  ]
  chance, p = t["mcq_chance"], t["mcq"]
  se = math.sqrt(p * (1 - p) / questions)
  informative = p - chance > 2 * se
  accuracy_holds = True
  if informative:
    accuracy_holds = f["mcq"] >= 0.9 * p
    lines.append(
      f"It keeps {f['mcq'] / p:.0%} of the teacher's multiple-choice accuracy ({f['mcq']:.3f} "
      f"against {p:.3f}; chance {chance:.3f}; the claim: about 93%)."
    )
  else:
    best = max(
      (n for n in results if "finetuned" in results[n]),
      key=lambda n: results[n]["finetuned"]["mcq"],
    )
    # A teacher right on no question has no spread to measure its distance from chance by.
    above = (
      f"{(p - chance) / se:.1f} standard errors ({se:.3f} over {questions} questions) above"
      if se > 0
      else "below"
    )
    lines.append(
      f"The multiple-choice set cannot test the accuracy claim here: the teacher's {p:.3f} is "
      f"{above} chance {chance:.3f}, and the models' scores move by as much whatever their "
      f"quality ({best}: {results[best]['finetuned']['mcq']:.3f})."
    )
  failed = []
  for name, (label, expected) in ABLATION_EXPECTED.items():
    if name not in results:
      continue
    r = results[name]["finetuned"][unit]
    ratio = r / f[unit]
    holds = {"worse": ratio > 1, "close": abs(ratio - 1) <= 0.1, "better": ratio <= 1}[expected]
    if not holds:
      failed.append(label)
    lines.append(
      f"{label[0].upper()}{label[1:]}: {r:.3f} {unit.replace('_', ' ')} ({ratio:.2f}× "
      f"Liger-GLA's; the paper: {expected}{'' if holds else ', not so here'})."
    )
  recovered = closed >= 0.5
  word = (
    "reproduced"
    if recovered and accuracy_holds and not failed
    else "partly reproduced"
    if recovered
    else "not reproduced at this budget"
  )
  tail = f" Not as the paper: {'; '.join(failed)}." if failed else ""
  window = main["options"]["window"]
  return (
    f"**Verdict: {word}** (with {main['tokens']:,} fine-tuning tokens, a tiny fraction of the "
    f"paper's 20M, scored on {seq_len}-token sequences, where a {window}-token window sees much "
    "of what predicts the next token). " + " ".join(lines) + tail
  )


def _samples(results: dict) -> str:
  rows = []
  for name, r in results.items():
    for stage in ("converted", "finetuned") if name != "teacher" else (None,):
      text = (r if stage is None else r[stage]).get("sample")
      if text is not None:
        label = name if stage is None else f"{name}, {stage}"
        rows.append(f"- **{label}**: {json.dumps(text, ensure_ascii=False)}")
  return "\n".join(rows)


def _verdict_of(results: dict, unit: str, config) -> str:
  """``verdict`` with the number of questions (recorded by newer runs, else from the config) and
  the sequence length of the scoring."""
  questions = results["teacher"].get("mcq_questions")
  if not questions:
    committed = len(mcq_lib.load_questions(mcq_lib.QUESTIONS))
    questions = committed if config.mcq < 0 else min(config.mcq, committed)
  return verdict(results, unit, questions, config.seq_len or 128)


def _write_results(
  results: dict, unit: str, config, out_dir: str, publish: str | None = None
) -> list[str]:
  """The JSON, the plot and the report under ``out_dir`` (and ``publish``)."""
  os.makedirs(out_dir, exist_ok=True)
  title, stem = _outputs(config)
  json_path = os.path.join(out_dir, f"{stem}.json")
  png = os.path.join(out_dir, f"{stem}.png")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  _plot(results, unit, png)
  command = " ".join(["python -m experiments.linearize", *sys.argv[1:]])
  run = config.teacher_run
  teacher = config.teacher or (
    f"a Llama-style {run.model.num_layers}-layer transformer trained by jaxrec for {run.steps} "
    f"steps of {run.batch_size} x {run.data.seq_len} tokens"
  )
  setup = (
    f"Teacher: {teacher}. Liger window {config.liger.window}, LoRA rank {config.lora.rank} on "
    f"{config.lora.targets}, {config.finetune_tokens:,} fine-tuning tokens at a constant "
    f"{config.learning_rate:g}; validation on {config.eval_batches} batches. MQAR probe: "
    f"{config.probe.pairs} key-value pairs, {config.probe.gap} filler tokens (more than the "
    f"window), {config.probe.sequences} sequences; recall is the share of values predicted."
  )
  real = "mcq" in results["teacher"]
  seconds = sum(r.get("seconds", 0.0) for r in results.values())
  section = lambda link: (
    f"## {title}\n\n"
    + (f"{CLAIM}\n\n{PROTOCOL}\n\n" if real else "")
    + f"{setup}\n\n{_table(results, unit)}\n\n"
    + (f"Greedy answers to {config.sample.prompt!r}:\n\n{_samples(results)}\n\n" if real else "")
    + f"![LoRA fine-tuning curves]({link(png)})\n\n"
    + (f"{_verdict_of(results, unit, config)}\n\n" if real else "")
    + f"Data: `{link(json_path)}`. "
    + (f"The run took {seconds:.0f} s. " if seconds else "")
    + f"Command (backend {jax.default_backend()}, {os.cpu_count()} cores, shared with other "
    f"jobs):\n\n```\n{command}\n```\n\n"
  )
  return _results.write_report(out_dir, [json_path, png], section, publish=publish)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = resolved(_CONFIG.value)
  with _cli.short_errors():
    results = linearize(config, _WORKDIR.value)
  if config.study == "ablations":
    unit = next(k for k in results["teacher"] if k != "mqar")
    for path in _write_results(results, unit, config, _WORKDIR.value, _PUBLISH.value):
      print(f"wrote the section {_outputs(config)[0]!r} of {path}")


if __name__ == "__main__":
  _cli.run(main)
