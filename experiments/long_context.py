r"""Long-context inference without retraining: ``jaxrec.inference.longctx`` policies against vanilla
attention on a RoPE transformer trained by jaxrec at a short context.

``python -m experiments.long_context --workdir DIR [--config.FIELD=VALUE ...]``; the config is
``experiments/configs/long_context.py``. In order:

1. The model: ``--config.model_run`` (an attention-only byte-level LM, 128 bytes per row) trained
   on the embedded corpus into ``DIR/model``, reused by later runs in ``DIR``.
2. Perplexity beyond the training length: bits per byte of validation windows of each of
   ``--config.lengths``. Vanilla, LM-Infinite and LongHeads score in one parallel pass (their
   decoding equals it); Recycled Attention and ThinK, which only change decoding, score by
   teacher-forced decoding after a prefill of the training length.
3. Passkey retrieval (LM-Infinite's generator): the "important info" preamble, "The grass is
   green..." filler, the needle "The pass key is KEY. Remember it. KEY is the pass key." at a
   random depth, then "What is the pass key? The pass key is", at each of
   ``--config.passkey.lengths``; greedy decoding under each policy, exact-match and per-digit
   accuracy.
4. Order sensitivity of multiple choice: a validation snippet, three candidate continuations of
   unequal lengths (the true one and two from elsewhere) as options, the model's pick (highest
   per-byte log-likelihood of an option repeated after the prompt) in all 3! orders; vanilla
   against Set-Based Prompting.
5. ``DIR/long_context.json``, ``results/long_context.{json,png}`` and the section of
   ``RESULTS.md``.
"""

import itertools
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import _cached_run, _cli, _results
from experiments.configs import default as default_train_config
from jaxrec import data as data_lib
from jaxrec import generate, train
from jaxrec.inference import loglikelihood, longctx

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "long_context.py")
SECTION = "Long-context inference: LM-Infinite, Recycled, LongHeads, ThinK, Set-Based"
_CONFIG = _cli.define_config_flag("Long-context evaluation configuration file.", CONFIG_FILE)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the model and the results.")

PREAMBLE = (
  "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
  "them. I will quiz you about the important information there.\n"
)
FILLER = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is "
DECODE_ONLY = ("recycled", "think")  # scored by teacher-forced decoding


def long_context(config, workdir: str) -> dict:
  """Trains (or reuses) the model and runs the three evaluations; returns their results."""
  if not workdir:
    raise train.ConfigError("--workdir: expected a directory, got none")
  run_dir = os.path.join(workdir, "model")
  _cached_run.train_unless_finished(
    config.model_run, run_dir, name="model", progress=config.progress
  )
  model, tokenizer, run_config = train.restore_model(
    default_train_config.get_config(), run_dir, given=set()
  )
  policies = _policies(config)
  models = {name: _under(model, policy) for name, policy in policies.items()}
  train_len = run_config.data.seq_len
  start = time.perf_counter()
  results = {
    "train_length": train_len,
    "policies": {k: repr(v) for k, v in policies.items()},
    "perplexity": _perplexity(models, tokenizer, config, train_len),
  }
  results["passkey"] = _passkey(models, tokenizer, config)
  results["choice"] = _choice(model, tokenizer, config)
  results["eval_seconds"] = time.perf_counter() - start
  with open(os.path.join(workdir, "long_context.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


def _policies(config) -> dict:
  try:
    return {
      "vanilla": None,
      "lm_infinite": longctx.lm_infinite(**config.lm_infinite),
      "recycled": longctx.recycled(**config.recycled),
      "longheads": longctx.longheads(**config.longheads),
      "think": longctx.think(**config.think),
    }
  except (TypeError, ValueError) as e:
    raise train.ConfigError(f"--config.<policy>: {e}") from e


def _under(model, policy):
  """``model`` with ``policy`` applied to its attention layers (``None``: the model itself)."""
  return model if policy is None else longctx.apply(model, policy)


def _score(model, tokens, name, prefill):
  """Per-token log-likelihoods of ``model`` (under the policy ``name``; decode-only policies
  after ``prefill``)."""
  if name in DECODE_ONLY:
    return loglikelihood(model, tokens, prefill=min(prefill, tokens.shape[1] - 2))
  return loglikelihood(model, tokens)


def _validation_bytes(tokenizer) -> np.ndarray:
  text = "\n".join(data_lib.stdlib_corpus(split="validation"))
  return np.asarray(tokenizer.encode(text), np.int32)


def _perplexity(models, tokenizer, config, train_len) -> dict:
  ids = _validation_bytes(tokenizer)
  rng = np.random.default_rng(config.seed)
  out = {}
  for length in train.parse_list(config.lengths, "--config.lengths", int):
    starts = rng.integers(0, len(ids) - length - 1, config.ppl_sequences)
    windows = np.stack([ids[s : s + length + 1] for s in starts])
    for name, model in models.items():
      logp = np.asarray(_score(model, windows, name, train_len))
      out.setdefault(name, {})[str(length)] = float(-logp.mean() / np.log(2))
      logging.info("perplexity %s @%d: %.3f bits/byte", name, length, out[name][str(length)])
  return out


def passkey_prompt(length: int, key: str, depth: float) -> tuple[str, str]:
  """A ``length``-byte passkey prompt (preamble, filler with the needle at ``depth``, question)
  and its answer ``key``."""
  needle = NEEDLE.format(key=key)
  room = length - len(PREAMBLE) - len(needle) - len(QUESTION)
  if room < 0:
    raise train.ConfigError(f"--config.passkey.lengths: {length} is too short for a passkey prompt")
  filler = (FILLER * (room // len(FILLER) + 1))[:room]
  cut = filler.rfind("\n", 0, int(depth * room)) + 1
  return PREAMBLE + filler[:cut] + needle + filler[cut:] + QUESTION, key


def _passkey(models, tokenizer, config) -> dict:
  rng = np.random.default_rng(config.seed + 1)
  digits = config.passkey.digits
  out = {}
  for length in train.parse_list(config.passkey.lengths, "--config.passkey.lengths", int):
    keys = [str(k) for k in rng.integers(10 ** (digits - 1), 10**digits, config.passkey.samples)]
    prompts = [passkey_prompt(length, k, d)[0] for k, d in zip(keys, rng.random(len(keys)))]
    tokens = np.asarray([tokenizer.encode(p) for p in prompts], np.int32)
    for name, model in models.items():
      new = generate(model, tokens, digits).tokens
      answers = [tokenizer.decode(row.tolist()) for row in new]
      exact = np.mean([a == k for a, k in zip(answers, keys, strict=True)])
      per_digit = np.mean(
        [a[i : i + 1] == k[i] for a, k in zip(answers, keys) for i in range(digits)]
      )
      out.setdefault(name, {})[str(length)] = {"exact": float(exact), "digits": float(per_digit)}
      logging.info("passkey %s @%d: exact %.2f, digits %.2f", name, length, exact, per_digit)
  return out


def _choice(model, tokenizer, config) -> dict:
  """Picks and accuracy of vanilla and Set-Based Prompting over all orders of the options."""
  ids = _validation_bytes(tokenizer)
  rng = np.random.default_rng(config.seed + 2)
  lengths, prefix, n_q = (
    train.parse_list(config.choice.option_lengths, "--config.choice.option_lengths", int),
    config.choice.prefix,
    config.choice.questions,
  )
  questions, truth = [], []
  for _ in range(n_q):
    s = int(rng.integers(0, len(ids) - prefix - max(lengths)))
    true_slot = int(rng.integers(0, len(lengths)))
    options = []
    for slot, n in enumerate(lengths):
      o = s + prefix if slot == true_slot else int(rng.integers(0, len(ids) - n))
      options.append(ids[o : o + n])
    questions.append((ids[s : s + prefix], options))
    truth.append(true_slot)
  sep = np.asarray(tokenizer.encode("\n"), np.int32)
  picks = {"vanilla": [], "set_based": []}
  for order in itertools.permutations(range(len(lengths))):
    policy = longctx.set_based(prefix, tuple(lengths[a] for a in order), len(sep))
    scores = {name: np.zeros((n_q, len(lengths))) for name in picks}
    for answer in range(len(lengths)):
      tokens = np.stack(
        [np.concatenate([a, *(opts[i] for i in order), sep, opts[answer]]) for a, opts in questions]
      )
      for name, p in (("vanilla", None), ("set_based", policy)):
        logp = np.asarray(loglikelihood(_under(model, p), tokens, prefill=policy.length))
        scores[name][:, answer] = logp[:, -lengths[answer] :].mean(-1)
    for name in picks:
      picks[name].append(scores[name].argmax(-1))
  out = {}
  for name, p in picks.items():
    p = np.stack(p)  # [orders, questions]
    out[name] = {
      "order_sensitive": float(np.mean((p != p[0]).any(axis=0))),
      "accuracy": float(np.mean(p == np.asarray(truth))),
    }
    logging.info("choice %s: %s", name, out[name])
  return out


def _tables(results: dict) -> str:
  def table(section, cell):
    lengths = list(next(iter(results[section].values())))
    head = ["| method | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
    return head + [
      f"| {m} | " + " | ".join(cell(r[n]) for n in lengths) + " |"
      for m, r in results[section].items()
    ]

  ppl = table("perplexity", lambda v: f"{v:.3f}")
  key = table("passkey", lambda v: f"{v['exact']:.2f} ({v['digits']:.2f})")
  choice = ["| method | order-sensitive questions | accuracy (all orders) |", "|---|---:|---:|"] + [
    f"| {m} | {r['order_sensitive']:.2f} | {r['accuracy']:.2f} |"
    for m, r in results["choice"].items()
  ]
  return (
    f"Bits per byte by context length (bytes; trained at {results['train_length']}):\n\n"
    + "\n".join(ppl)
    + "\n\nPasskey retrieval, exact match (per-digit accuracy) by prompt length:\n\n"
    + "\n".join(key)
    + "\n\nMultiple choice over all 3! orders of 3 options of unequal lengths:\n\n"
    + "\n".join(choice)
  )


def _plot(results: dict, path: str) -> None:
  fig = Figure(figsize=(10, 3.6))
  FigureCanvasAgg(fig)
  ax_ppl, ax_key = fig.subplots(1, 2)
  for m, r in results["perplexity"].items():
    ax_ppl.plot([int(n) for n in r], list(r.values()), marker="o", label=m)
  for m, r in results["passkey"].items():
    ax_key.plot([int(n) for n in r], [v["digits"] for v in r.values()], marker="o", label=m)
  for ax, label in ((ax_ppl, "bits per byte"), (ax_key, "passkey per-digit accuracy")):
    ax.axvline(results["train_length"], color="k", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (bytes)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  ax_ppl.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _write_results(results: dict, out_dir: str, results_md: str, command: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "long_context.json")
  png = os.path.join(out_dir, "long_context.png")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  _plot(results, png)
  section = (
    f"## {SECTION}\n\n{_tables(results)}\n\n![perplexity and passkey by length]({png})\n\n"
    f"Data: `{json_path}`. Evaluations took {results['eval_seconds']:.0f} s (backend "
    f"{jax.default_backend()}, {os.cpu_count()} cores, shared with other jobs). Command:\n\n"
    f"```\n{command}\n```\n\n"
  )
  _results.write_section(results_md, SECTION, section)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    results = long_context(_CONFIG.value, _WORKDIR.value)
  print(_tables(results))
  command = " ".join(["python -m experiments.long_context", *sys.argv[1:]])
  _write_results(results, "results", "RESULTS.md", command)


if __name__ == "__main__":
  _cli.run(main)
