"""``experiments.linearize`` as a user runs it, on the Llama fixture as the Hugging Face teacher:
convert, fine-tune with LoRA for two steps, evaluate, probe, export a checkpoint that loads back;
then the errors a user can cause. One subprocess; compiling is most of its time."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from testing_utils import save_chat_llama

import jaxrec
from experiments import set_based
from jaxrec.data import end_of_turn_ids
from jaxrec.inference import loglikelihood
from jaxrec.models import load_pretrained

REPO = pathlib.Path(__file__).resolve().parents[2]
TEACHER = REPO / "tests" / "fixtures" / "llama" / "llama"
TINY = [
  f"--config.teacher={TEACHER}",
  "--config.seq_len=32",
  "--config.batch_size=8",
  "--config.finetune_tokens=512",  # two steps
  "--config.eval_batches=1",
  "--config.liger.window=4",
  "--config.probe.pairs=2",
  "--config.probe.gap=8",
  "--config.probe.sequences=4",
]


def _run(workdir, *flags):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  argv = [sys.executable, "-m", "experiments.linearize", f"--workdir={workdir}", *TINY, *flags]
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_linearizes_a_hugging_face_teacher_and_exports_it(tmp_path):
  done = _run(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / "linearize.json").read_text())
  assert list(results) == ["teacher", "liger"]
  liger = results["liger"]
  assert liger["steps"] == 2 and len(liger["curve"]) == 2 and liger["tokens"] == 512
  for scores in (results["teacher"], liger["converted"], liger["finetuned"]):
    assert scores["bits_per_token"] > 0 and 0 <= scores["mqar"] <= 1, scores
  assert "| teacher |" in done.stdout and "| liger |" in done.stdout

  exported = load_pretrained(liger["export"], dtype="float32")
  assert (
    exported.cfg.layer_mixers == ("liger", "liger") and exported.cfg.options("liger").window == 4
  )
  assert (pathlib.Path(liger["export"]) / "tokenizer.json").is_file()
  teacher = load_pretrained(TEACHER, dtype="float32")
  # LoRA trained q, k, v and was merged into them; every other weight is the teacher's.
  got = dict(nnx.to_flat_state(nnx.state(exported, nnx.Param)))
  for path, param in nnx.to_flat_state(nnx.state(teacher, nnx.Param)):
    same = np.array_equal(got[path][...], param[...])
    assert same == (not {"q_proj", "k_proj", "v_proj"} & set(path)), path

  again = _run(tmp_path)
  assert again.returncode != 0 and "liger/export exists from an earlier run" in again.stderr
  # The default --config.settings="" is every setting of the study: the first one's export is
  # found before any work.
  (tmp_path / "liger-gla" / "export").mkdir(parents=True)
  every = _run(tmp_path, "--config.study=ablations")
  assert every.returncode != 0 and "liger-gla/export exists from an earlier run" in every.stderr
  bad = _run(tmp_path / "bad", "--config.study=all")
  assert "--config.study: expected '' or 'ablations', got 'all'" in bad.stderr
  bad = _run(tmp_path / "bad", "--config.corpus=wiki")
  assert "--config.corpus: expected one of stdlib, python_reference" in bad.stderr


def test_a_chat_teachers_ablations_measure_state_accuracy_and_answers(tmp_path):
  """A random Llama with a chat tokenizer as the teacher (what SmolLM2 is at full size), the
  ablation study cut to Liger-GLA and the sliding window alone: each model is measured by its
  decoding state (the teacher's KV cache at its context, the students' constant), the
  multiple-choice accuracy (equal to picking by ``loglikelihood`` question by question) and a
  greedy chat answer (equal to ``jaxrec.generate`` on the rendered prompt); the workdir's report and,
  with ``--publish``, the checkout's RESULTS.md get the real-model section with its verdict."""
  pytest.importorskip("gguf")
  pytest.importorskip("jinja2")
  folder = tmp_path / "chat-llama"
  # A 512-token context: the multiple-choice prompts of its small tokenizer reach 260 tokens.
  _, tokenizer = save_chat_llama(folder, max_seq_len=512)
  flags = [
    f"--config.teacher={folder}",
    "--config.corpus=python_reference",
    "--config.study=ablations",
    "--config.settings=swa-only,liger-gla",
    "--config.finetune_tokens=256",  # one step of 8 x 32
    "--config.mcq=3",
    "--config.sample.prompt=Hi",
    "--config.sample.max_new_tokens=3",
    "--config.sample.always=True",
    "--config.export=False",
  ]
  argv = [sys.executable, "-m", "experiments.linearize", f"--workdir={tmp_path / 'w'}"]
  argv += [*TINY[1:], *flags, f"--publish={tmp_path / 'checkout'}"]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(REPO))
  done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / "w" / "linearize_chat_llama.json").read_text())
  for ext in ("json", "png"):
    published = tmp_path / "checkout" / "results" / f"linearize_chat_llama.{ext}"
    assert published.read_bytes() == (tmp_path / "w" / f"linearize_chat_llama.{ext}").read_bytes()
  assert list(results) == ["teacher", "liger-gla", "swa-only"]

  teacher = load_pretrained(folder, dtype="float32")
  t = results["teacher"]
  # The teacher's KV cache at its 512-token context: keys and values of 2 heads of width 8 in 2
  # layers, fp32 (and the cache's bookkeeping); every student's state is smaller and constant.
  kv = 2 * 2 * 512 * 2 * 8 * 4
  assert kv <= t["state_bytes"] < kv * 1.2 and t["state_context"] == 512
  for name in ("liger-gla", "swa-only"):
    assert results[name]["finetuned"]["state_bytes"] < kv / 2, name
  # The window alone keeps the ring of 4 keys and values per layer, no recurrent state.
  ring = 2 * 2 * 4 * 2 * 8 * 4
  assert ring <= results["swa-only"]["finetuned"]["state_bytes"] < 2 * ring

  questions = set_based.load_questions(set_based.QUESTIONS)[:3]
  end = end_of_turn_ids(tokenizer)[0]
  correct = []
  for q in questions:
    prefix, lines, suffix = set_based.render(tokenizer, q, range(3))
    prompt = prefix + [i for line in lines for i in line] + suffix
    scores = []
    for option in q["options"]:
      answer = [*tokenizer.encode(option), end]
      logp = loglikelihood(teacher, np.asarray([prompt + answer], np.int32))
      scores.append(float(np.asarray(logp)[0, -len(answer) :].sum()))
    correct.append(int(np.argmax(scores)) == q["answer"])
  assert t["mcq"] == pytest.approx(np.mean(correct)) and t["mcq_chance"] == pytest.approx(1 / 3)

  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
  gen = jaxrec.generate(
    teacher, [tokenizer.encode(chat)], 3, stop_tokens=end_of_turn_ids(tokenizer)
  )
  assert t["sample"] == tokenizer.decode(gen.rows()[0], skip_special_tokens=True)

  for report, prefix in ((tmp_path / "w", ""), (tmp_path / "checkout", "results/")):
    text = (report / "RESULTS.md").read_text()
    assert "## Liger on chat-llama" in text and "**Verdict: " in text and "**Claim**" in text
    assert "| swa-only |" in text and "decode state MB at 512 tokens" in text
    assert f"]({prefix}linearize_chat_llama.png)" in text
  assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-llama", "checkout", "w"]
  bad = _run(tmp_path / "bad", "--config.study=ablations", "--config.settings=liger,no-swa")
  assert "--config.settings: expected names of liger-gla" in bad.stderr


def test_the_smollm2_config_sets_only_fields_of_the_launchers_config():
  """A mistyped field in ``configs/linearize_smollm2.py`` would add a new field silently."""
  from experiments.configs import linearize as base
  from experiments.configs import linearize_smollm2 as real

  def fields(config, prefix=""):
    out = set()
    for key, value in config.items():
      out |= fields(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
    return out

  config = real.get_config()
  assert fields(config) == fields(base.get_config())
  assert (config.teacher, config.liger.window, config.lora.rank) == ("smollm2-135m", 64, 8)
  assert config.lora.targets == "q_proj,k_proj,v_proj" and config.study == "ablations"
