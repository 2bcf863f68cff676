r"""ParaGRU and ParaLSTM language models beside GLA and attention of (about) equal size.

Each mixer is trained by ``jaxrec.train.train_and_evaluate`` on the default corpus with the same
data, steps, seed and schedule (``experiments/configs/default.py`` with the overrides below), one
after another. Then, from the final checkpoint, it measures the Newton iterations of the ParaRNN
layers on a validation batch (mean of ``NewtonInfo.iterations`` over layers and rows, at
initialization and trained) and the training throughput (timed train steps after a warm-up).
It writes ``DIR/pararnn_lm.{json,png}`` and ``DIR/RESULTS.md`` (the report; with ``--publish=.``
also ``results/pararnn_lm.{json,png}`` and the section "ParaRNN LMs vs GLA and attention" of the
checkout's ``RESULTS.md``, replaced on rerun).

  python -m experiments.pararnn_lm --workdir=DIR       # tiny: about 15 minutes on 2 CPU cores
  python -m experiments.pararnn_lm --workdir=DIR --steps=2000 --d_model=256 --num_layers=6 \
    --seq_len=512
  python -m experiments.pararnn_lm --workdir=DIR --size_overrides=paragru.mlp_hidden=448

The default sizes already give parameter counts within 2% of each other (the ParaRNN block's
dense in/gate/out projections match attention's four ``D×D`` maps); ``--size_overrides`` sets any
``LMConfig`` field, or an option of the mixer's own (``paragru.heads=8``), for one mixer when
another size needs rebalancing, and the run stops if the counts differ by more than
``--max_param_gap``.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import _cli, _results
from experiments.configs import default as default_config
from jaxrec import data as data_lib
from jaxrec import layers, sharding
from jaxrec import train as train_lib
from jaxrec.layers import observe
from jaxrec.models import LM, MIXERS, LMConfig, get_mixer, mixer_names, param_count

SECTION = "ParaRNN LMs vs GLA and attention"
_PARARNN = (layers.ParaGRU, layers.ParaLSTM)

_MIXERS = flags.DEFINE_list("mixers", ["attention", "gla", "paragru", "paralstm"], "Mixers to run.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Residual width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 3, "Blocks per model.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Heads (attention, GLA, ParaRNN input blocks).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (cosine schedule).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 30, "Linear warmup steps.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "Steps between validation evaluations.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 40, "Validation batches per evaluation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and data order (the same for all).")
_SIZE_OVERRIDES = flags.DEFINE_list(
  "size_overrides",
  [],
  "Per-mixer LMConfig fields or the mixer's options, as mixer.field=int (gla.mlp_hidden=448).",
)
_MAX_PARAM_GAP = flags.DEFINE_float(
  "max_param_gap", 0.10, "Largest allowed (max - min) / min of the parameter counts."
)
_THROUGHPUT_STEPS = flags.DEFINE_integer(
  "throughput_steps", 10, "Train steps timed for tokens/s, after one warm-up step."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory of the runs (one folder per mixer) and of the report."
)
flags.mark_flag_as_required("workdir")
_PUBLISH = _results.define_publish_flag()


def _config(mixer: str, overrides: dict[str, int]):
  config = default_config.get_config()
  config.seed = _SEED.value
  config.steps = _STEPS.value
  config.batch_size = _BATCH_SIZE.value
  config.data.seq_len = _SEQ_LEN.value
  config.model.mixer_pattern = mixer
  config.model.num_layers = _NUM_LAYERS.value
  config.model.d_model = _D_MODEL.value
  config.model.num_heads = _NUM_HEADS.value
  for field, value in overrides.items():
    # An LMConfig field, or an option of the mixer's own (its group); model_config() reads it.
    (config.model[mixer] if field in _options(mixer) else config.model)[field] = value
  config.optim.learning_rate = _LEARNING_RATE.value
  config.optim.warmup_steps = _WARMUP.value
  config.eval_every = _EVAL_EVERY.value
  config.eval_batches = _EVAL_BATCHES.value
  config.checkpoint_every = 0  # only the final checkpoint, which the measurements read
  config.progress = False
  config.sample.max_new_tokens = 100
  return config


def _parse_overrides(mixers: list[str]) -> dict[str, dict[str, int]]:
  out: dict[str, dict[str, int]] = {m: {} for m in mixers}
  fields = {f.name for f in dataclasses.fields(LMConfig)} - {"moe", "mixer_options"}
  for item in _SIZE_OVERRIDES.value:
    match = re.fullmatch(r"(\w+)\.(\w+)=(\d+)", item)
    mixer, field = match.groups()[:2] if match else (None, None)
    if mixer not in out or field not in fields | _options(mixer):
      raise app.UsageError(
        f"--size_overrides: expected mixer.field=int with a mixer of --mixers {mixers} and an "
        f"LMConfig field or one of the mixer's options, got {item!r}"
      )
    out[mixer][field] = int(match.group(3))
  return out


def _options(mixer: str) -> set[str]:
  """The names of ``mixer``'s own options (``paragru``: ``heads``, ``max_iters``)."""
  return {f.name for f in dataclasses.fields(get_mixer(mixer).options)}


# ----------------------------------------------------------------------------------------------
# Measurements on the final checkpoint.


@nnx.jit
def _newton_diagnostics(model: LM, inputs, segment_ids) -> nnx.State:
  """What the layers of ``model`` sow on one forward pass."""
  forward = nnx.capture(lambda m: m(inputs, segment_ids=segment_ids), nnx.Intermediate)
  return forward(model)[1]


# The metrics every ParaRNN layer sows for its solve, and their names here.
_NEWTON_METRICS = {"newton/iterations": "newton_iterations", "newton/fallback": "fallback_fraction"}


def _newton_stats(model: LM, inputs, segment_ids) -> dict[str, float]:
  """Mean Newton iterations and fallback fraction over the ParaRNN layers of ``model``, from the
  ``newton/*`` metrics each layer sows (stacked over the groups with ``scan_layers``)."""
  sown = jax.device_get(_newton_diagnostics(model, inputs, segment_ids))
  values = {name: [] for name in _NEWTON_METRICS.values()}
  for path, variable in nnx.to_flat_state(sown):
    if path[-1] == observe.METRICS:
      for metrics in variable.get_value():
        for key in _NEWTON_METRICS.keys() & metrics.keys():
          values[_NEWTON_METRICS[key]].extend(np.ravel(metrics[key]))
  layers_run = sum(issubclass(get_mixer(m).module, _PARARNN) for m in model.cfg.layer_mixers)
  if len(values["newton_iterations"]) != layers_run:
    raise ValueError(
      f"model: expected Newton diagnostics from its {layers_run} ParaRNN layers, got "
      f"{len(values['newton_iterations'])}"
    )
  return {name: float(np.mean(v)) for name, v in values.items()}


def _measure(config, run_dir: str) -> dict:
  """Newton iterations (at init and trained) and train tokens/s from the run's checkpoint."""
  mesh = sharding.make_mesh(sharding.mesh_shape(dict(config.mesh), jax.device_count()))
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  model_cfg = train_lib.model_config(config, tokenizer.vocab_size)
  trainer = train_lib.Trainer(
    model_cfg,
    train_lib.OptimConfig(**config.optim),
    steps=config.steps,
    mesh=mesh,
    seed=config.seed,
    byte_lengths=train_lib.token_byte_lengths(tokenizer),
  )
  state = train_lib.restore_params(os.path.join(run_dir, "checkpoints"), trainer.abstract)
  rows = dict(tokenizer=tokenizer, seq_len=config.data.seq_len, seed=config.seed)
  val = next(
    iter(
      data_lib.make_lm_dataset(
        data_lib.stdlib_corpus(split="validation"),
        batch_size=config.batch_size,
        shuffle=False,
        **rows,
      )
    )
  )
  out = {}
  if any(issubclass(get_mixer(m).module, _PARARNN) for m in model_cfg.mixer_pattern):
    models = {"init": LM(model_cfg, rngs=nnx.Rngs(config.seed)), "trained": trainer.model(state)}
    for name, model in models.items():
      with jax.set_mesh(mesh):
        stats = _newton_stats(model, val["inputs"], val["segment_ids"])
      out |= {f"{key}_{name}": value for key, value in stats.items()}
  if _THROUGHPUT_STEPS.value:
    it = iter(
      data_lib.make_lm_dataset(
        data_lib.stdlib_corpus(split="train"), batch_size=config.batch_size, **rows
      )
    )
    # Placed on the mesh beforehand, so that only the steps are timed.
    batches = [train_lib.global_batch(next(it), mesh) for _ in range(_THROUGHPUT_STEPS.value + 1)]
    state, metrics = trainer.fit(state, batches[:1], 1)  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = trainer.fit(state, batches[1:], _THROUGHPUT_STEPS.value)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    tokens = _THROUGHPUT_STEPS.value * config.batch_size * config.data.seq_len
    out["train_tokens_per_s"] = tokens / seconds
  return out


# ----------------------------------------------------------------------------------------------
# Outputs: JSON, plot, RESULTS.md section.


def _curves(run_dir: str) -> dict:
  records = train_lib.read_metrics(run_dir)
  return {
    split: {
      "steps": sorted(records.get(split, {})),
      "bits_per_byte": [records[split][s]["bits_per_byte"] for s in sorted(records.get(split, {}))],
    }
    for split in ("train", "validation")
  }


def _plot(results: dict, path: str) -> None:
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, (mixer, r) in enumerate(results.items()):
    color = f"C{i}"
    train, val = r["curves"]["train"], r["curves"]["validation"]
    ax.plot(train["steps"], train["bits_per_byte"], "-", color=color, alpha=0.5, lw=1)
    ax.plot(
      val["steps"], val["bits_per_byte"], "o-", color=color, label=f"{mixer} ({r['params']:,})"
    )
  ax.set_xlabel("step")
  ax.set_ylabel("bits per byte (thin: train, dots: validation)")
  ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend(title="mixer (parameters)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _fmt(value, spec: str) -> str:
  return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else spec % value


def _table(results: dict) -> str:
  lines = [
    "| mixer | parameters | val bits/byte | train loss (nats) | train tokens/s | "
    "Newton iters init → trained | fallback rows |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for mixer, r in results.items():
    its = "–"
    if "newton_iterations_trained" in r:
      its = f"{r['newton_iterations_init']:.2f} → {r['newton_iterations_trained']:.2f}"
    fallback = _fmt(r.get("fallback_fraction_trained"), "%.2f")
    lines.append(
      f"| {mixer} | {r['params']:,} | {r['val_bits_per_byte']:.4f} | {r['train_loss']:.4f} | "
      f"{_fmt(r.get('train_tokens_per_s'), '%.0f')} | {its} | {fallback} |"
    )
  return "\n".join(lines)


def _section(results: dict, command: str, png: str, json_path: str, settings: str) -> str:
  return f"""## {SECTION}

{settings}

{_table(results)}

![validation and training bits per byte]({png})

Data: `{json_path}` (curves and every number above). Command:

```
{command}
```

"Newton iters" is the mean of `NewtonInfo.iterations` over the ParaRNN layers and the rows of
the first validation batch (tolerance 1e-6·max(1, max|h|), at most the `max_iters` option);
"fallback rows" the fraction of rows that needed the sequential scan after the trained model's
solve. Tokens/s are timed train steps of the trained model on this machine (compiled, after a
warm-up step), not wall time of the whole run; on a CPU shared with other processes they are
noisy.

For context only — the settings differ (SlimPajama, 2048-token context, Chinchilla token budgets,
H100s; here a byte-level model of under a million parameters, a few hundred steps on a CPU): the
ParaRNN paper (arXiv 2510.21450, Tables 3–5) reports perplexities at 400M parameters of 17.00
(Transformer), 18.56 (ParaGRU), 18.40 (ParaLSTM), 16.49 (Mamba2), and at 7B of 9.55, 9.19, 9.16
and 8.62.
"""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mixers = list(_MIXERS.value)
  unknown = [m for m in mixers if m not in MIXERS]
  if unknown:
    raise app.UsageError(f"--mixers: unknown {unknown}; registered: {mixer_names()}")
  overrides = _parse_overrides(mixers)
  configs = {m: _config(m, overrides[m]) for m in mixers}
  vocab = data_lib.load_tokenizer(configs[mixers[0]].data.tokenizer).vocab_size
  counts = {m: param_count(train_lib.model_config(c, vocab)) for m, c in configs.items()}
  for m, n in counts.items():
    print(f"{m:>10}: {n:,} parameters")
  gap = (max(counts.values()) - min(counts.values())) / min(counts.values())
  if gap > _MAX_PARAM_GAP.value:
    raise app.UsageError(
      f"--size_overrides: parameter counts differ by {gap:.1%} > --max_param_gap="
      f"{_MAX_PARAM_GAP.value:.0%}: {counts}"
    )

  workdir = _WORKDIR.value
  results = {}
  for mixer, config in configs.items():
    run_dir = os.path.join(workdir, mixer)
    logging.info("training %s in %s", mixer, run_dir)
    start = time.perf_counter()
    final = train_lib.train_and_evaluate(config, run_dir)
    wall = time.perf_counter() - start
    results[mixer] = {
      "params": counts[mixer],
      "val_bits_per_byte": final["bits_per_byte"],
      "val_loss": final["loss"],
      "train_loss": final["train_loss"],
      "run_seconds": wall,
      **_measure(config, run_dir),
      "sample": final["sample"],
      "curves": _curves(run_dir),
    }
    r = results[mixer]
    print(
      f"{mixer}: val {r['val_bits_per_byte']:.4f} bits/byte, train loss {r['train_loss']:.4f}, "
      f"{r.get('train_tokens_per_s', math.nan):.0f} tokens/s, run {wall:.0f} s"
    )

  json_path = os.path.join(workdir, "pararnn_lm.json")
  png_path = os.path.join(workdir, "pararnn_lm.png")
  settings = (
    f"Byte-level LMs on the embedded stdlib corpus: {_NUM_LAYERS.value} layers, d_model "
    f"{_D_MODEL.value}, {_NUM_HEADS.value} heads, {_STEPS.value} steps of {_BATCH_SIZE.value}×"
    f"{_SEQ_LEN.value} tokens, cosine schedule (peak {_LEARNING_RATE.value:g}, warmup "
    f"{_WARMUP.value}), seed {_SEED.value}; the same data order for every mixer. Validation: "
    f"{_EVAL_BATCHES.value} batches. Backend: {jax.devices()[0].platform}, "
    f"{os.cpu_count()} cores."
  )
  command = " ".join(["python -m experiments.pararnn_lm", *sys.argv[1:]])
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"command": command, "settings": settings, "results": results}, f, indent=1)
  _plot(results, png_path)
  section = lambda link: _section(results, command, link(png_path), link(json_path), settings)
  written = _results.write_report(workdir, [json_path, png_path], section, publish=_PUBLISH.value)
  print(_table(results))
  print(f"wrote {json_path}, {png_path} and the section {SECTION!r} of {', '.join(written)}")


if __name__ == "__main__":
  _cli.run(main)
