r"""Set-Based Prompting (McIlroy-Young et al., arXiv 2406.06581) on a real chat model: does the
answer to a multiple-choice question depend on the order of its options, and what does removing
that dependence cost?

``python -m experiments.set_based --workdir DIR [--config.FIELD=VALUE ...]``; the config is
``experiments/configs/set_based.py``. Each question is asked as one user turn of the model's
chat template::

  Answer the question with the correct option, copied exactly.
  Question: What do bees make?
  Options:
  - milk
  - honey
  - silk
  Reply with the option only.

in every order of its options (3! = 6 for three). Vanilla reads the prompt as written; Set-Based
Prompting reads the option lines as a set (``jaxrec.inference.longctx.set_based_rows``: no option
line sees another, each starts at the same position), so what comes after them cannot depend on
their order. Two ways of answering, both reported:

* **greedy** (the paper's metric): the model's greedy answer, to its end of turn or
  ``max_new_tokens``, is correct when it contains the correct option and no other (whole words,
  case-insensitive);
* **log-likelihood**: the option whose text followed by the end of turn is the most likely
  answer (summed log-probabilities) is the model's pick.

For each method: accuracy over all (question, order) pairs, in the canonical order (as written in
the file), the worst and the best single order, and the fraction of questions whose answer
(text, or pick) changes with the order. Prompts are left-padded into batches of one width for
every order (padding is a separate segment for vanilla, a group no token sees for Set-Based), so
each method compiles one program.

Writes ``DIR/set_based.json`` and ``DIR/RESULTS.md`` (the report); with ``--publish=.`` also
``results/set_based.json`` and the section of ``RESULTS.md``.
"""

import itertools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from experiments import _cli, _results
from jaxrec import data as data_lib
from jaxrec import models, train
from jaxrec.inference import longctx

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "configs", "set_based.py")
QUESTIONS = os.path.join(os.path.dirname(__file__), "data", "general_knowledge_mcq.json")
SECTION = "Set-Based Prompting on SmolLM2-135M-Instruct: order-independent multiple choice"

INSTRUCTION = "Answer the question with the correct option, copied exactly.\n"
OUTRO = "Reply with the option only."
_MARK = "\x00OPTIONS\x00"
METHODS = ("vanilla", "set_based")


def load_questions(path: str) -> list[dict]:
  """The questions of ``path``, checked: each a question, 3 or 4 distinct options, an answer
  index; no option a whole word of another (the greedy metric could not tell them apart)."""
  with open(path, encoding="utf-8") as f:
    questions = json.load(f)
  if not isinstance(questions, list) or not questions:
    raise train.ConfigError(f"--config.questions: expected a non-empty JSON list in {path}")
  for i, q in enumerate(questions):
    options = q.get("options") if isinstance(q, dict) else None
    ok = (
      isinstance(q, dict)
      and isinstance(q.get("question"), str)
      and isinstance(options, list)
      and len(options) in (3, 4)
      and all(isinstance(o, str) and o.strip() for o in options)
      and len({o.lower() for o in options}) == len(options)
      and isinstance(q.get("answer"), int)
      and 0 <= q["answer"] < len(options)
    )
    if not ok:
      raise train.ConfigError(
        f"--config.questions: entry {i} of {path}: expected {{'question': str, 'options': 3 or 4 "
        f"distinct strings, 'answer': an option index}}, got {q!r}"
      )
    for a, b in itertools.permutations(options, 2):
      if _mentions(b, a):
        raise train.ConfigError(
          f"--config.questions: entry {i} of {path}: option {a!r} is a whole word of option "
          f"{b!r}; the greedy answer could not tell them apart"
        )
  if len({len(q["options"]) for q in questions}) != 1:
    raise train.ConfigError(f"--config.questions: expected one number of options in {path}")
  return questions


def _mentions(text: str, option: str) -> bool:
  return re.search(rf"(?<!\w){re.escape(option.lower())}(?!\w)", text.lower()) is not None


def render(tokenizer, question: dict, order) -> tuple[list[int], list[list[int]], list[int]]:
  """Token ids of the prompt's prefix, its option lines in ``order`` and its suffix (the end of
  the user turn and the start of the answer), each encoded alone so that every order and both
  methods read the same tokens."""
  content = f"{INSTRUCTION}Question: {question['question']}\nOptions:\n{_MARK}{OUTRO}"
  text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
  before, after = text.split(_MARK)
  lines = [tokenizer.encode(f"- {question['options'][a]}\n") for a in order]
  return tokenizer.encode(before), lines, tokenizer.encode(after)


def build_batch(tokenizer, questions, orders, width, end_id):
  """Left-padded prompts ``[B, width]`` of each question in its order, with vanilla's segment
  ids, Set-Based's groups and positions, and each option's answer ids (its text then the end of
  turn) ``[B, A, L]`` in option-index order with their lengths ``[B, A]``."""
  b = len(questions)
  tokens = np.zeros((b, width), np.int32)
  segments = np.zeros((b, width), np.int32)
  groups = np.full((b, width), -1, np.int32)
  positions = np.zeros((b, width), np.int32)
  answers = [[[*tokenizer.encode(o), end_id] for o in q["options"]] for q in questions]
  longest = max(len(a) for row in answers for a in row)
  answer_ids = np.zeros((b, len(answers[0]), longest), np.int32)
  answer_len = np.zeros((b, len(answers[0])), np.int32)
  for i, (q, order) in enumerate(zip(questions, orders, strict=True)):
    prefix, lines, suffix = render(tokenizer, q, order)
    policy = longctx.set_based(len(prefix), tuple(len(x) for x in lines), len(suffix))
    ids = np.concatenate([prefix, *lines, suffix]).astype(np.int32)
    if len(ids) > width:
      raise ValueError(f"width: expected >= {len(ids)} tokens, got {width}")
    g, p = policy.groups()
    tokens[i, width - len(ids) :], groups[i, width - len(ids) :] = ids, g
    positions[i, width - len(ids) :], segments[i, width - len(ids) :] = p, 1
    for a, ans in enumerate(answers[i]):
      answer_ids[i, a, : len(ans)], answer_len[i, a] = ans, len(ans)
  return dict(
    tokens=tokens,
    segments=segments,
    groups=groups,
    positions=positions,
    answers=answer_ids,
    answer_len=answer_len,
  )


def prompt_width(tokenizer, questions) -> int:
  """Tokens of the longest prompt (the same in every order: the lines are encoded alone)."""
  longest = 0
  for q in questions:
    prefix, lines, suffix = render(tokenizer, q, range(len(q["options"])))
    longest = max(longest, len(prefix) + sum(map(len, lines)) + len(suffix))
  return longest


def _answer(graphdef, state, batch, *, set_based: bool, steps: int):
  """Greedy tokens ``[B, steps]`` after each prompt and each option's summed log-likelihood
  ``[B, A]``, from one prefill."""
  model = nnx.merge(graphdef, state)
  tokens = batch["tokens"]
  b, width = tokens.shape
  _, options, longest = batch["answers"].shape
  room = width + max(steps, longest)
  if set_based:
    model = longctx.apply(model, longctx.set_based_rows())
    cache = longctx.write_layout(model.init_cache(b, room), batch["groups"], batch["positions"])
    logits, cache = model(tokens, cache=cache)
  else:
    cache = model.init_cache(b, room)
    logits, cache = model(tokens, segment_ids=batch["segments"], cache=cache)
  last = logits[:, -1]

  def step(carry, _):
    token, c = carry
    out, c = model(token[:, None], cache=c)
    return (jnp.argmax(out[:, -1], -1).astype(jnp.int32), c), token

  first = jnp.argmax(last, -1).astype(jnp.int32)
  _, greedy = jax.lax.scan(step, (first, cache), None, length=steps)

  # Every option's answer continues the same prefilled cache: the cache repeated per option
  # (the arrays with a batch axis; a ring's slot positions, say, have none).
  wide = jax.eval_shape(lambda: model.init_cache(b * options, room))
  tiled = jax.tree.map(
    lambda x, w: jnp.repeat(x, options, axis=0) if x.shape != w.shape else x, cache, wide
  )
  answers = batch["answers"].reshape(b * options, longest)
  out, _ = model(answers, cache=tiled)
  prev = jnp.concatenate([jnp.repeat(last, options, axis=0)[:, None], out[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(prev, -1)
  picked = jnp.take_along_axis(logp, answers[..., None], -1)[..., 0]
  mask = jnp.arange(longest) < batch["answer_len"].reshape(-1, 1)
  scores = jnp.where(mask, picked, 0.0).sum(-1).reshape(b, options)
  return greedy.T, scores


_answer_jit = jax.jit(_answer, static_argnums=(0,), static_argnames=("set_based", "steps"))


def ask(model, batch, *, set_based: bool, steps: int, batch_size: int):
  """``_answer`` over ``batch`` in slices of ``batch_size`` rows (the last one padded with
  copies of the first row), as numpy."""
  graphdef, state = nnx.split(model)
  n = len(batch["tokens"])
  greedy, scores = [], []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    rows = np.where(rows < n, rows, start)
    part = {k: jnp.asarray(v[rows]) for k, v in batch.items()}
    g, s = _answer_jit(graphdef, state, part, set_based=set_based, steps=steps)
    keep = min(batch_size, n - start)
    greedy.append(np.asarray(g)[:keep])
    scores.append(np.asarray(s)[:keep])
  return np.concatenate(greedy), np.concatenate(scores)


def set_based_eval(config, workdir: str | None = None) -> dict:
  """Loads the model and questions, answers every question in every order with both methods;
  returns the results (and writes ``workdir/set_based.json`` when given)."""
  try:
    model, tokenizer = models.load_model(config.model, dtype=config.dtype)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise train.ConfigError(f"--config.model: {e}") from e
  if getattr(tokenizer, "chat_template", None) is None:
    raise train.ConfigError(f"--config.model: {config.model} has no chat template")
  questions = load_questions(config.questions or QUESTIONS)
  if config.max_questions:
    questions = questions[: config.max_questions]
  ends = data_lib.end_of_turn_ids(tokenizer)
  if not ends:
    raise train.ConfigError(f"--config.model: {config.model}'s tokenizer has no end-of-turn token")
  n_options = len(questions[0]["options"])
  orders = list(itertools.permutations(range(n_options)))
  width = prompt_width(tokenizer, questions)
  start = time.perf_counter()
  raw = {m: {"texts": [], "scores": []} for m in METHODS}
  for order in orders:
    batch = build_batch(tokenizer, questions, [order] * len(questions), width, ends[0])
    lengths = batch["answer_len"]
    for method in METHODS:
      greedy, scores = ask(
        model,
        batch,
        set_based=method == "set_based",
        steps=config.max_new_tokens,
        batch_size=config.batch_size,
      )
      raw[method]["texts"].append([_text(tokenizer, row, ends) for row in greedy])
      raw[method]["scores"].append(scores.tolist())
    logging.info("order %s done after %.0f s", order, time.perf_counter() - start)
  results = {
    "model": config.model,
    "dtype": config.dtype,
    "questions": len(questions),
    "options": n_options,
    "orders": [list(o) for o in orders],
    "chance": 1 / n_options,
    "prompt_tokens": width,
    "prompt_example": _prompt_text(tokenizer, questions[0]),
    "answer_tokens": lengths.tolist(),
    "methods": {
      m: summarize(questions, raw[m]["texts"], raw[m]["scores"], lengths) for m in METHODS
    },
    "raw": raw,
    "seconds": time.perf_counter() - start,
  }
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "set_based.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  return results


def _prompt_text(tokenizer, question) -> str:
  prefix, lines, suffix = render(tokenizer, question, range(len(question["options"])))
  return tokenizer.decode(prefix + [t for line in lines for t in line] + suffix)


def _text(tokenizer, row, ends) -> str:
  row = list(np.asarray(row))
  cut = next((i for i, t in enumerate(row) if t in ends), len(row))
  return tokenizer.decode(row[:cut], skip_special_tokens=True).strip()


def summarize(questions, texts, scores, lengths) -> dict:
  """Accuracies of the greedy texts ``[orders][questions]`` and of the log-likelihood picks of
  ``scores [orders][questions][options]`` (options in index order), summed and per answer token
  (``lengths [questions][options]``)."""
  truth = np.array([q["answer"] for q in questions])
  greedy = np.array(
    [
      [
        _mentions(t, q["options"][q["answer"]])
        and not any(_mentions(t, o) for j, o in enumerate(q["options"]) if j != q["answer"])
        for t, q in zip(row, questions, strict=True)
      ]
      for row in texts
    ]
  )  # [orders, questions]
  scores = np.asarray(scores)
  out = {
    "greedy": _accuracies(greedy)
    | {"order_sensitive": float(np.mean([len(set(c)) > 1 for c in zip(*texts, strict=True)]))}
  }
  for kind, s in (("loglik", scores), ("loglik_per_token", scores / np.asarray(lengths))):
    picks = s.argmax(-1)
    out[kind] = _accuracies(picks == truth) | {
      "order_sensitive": float(np.mean((picks != picks[0]).any(axis=0))),
      "max_score_change": float(np.abs(s - s[0]).max()),
    }
  return out


def _accuracies(correct: np.ndarray) -> dict:
  per_order = correct.mean(axis=1)
  return {
    "accuracy": float(correct.mean()),
    "canonical": float(per_order[0]),
    "worst_order": float(per_order.min()),
    "best_order": float(per_order.max()),
  }


def tables(results: dict) -> str:
  head = (
    "| method | answer | accuracy (all orders) | canonical order | worst order | best order | "
    "questions whose answer changes with the order |\n|---|---|---:|---:|---:|---:|---:|"
  )
  rows = []
  for m, r in results["methods"].items():
    for kind, label in (
      ("greedy", "greedy text"),
      ("loglik", "log-likelihood"),
      ("loglik_per_token", "log-likelihood per token"),
    ):
      a = r[kind]
      rows.append(
        f"| {m} | {label} | {a['accuracy']:.3f} | {a['canonical']:.3f} | {a['worst_order']:.3f} "
        f"| {a['best_order']:.3f} | {a['order_sensitive']:.3f} |"
      )
  return head + "\n" + "\n".join(rows)


CLAIM = (
  "**Claim** (McIlroy-Young et al., 2024): reading the options as a set (no option attends to "
  "another, all start at one position) makes the answer provably independent of their order, "
  "without fine-tuning, at an accuracy that stays near the model's across orders (the paper "
  "reports a small drop for some models, within the spread of the orderings)."
)
PROTOCOL = (
  "**Protocol**: each question one user turn of the model's chat template, the options as "
  "`- option` lines; vanilla reads the prompt as written, Set-Based reads the option lines as a "
  "set (`longctx.set_based_rows`, batched). Greedy answers (to the end of turn, at most "
  "`max_new_tokens`) count when they contain the correct option and no other (the paper's "
  "metric); log-likelihood answers pick the option whose text and end of turn is most likely "
  "(summed, and per token). The model must beat chance in the canonical order."
)


def verdict(results: dict) -> str:
  """The verdict that follows from the numbers (see CLAIM)."""
  v, sb = results["methods"]["vanilla"], results["methods"]["set_based"]
  n, chance = results["questions"], results["chance"]
  if v["greedy"]["canonical"] <= chance and v["loglik"]["canonical"] <= chance:
    return (
      f"**Verdict: not testable here**: the model is not above chance ({chance:.3f}) in the "
      "canonical order."
    )
  flips = round(sb["greedy"]["order_sensitive"] * n)
  invariant = sb["loglik"]["order_sensitive"] == 0 and flips <= max(1, n // 100)
  within = all(
    sb[k]["accuracy"] >= v[k]["worst_order"] for k in ("greedy", "loglik", "loglik_per_token")
  )
  parts = [
    f"vanilla's answer changes with the order for {v['greedy']['order_sensitive']:.0%} of the "
    f"questions (greedy) and its accuracy ranges {v['greedy']['worst_order']:.3f}-"
    f"{v['greedy']['best_order']:.3f} over the orders;",
    f"Set-Based's log-likelihood picks never change (largest score change "
    f"{sb['loglik']['max_score_change']:.2g} nats, rounding) and its greedy answer changes for "
    f"{flips} of {n} questions" + (" (an argmax near a tie, moved by rounding);" if flips else ";"),
    f"its accuracy ({sb['greedy']['accuracy']:.3f} greedy, {sb['loglik']['accuracy']:.3f} "
    f"log-likelihood) is {'within or above' if within else 'below'} vanilla's range over the "
    f"orders (mean {v['greedy']['accuracy']:.3f} greedy, {v['loglik']['accuracy']:.3f} "
    "log-likelihood).",
  ]
  word = (
    "reproduced" if invariant and within else "partly reproduced" if invariant else "not reproduced"
  )
  return f"**Verdict: {word}**: " + " ".join(parts)


def _write_results(
  results: dict, out_dir: str, command: str, publish: str | None = None
) -> list[str]:
  """``set_based.json`` and the report under ``out_dir`` (and ``publish``)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "set_based.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  m = results["methods"]
  section = lambda link: (
    f"## {SECTION}\n\n{CLAIM}\n\n{PROTOCOL}\n\n"
    f"{results['questions']} questions with {results['options']} options (chance "
    f"{results['chance']:.3f}), each asked in all {len(results['orders'])} orders; "
    f"{results['model']} in {results['dtype']}.\n\n{tables(results)}\n\n"
    "Largest change of an option's log-likelihood between orders: vanilla "
    f"{m['vanilla']['loglik']['max_score_change']:.3g}, Set-Based "
    f"{m['set_based']['loglik']['max_score_change']:.3g} nats.\n\n{verdict(results)}\n\n"
    f"Data: `{link(path)}`. The evaluation took {results['seconds']:.0f} s (backend "
    f"{jax.default_backend()}, {os.cpu_count()} cores). Command:\n\n```\n{command}\n```\n\n"
  )
  return _results.write_report(out_dir, [path], section, publish=publish)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    results = set_based_eval(flags.FLAGS.config, flags.FLAGS.workdir)
  print(tables(results))
  command = " ".join(["python -m experiments.set_based", *sys.argv[1:]])
  for path in _write_results(results, flags.FLAGS.workdir, command, flags.FLAGS.publish):
    print(f"wrote the section {SECTION!r} of {path}")


if __name__ == "__main__":
  # Flags are defined when this runs as a program, not on import: the tests import the module
  # beside other launchers, whose --config flags would clash with its own.
  _cli.define_config_flag("Set-Based Prompting evaluation configuration file.", CONFIG_FILE)
  flags.DEFINE_string("workdir", None, "Directory for the results.")
  flags.mark_flag_as_required("workdir")
  _results.define_publish_flag()
  _cli.run(main)
