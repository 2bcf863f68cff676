"""``experiments.set_based`` at a tiny size: a random Llama with a chat tokenizer written as a
Hugging Face directory, three questions in every order. The batched, padded scores and greedy
answers equal ``loglikelihood`` and ``jaxrec.generate`` on each prompt alone (vanilla: the plain
model; Set-Based: the static ``set_based`` policy of that prompt's layout), Set-Based's scores do
not move with the order, and the section of RESULTS.md is written from the JSON."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, lm_logits_atol, max_abs, rounding_atol, save_chat_llama

import jaxrec
from experiments import set_based as sb
from experiments.configs import set_based as sb_config
from jaxrec import train
from jaxrec.data import end_of_turn_ids
from jaxrec.inference import loglikelihood, longctx
from jaxrec.models import load_pretrained

pytest.importorskip("gguf")
pytest.importorskip("jinja2")

QUESTIONS = [
  {"question": "What do bees make?", "options": ["milk", "honey", "silk"], "answer": 1},
  {"question": "Which is a fruit?", "options": ["apple", "brick", "chair"], "answer": 0},
  {"question": "What is 2 + 2?", "options": ["five", "three", "four"], "answer": 2},
]
STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny-llama")
  _, tokenizer = save_chat_llama(folder)
  questions = folder / "questions.json"
  questions.write_text(json.dumps(QUESTIONS))
  config = sb_config.get_config()
  config.model, config.questions = str(folder), str(questions)
  config.max_new_tokens, config.batch_size = STEPS, 2  # the second batch is padded
  results = sb.set_based_eval(config, str(folder / "work"))
  return results, load_pretrained(folder), tokenizer, folder


def _ll_atol(model, tokens, n):
  """A sum of ``n`` log-softmaxes, each moved by at most twice its logits' error, over two
  computations of a ``T``-token run (testing_utils' rule for whole models)."""
  logits = model(jnp.asarray(tokens))[0]
  per = 2 * lm_logits_atol(logits, model.cfg, tokens.shape[1])
  return n * per + rounding_atol(max_abs(logits) * n, terms=n)


def test_scores_and_answers_equal_each_prompt_alone(run):
  results, model, tokenizer, _ = run
  end = end_of_turn_ids(tokenizer)
  for o, order in enumerate(results["orders"][:2]):
    for i, q in enumerate(QUESTIONS):
      prefix, lines, suffix = sb.render(tokenizer, q, order)
      prompt = prefix + [t for line in lines for t in line] + suffix
      for a, option in enumerate(q["options"]):
        answer = [*tokenizer.encode(option), end[0]]
        tokens = np.asarray([prompt + answer], np.int32)
        # loglikelihood reads all but the last token: the answer but its end are the suffix's.
        rest = len(suffix) + len(answer) - 1
        static = longctx.set_based(len(prefix), tuple(map(len, lines)), rest)
        for method, m in (("vanilla", model), ("set_based", longctx.apply(model, static))):
          want = float(np.asarray(loglikelihood(m, tokens))[0, -len(answer) :].sum())
          got = results["raw"][method]["scores"][o][i][a]
          atol = _ll_atol(model, tokens, len(answer))
          assert_close(got, want, rtol=0, atol=atol, err_msg=f"{method} {order} q{i} option {a}")
      alone = jaxrec.generate(model, [prompt], STEPS, stop_tokens=end).rows()[0]
      want = tokenizer.decode([t for t in alone if t not in end], skip_special_tokens=True).strip()
      assert results["raw"]["vanilla"]["texts"][o][i] == want


def test_set_based_scores_do_not_move_with_the_order(run):
  results, model, _, _ = run
  scores = np.asarray(results["raw"]["set_based"]["scores"])  # [orders, questions, options]
  vanilla = np.asarray(results["raw"]["vanilla"]["scores"])
  assert len(scores) == 6
  # Every order is a reordered computation of the same sums (the atol of the longest prompt).
  width = results["prompt_tokens"] + max(map(max, results["answer_tokens"]))
  tokens = np.zeros((1, width), np.int32)
  atol = _ll_atol(model, tokens, max(map(max, results["answer_tokens"])))
  assert np.abs(scores - scores[0]).max() <= max(atol, 1e-6)
  assert np.abs(vanilla - vanilla[0]).max() > 1e-3  # the plain model does read the order
  assert results["methods"]["set_based"]["loglik"]["order_sensitive"] == 0.0
  assert results["methods"]["set_based"]["greedy"]["order_sensitive"] == 0.0


def test_results_section_and_bad_questions(run, tmp_path):
  results, _, _, folder = run
  on_disk = json.loads((folder / "work" / "set_based.json").read_text())
  assert on_disk["methods"] == results["methods"]
  out, checkout = tmp_path / "out", tmp_path / "checkout"
  command = "python -m experiments.set_based --workdir w --publish=."
  reports = sb._write_results(results, str(out), command, publish=str(checkout))
  assert reports == [str(out / "RESULTS.md"), str(checkout / "RESULTS.md")]
  acc = results["methods"]["set_based"]["greedy"]["accuracy"]
  for report, link in zip(reports, ("`set_based.json`", "`results/set_based.json`"), strict=True):
    text = pathlib.Path(report).read_text()
    assert f"| set_based | greedy text | {acc:.3f} |" in text and link in text and command in text
  assert json.loads((checkout / "results" / "set_based.json").read_text())["seconds"] > 0
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"question": "Q?", "options": ["twenty", "twenty-six", "x"]}]))
  with pytest.raises(train.ConfigError, match=r"--config.questions: entry 0"):
    sb.load_questions(str(bad))
  bad.write_text(
    json.dumps([{"question": "Q?", "options": ["twenty", "twenty-six", "x"], "answer": 0}])
  )
  with pytest.raises(train.ConfigError, match="'twenty' is a whole word of option 'twenty-six'"):
    sb.load_questions(str(bad))
