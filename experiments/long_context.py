r"""Long-context inference on a real model: ``jaxrec.inference.longctx`` policies on SmolLM2-135M
(trained context 8192), as small versions of their papers' protocols.

``python -m experiments.long_context --workdir DIR --config.part=beyond|within
[--config.FIELD=VALUE ...]``; the config is ``experiments/configs/long_context.py``.

``part=beyond`` (LM-Infinite, LongHeads): prompts past the trained context.

* Passkey retrieval (LM-Infinite's generator): the "important info" preamble, "The grass is
  green..." filler, the needle "The pass key is KEY. Remember it. KEY is the pass key." at each
  depth, then "What is the pass key? The pass key is", built token by token to exactly each of
  ``beyond.passkey_lengths``; greedy answer, exact match of the first number in it. Vanilla
  attention, LM-Infinite with its reference passkey settings (10 global tokens, window = distance
  cap = the trained context, top-k 5 middle keys from layer 4) and LongHeads (chunks of 256, 16
  per head: a 4096-token budget).
* Per-position NLL of real text (the Python language reference, ``pydoc_data.topics``) over
  ``beyond.nll_windows`` windows of ``beyond.nll_length`` tokens, the same windows for every
  method, averaged over bins of ``beyond.nll_bin`` positions: inside and past the context.

``part=within`` (Recycled Attention, ThinK): prompts inside the trained context, and decoding
against a cache that keeps ``within.budget`` keys per head.

* NLL of the last ``within.nll_scored`` tokens of real-text windows of each of
  ``within.lengths`` tokens, scored by teacher-forced decoding after a prefill of the rest (the
  decoding is what these methods change); the windows are the last tokens of one set of windows,
  so every length and method scores the same tokens.
* Passkey retrieval at each length and depth, as above.
* Methods: vanilla; a sink + recent window cache of the budget (StreamingLLM-like: LM-Infinite's
  Λ-mask with 4 sink tokens and a window of ``budget - 4``, the distance capped at the window);
  Recycled Attention (recycled cache of ``budget`` keys, a full step every 10, static and the
  dynamic query-similarity schedule); ThinK (40% of the key channels pruned) alone, with SnapKV
  eviction to ``budget`` tokens, and SnapKV alone.

For each method the bytes its cache holds after the prompt (from the shapes, ``jax.eval_shape``)
and the median time of a decoding step after the longest prompt (from the streamed tokens of the
passkey answers); the process's peak RSS. Prompts are prefilled in chunks of
``--config.prefill_chunk`` tokens, so memory grows with the chunk and the cache.

Writes ``DIR/long_context_PART.{json,png}`` and ``DIR/RESULTS.md`` (the report); with
``--publish=.`` also ``results/long_context_PART.{json,png}`` and the section of ``RESULTS.md``.
"""

import json
import os
import re
import resource
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import _cli, _results
from experiments.configs import long_context as long_context_config
from jaxrec import data as data_lib
from jaxrec import generate, models, train
from jaxrec.inference import loglikelihood, longctx

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "long_context.py")
PARTS = ("beyond", "within")
SECTIONS = {
  "beyond": "Beyond the trained context: LM-Infinite and LongHeads on SmolLM2-135M",
  "within": "Within the context: Recycled Attention and ThinK on SmolLM2-135M",
}

PREAMBLE = (
  "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
  "them. I will quiz you about the important information there.\n"
)
FILLER = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


def long_context(config, workdir: str | None = None) -> dict:
  """Runs ``config.part``'s evaluations; returns the results (and writes
  ``workdir/long_context_PART.json`` when given)."""
  if config.part not in PARTS:
    raise train.ConfigError(f"--config.part: expected one of {PARTS}, got {config.part!r}")
  part = _grid(config)
  try:
    model, tokenizer = models.load_model(config.model, dtype=config.dtype)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise train.ConfigError(f"--config.model: {e}") from e
  context = model.cfg.max_seq_len
  methods = (_beyond_methods if config.part == "beyond" else _within_methods)(part, context)
  applied = {name: _under(model, policy) for name, policy in methods.items()}
  start = time.perf_counter()
  results = {
    "part": config.part,
    "model": config.model,
    "dtype": config.dtype,
    "context": context,
    "full": config.full,
    "prefill_chunk": config.prefill_chunk,
    "methods": {name: repr(policy) for name, policy in methods.items()},
    "config": json.loads(part.to_json()),
  }
  if config.part == "beyond":
    lengths = train.parse_list(part.passkey_lengths, "--config.beyond.passkey_lengths", int)
    results["passkey"] = passkey(applied, tokenizer, config, lengths, part.depths)
    results["nll"] = _nll_by_position(applied, tokenizer, config, part, context)
  else:
    lengths = train.parse_list(part.lengths, "--config.within.lengths", int)
    results["nll"] = _nll_of_last_tokens(applied, tokenizer, config, part, lengths)
    results["passkey"] = passkey(applied, tokenizer, config, lengths, part.depths)
  results["cache_bytes"] = {
    name: {str(n): cache_bytes(m, n) for n in lengths} for name, m in applied.items()
  }
  results["full_kv_bytes"] = {str(n): cache_bytes(model, n) for n in lengths}
  results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results["seconds"] = time.perf_counter() - start
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"long_context_{config.part}.json"), "w") as f:
      json.dump(results, f, indent=1)
  return results


def _grid(config):
  """``config``'s part, with the accelerator grid filled in when ``config.full``."""
  part = config[config.part]
  if not config.full:
    return part
  part = part.copy_and_resolve_references()
  for (name, field), value in long_context_config.FULL.items():
    if name == config.part:
      part[field] = value
  return part


def _beyond_methods(part, context: int) -> dict:
  li = dict(part.lm_infinite)
  li["window"] = li["window"] or context
  li["distance_cap"] = li["distance_cap"] or context
  try:
    return {
      "vanilla": None,
      "lm_infinite": longctx.lm_infinite(**li),
      "longheads": longctx.longheads(**part.longheads),
    }
  except (TypeError, ValueError) as e:
    raise train.ConfigError(f"--config.beyond: {e}") from e


def _within_methods(part, context: int) -> dict:
  budget, sink = part.budget, part.sink_tokens
  if not 0 < sink < budget < context:
    raise train.ConfigError(
      f"--config.within.budget: expected sink_tokens ({sink}) < budget < the context "
      f"({context}), got {budget}"
    )
  think = dict(part.think)
  snapkv = longctx.SnapKV(capacity=budget, kernel=part.snapkv_kernel)
  try:
    return {
      "vanilla": None,
      "sink_window": longctx.lm_infinite(sink, budget - sink, budget - sink),
      "recycled": longctx.recycled(k=budget, stride=part.recycled.stride),
      "recycled_dynamic": longctx.recycled(k=budget, dynamic=True, **part.recycled),
      "think": longctx.think(**think),
      "think_snapkv": longctx.think(**think, eviction=snapkv),
      "snapkv": longctx.think(0.0, think["observation"], eviction=snapkv),
    }
  except (TypeError, ValueError) as e:
    raise train.ConfigError(f"--config.within: {e}") from e


def _under(model, policy):
  """``model`` with ``policy`` applied to its attention layers (``None``: the model itself)."""
  return model if policy is None else longctx.apply(model, policy)


def passkey_prompt(tokenizer, length: int, key: str, depth: float) -> list[int]:
  """Exactly ``length`` token ids: the preamble, whole filler lines with the needle after the
  ``round(depth * lines)``-th, the filler cut to fit, and the question (each piece encoded
  alone)."""
  pre, fill, needle, question = (
    tokenizer.encode(s) for s in (PREAMBLE, FILLER, NEEDLE.format(key=key), QUESTION)
  )
  room = length - len(pre) - len(needle) - len(question)
  if room < len(fill):
    raise train.ConfigError(
      f"--config.*lengths: a passkey prompt needs at least {length - room + len(fill)} tokens, "
      f"got {length}"
    )
  lines = room // len(fill)
  filler = (fill * (lines + 1))[:room]
  cut = round(depth * lines) * len(fill)
  return pre + filler[:cut] + needle + filler[cut:] + question


def _answer(text: str) -> str:
  found = re.search(r"\d+", text)
  return found.group() if found else ""


def passkey(models_, tokenizer, config, lengths, depths) -> dict:
  """Greedy passkey answers of every method at every length and depth: ``{method: {length:
  {"exact", "digits", "answers", "decode_ms"}}}`` (exact match and per-digit accuracy, the
  answers, the median decoding step of the answers)."""
  depths = train.parse_list(depths, "--config.*.depths", float)
  rng = np.random.default_rng(config.seed)
  digits = config.passkey.digits
  keys = {
    (n, d): str(rng.integers(10 ** (digits - 1), 10**digits)) for n in lengths for d in depths
  }
  out = {}
  for name, model in models_.items():
    for n in lengths:
      answers, steps = [], []
      for d in depths:
        key = keys[n, d]
        stamps = []
        with _past_context_allowed():
          gen = generate(
            model,
            [passkey_prompt(tokenizer, n, key, d)],
            config.passkey.new_tokens,
            buckets=None,
            prefill_chunk=config.prefill_chunk,
            on_token=lambda *_, s=stamps: s.append(time.perf_counter()),
          )
        text = tokenizer.decode(gen.rows()[0])
        answers.append({"depth": d, "key": key, "answer": _answer(text), "text": text[:80]})
        steps.extend(np.diff(stamps))
        logging.info("passkey %s @%d depth %.2f: %r (key %s)", name, n, d, text[:40], key)
      exact = [a["answer"] == a["key"] for a in answers]
      per_digit = [a["answer"][i : i + 1] == a["key"][i] for a in answers for i in range(digits)]
      out.setdefault(name, {})[str(n)] = {
        "exact": float(np.mean(exact)),
        "digits": float(np.mean(per_digit)),
        "decode_ms": 1e3 * float(np.median(steps)) if steps else None,
        "answers": answers,
      }
  return out


def text_windows(tokenizer, count: int, length: int, seed: int) -> np.ndarray:
  """``[count, length]`` token ids of the Python reference's text, from ``count`` starts spread
  over it (evenly spaced, then moved at random within their share) at line starts."""
  text = "\n".join(data_lib.python_reference_corpus("train"))
  chars = 6 * length  # ~4 characters per token in this text
  if len(text) < count * chars:
    raise train.ConfigError(
      f"--config.*nll_windows: {count} windows of {length} tokens need about {count * chars} "
      f"characters of text, the reference has {len(text)}"
    )
  rng = np.random.default_rng(seed)
  share = (len(text) - chars) // count
  windows = []
  for i in range(count):
    start = i * share + int(rng.integers(0, max(1, share - chars + 1)))
    start = text.rfind("\n", 0, start) + 1
    ids = tokenizer.encode(text[start : start + chars])
    if len(ids) < length:
      raise train.ConfigError(f"--config.*nll_length: {length} tokens exceed a window's text")
    windows.append(ids[:length])
  return np.asarray(windows, np.int32)


def _nll_by_position(models_, tokenizer, config, part, context) -> dict:
  """Per-position NLL (nats) of the same real-text windows under every method, in bins."""
  windows = text_windows(tokenizer, part.nll_windows, part.nll_length + 1, config.seed + 1)
  bins = np.arange(0, part.nll_length, part.nll_bin)
  out = {"bin_starts": bins.tolist(), "bin": part.nll_bin}
  for name, model in models_.items():
    nll = []
    for w in windows:  # one window a call: memory bounded by the chunk and the cache
      with _past_context_allowed():
        logp = loglikelihood(model, w[None], prefill_chunk=config.prefill_chunk)
      nll.append(-np.asarray(logp)[0])
    nll = np.stack(nll)  # [W, T]
    positions = np.arange(1, nll.shape[1] + 1)  # the context each prediction had
    out[name] = {
      "bins": [float(nll[:, s : s + part.nll_bin].mean()) for s in bins],
      "inside": float(nll[:, positions <= context].mean()),
      "past": float(nll[:, positions > context].mean()) if positions[-1] > context else None,
      "per_window_past": [float(x) for x in nll[:, positions > context].mean(1)]
      if positions[-1] > context
      else [],
    }
    logging.info("nll %s: inside %.3f, past %s", name, out[name]["inside"], out[name]["past"])
  return out


def _nll_of_last_tokens(models_, tokenizer, config, part, lengths) -> dict:
  """NLL (nats) of the last ``nll_scored`` tokens of each window, by decoding after a prefill
  of the rest, at each context length; the windows end at the same tokens for every length."""
  longest = max(lengths)
  if part.nll_scored >= min(lengths):
    raise train.ConfigError(
      f"--config.within.nll_scored: expected fewer than {min(lengths)} tokens, got "
      f"{part.nll_scored}"
    )
  windows = text_windows(tokenizer, part.nll_windows, longest + 1, config.seed + 1)
  out = {"scored": part.nll_scored}
  for name, model in models_.items():
    for n in lengths:
      w = windows[:, -(n + 1) :]
      logp = loglikelihood(
        model, w, prefill=n - part.nll_scored, prefill_chunk=config.prefill_chunk
      )
      nll = -np.asarray(logp)[:, -part.nll_scored :].mean(axis=1)  # [W]
      out.setdefault(name, {})[str(n)] = {"mean": float(nll.mean()), "windows": nll.tolist()}
      logging.info("nll %s @%d: %.4f", name, n, nll.mean())
  return out


def cache_bytes(model, length: int) -> int:
  """Bytes of ``model``'s cache after a ``length``-token prompt and one decoding step (ThinK
  prunes there after a chunked prefill), from the shapes alone."""
  graphdef, state = nnx.split(model)

  def run(state):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(1, length + 1)
    _, cache = m(jnp.zeros((1, length), jnp.int32), cache=cache)
    _, cache = m(jnp.zeros((1, 1), jnp.int32), cache=cache)
    return cache

  with _past_context_allowed():
    return longctx.cache_bytes(jax.eval_shape(run, state))


class _past_context_allowed(warnings.catch_warnings):
  """Silences the warning for prompts past the trained context: measuring them is the point."""

  def __enter__(self):
    super().__enter__()
    warnings.filterwarnings("ignore", message=r".*trained context.*")


# The papers' claims, the protocol, and the verdicts that follow from the numbers.
CLAIMS = {
  "beyond": (
    "**Claims.** LM-Infinite (Han et al., NAACL 2024): a Λ-shaped mask (a few global tokens, a "
    "local window, distances capped at the trained length) keeps the perplexity of a pretrained "
    "model flat far past its trained context, and with its top-k middle tokens retrieves "
    "passkeys past it where the unmodified model fails. LongHeads (Lu et al., 2024): each head "
    "attending to its own few chunks, within the trained length, retrieves passkeys at every "
    "depth far past the context (100% to 128k for Llama-2-7B) with flat perplexity."
  ),
  "within": (
    "**Claims.** Recycled Attention (Xu et al., 2024): decoding from a small recycled cache "
    "refreshed by periodic full-attention steps keeps language-model loss and retrieval close to "
    "full attention, far better than a sink + recent-window cache (StreamingLLM) of the same "
    "size, at a fraction of the decoding cost. ThinK (Xu et al., ICLR 2025): pruning 40% of the "
    "key channels keeps accuracy nearly unchanged, alone or on top of SnapKV eviction, cutting "
    "the key cache by 40%."
  ),
}
PROTOCOLS = {
  "beyond": (
    "**Protocol.** SmolLM2-135M-Instruct (trained context 8192) as a plain language model, fp32. "
    "Passkey prompts built token by token to the exact length, the needle at each depth, greedy "
    "answer (exact match of its first number). Per-position NLL of real English text (the Python "
    "language reference, `pydoc_data.topics`) on the same windows for every method, prefilled in "
    "chunks. LM-Infinite: 10 global tokens, window = distance cap = 8192, top-k 5 middle keys "
    "from layer 4 (its passkey settings); LongHeads: chunks of 256, 16 per head."
  ),
  "within": (
    "**Protocol.** SmolLM2-135M-Instruct, fp32, prompts inside its 8192-token context. NLL of the "
    "last tokens of real-text windows, scored by teacher-forced decoding after a full-attention "
    "prefill of the rest (the papers' setting: these methods change decoding); passkey prompts as "
    "LM-Infinite's (built token by token to the exact length, the needle at each depth, greedy "
    "answer, exact match of its first number). Every compressing method keeps the same budget of keys per head: the "
    "sink + window baseline is LM-Infinite's Λ-mask with 4 sink tokens and a window of the rest "
    "(StreamingLLM-like: the prefill is windowed too); Recycled Attention's recycled cache (it "
    "still holds the full cache for its full steps); SnapKV's capacity."
  ),
}


def verdict(results: dict) -> str:
  """The verdict of ``results``' part, from its numbers (see CLAIMS)."""
  return _beyond_verdict(results) if results["part"] == "beyond" else _within_verdict(results)


def _beyond_verdict(results) -> str:
  ctx = results["context"]
  nll, key = results["nll"], results["passkey"]
  inside = lambda m: [n for n in key[m] if int(n) <= ctx]
  past = lambda m: [n for n in key[m] if int(n) > ctx]
  acc = lambda m, ns: float(np.mean([key[m][n]["exact"] for n in ns])) if ns else float("nan")
  lines, words = [], {}
  v_past = acc("vanilla", past("vanilla"))
  v_nll = nll["vanilla"]["past"]
  for m, paper in (("lm_infinite", "LM-Infinite"), ("longheads", "LongHeads")):
    flat = nll[m]["past"] is not None and nll[m]["past"] <= nll[m]["inside"] + 0.1
    better = v_nll is None or nll[m]["past"] < v_nll
    a_past = acc(m, past(m))
    retrieves = a_past > v_past
    lines.append(
      f"{paper}: NLL past the context {nll[m]['past']:.3f} against {nll[m]['inside']:.3f} "
      f"inside ({'flat' if flat else 'not flat'}; vanilla {v_nll:.3f} past); passkey past the "
      f"context {a_past:.2f} (vanilla {v_past:.2f}), inside {acc(m, inside(m)):.2f} (vanilla "
      f"{acc('vanilla', inside('vanilla')):.2f})."
    )
    words[paper] = (
      "reproduced"
      if flat and better and retrieves and a_past >= 0.5
      else "partly reproduced"
      if (flat and better) or retrieves
      else "not reproduced"
    )
  head = "; ".join(f"{p} {w}" for p, w in words.items())
  criteria = (
    "(Criteria: reproduced when the NLL past the context stays within 0.1 nats of the NLL "
    "inside it and below vanilla's, and at least half the passkeys past the context are found, "
    "more than vanilla; partly when one of the two holds.)"
  )
  return f"**Verdict: {head}.** " + " ".join(lines) + " " + criteria


def _within_verdict(results) -> str:
  nll, key = results["nll"], results["passkey"]
  lengths = [n for n in nll["vanilla"] if n != "scored"]
  mean = lambda m: float(np.mean([nll[m][n]["mean"] for n in lengths]))
  acc = lambda m: float(np.mean([key[m][n]["exact"] for n in key[m]]))
  gap = {m: mean(m) - mean("vanilla") for m in nll if m not in ("vanilla", "scored")}
  lines = [
    "NLL above full attention, averaged over the lengths: "
    + ", ".join(f"{m} {g:+.3f}" for m, g in gap.items())
    + "; passkey exact match: "
    + ", ".join(f"{m} {acc(m):.2f}" for m in key)
    + "."
  ]
  rec = min(gap["recycled"], gap["recycled_dynamic"])
  recycled = (
    "reproduced"
    if rec < gap["sink_window"] / 2 and acc("recycled") >= acc("sink_window")
    else "partly reproduced"
    if rec < gap["sink_window"]
    else "not reproduced"
  )
  think_ok = abs(gap["think"]) <= 0.05 and acc("think") >= acc("vanilla") - 0.2
  on_snapkv = abs(gap["think_snapkv"] - gap["snapkv"]) <= 0.05
  think = (
    "reproduced"
    if think_ok and on_snapkv
    else "partly reproduced"
    if think_ok
    else "not reproduced"
  )
  criteria = (
    "(Criteria: Recycled Attention is reproduced when its NLL excess over full attention is under "
    "half the sink + window cache's at the same budget and its passkey accuracy at least that "
    "cache's, partly when the excess is only smaller; ThinK when pruning costs at most 0.05 nats "
    "and 0.2 of passkey accuracy alone and changes SnapKV's NLL by at most 0.05 nats, partly "
    "when only the first holds.)"
  )
  return (
    f"**Verdict: Recycled Attention {recycled}; ThinK {think}.** "
    + " ".join(lines)
    + " "
    + criteria
  )


def tables(results: dict) -> str:
  key = results["passkey"]
  lengths = list(next(iter(key.values())))
  rows = [
    "Passkey retrieval, exact match (per-digit accuracy) over the depths, by prompt length "
    "(tokens), and the median decoding step after the longest prompt:\n",
    "| method | " + " | ".join(lengths) + " | ms per token |",
    "|---|" + "---:|" * (len(lengths) + 1),
  ]
  for m, r in key.items():
    cells = [f"{r[n]['exact']:.2f} ({r[n]['digits']:.2f})" for n in lengths]
    rows.append(f"| {m} | " + " | ".join(cells) + f" | {r[lengths[-1]]['decode_ms']:.1f} |")
  nll = results["nll"]
  if results["part"] == "beyond":
    starts = nll["bin_starts"]
    rows += [
      f"\nNLL (nats per token) of real text by position, {len(starts)} bins of {nll['bin']}:\n",
      "| method | inside the context | past it | "
      + " | ".join(f"{s // 1024}k" for s in starts)
      + " |",
      "|---|---:|---:|" + "---:|" * len(starts),
    ]
    for m in results["methods"]:
      past = nll[m]["past"]
      rows.append(
        f"| {m} | {nll[m]['inside']:.3f} | {'-' if past is None else f'{past:.3f}'} | "
        + " | ".join(f"{x:.2f}" for x in nll[m]["bins"])
        + " |"
      )
  else:
    ns = [n for n in nll["vanilla"]]
    rows += [
      f"\nNLL (nats per token) of the last {nll['scored']} tokens by context length:\n",
      "| method | " + " | ".join(ns) + " |",
      "|---|" + "---:|" * len(ns),
    ]
    for m in results["methods"]:
      rows.append(f"| {m} | " + " | ".join(f"{nll[m][n]['mean']:.4f}" for n in ns) + " |")
  sizes = results["cache_bytes"]
  ns = list(results["full_kv_bytes"])
  rows += [
    "\nCache held after the prompt (MB; the full KV cache: "
    + ", ".join(f"{results['full_kv_bytes'][n] / 1e6:.1f} at {n}" for n in ns)
    + "):\n",
    "| method | " + " | ".join(ns) + " |",
    "|---|" + "---:|" * len(ns),
  ]
  for m, r in sizes.items():
    rows.append(f"| {m} | " + " | ".join(f"{r[n] / 1e6:.1f}" for n in ns) + " |")
  return "\n".join(rows)


def _plot(results: dict, path: str) -> None:
  fig = Figure(figsize=(10, 3.6))
  FigureCanvasAgg(fig)
  ax_nll, ax_key = fig.subplots(1, 2)
  nll, key = results["nll"], results["passkey"]
  for m in results["methods"]:
    if results["part"] == "beyond":
      x = np.asarray(nll["bin_starts"]) + nll["bin"] / 2
      ax_nll.plot(x, nll[m]["bins"], marker="o", ms=3, label=m)
    else:
      ns = list(nll[m])
      ax_nll.plot([int(n) for n in ns], [nll[m][n]["mean"] for n in ns], marker="o", label=m)
    ns = list(key[m])
    ax_key.plot([int(n) for n in ns], [key[m][n]["exact"] for n in ns], marker="o", label=m)
  ax_nll.set_xlabel("position (tokens)" if results["part"] == "beyond" else "context (tokens)")
  ax_nll.set_ylabel("NLL (nats per token)")
  ax_key.set_xlabel("prompt length (tokens)")
  ax_key.set_ylabel("passkey exact match")
  for ax in (ax_nll, ax_key):
    ax.axvline(results["context"], color="k", ls=":", lw=1)
    ax.grid(alpha=0.3)
  ax_nll.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _sample_size(results: dict) -> str:
  """How much the numbers rest on: the passkey prompts and text windows behind each figure."""
  c = results["config"]
  depths = len(str(c["depths"]).split(","))
  windows = c["nll_windows"]
  text = (
    f"**Sample size.** Each passkey figure is a fraction of {depths} prompts (one per depth), "
    f"and the NLL averages {windows} text window{'s' if windows > 1 else ''}"
  )
  if results["part"] == "beyond":
    text += (
      ": the difference between inside and past the context is partly the text's own (read "
      "each bin against vanilla's, which scores the same tokens)"
    )
  return text + "."


def _write_results(
  results: dict, command: str, out_dir: str, publish: str | None = None
) -> list[str]:
  """``long_context_PART.{json,png}`` and the report under ``out_dir`` (and ``publish``)."""
  part = results["part"]
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f"long_context_{part}.json")
  png = os.path.join(out_dir, f"long_context_{part}.png")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  _plot(results, png)
  section = lambda link: (
    f"## {SECTIONS[part]}\n\n{CLAIMS[part]}\n\n{PROTOCOLS[part]}\n\n{tables(results)}\n\n"
    f"![NLL and passkey]({link(png)})\n\n{verdict(results)}\n\n{_sample_size(results)}\n\n"
    f"Data: `{link(json_path)}`. The evaluation took {results['seconds']:.0f} s with a peak RSS of "
    f"{results['peak_rss_mb']:.0f} MB (backend {jax.default_backend()}, {os.cpu_count()} cores, "
    "shared with other jobs). "
    f"Command:\n\n```\n{command}\n```\n\n"
  )
  return _results.write_report(out_dir, [json_path, png], section, publish=publish)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    results = long_context(flags.FLAGS.config, flags.FLAGS.workdir)
  print(tables(results))
  print(verdict(results))
  command = " ".join(["python -m experiments.long_context", *sys.argv[1:]])
  for path in _write_results(results, command, flags.FLAGS.workdir, flags.FLAGS.publish):
    print(f"wrote the section {SECTIONS[results['part']]!r} of {path}")


if __name__ == "__main__":
  # Flags are defined when this runs as a program, not on import (see experiments/set_based.py).
  _cli.define_config_flag("Long-context evaluation configuration file.", CONFIG_FILE)
  flags.DEFINE_string("workdir", None, "Directory for the results.")
  flags.mark_flag_as_required("workdir")
  _results.define_publish_flag()
  _cli.run(main)
