"""``experiments.linearize`` as a user runs it, on the Llama fixture as the Hugging Face teacher:
convert, fine-tune with LoRA for two steps, evaluate, probe, export a checkpoint that loads back;
then the errors a user can cause. One subprocess; compiling is most of its time."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from flax import nnx

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
  bad = _run(tmp_path / "bad", "--config.study=all")
  assert "--config.study: expected '' or 'ablations', got 'all'" in bad.stderr
  bad = _run(tmp_path / "bad", "--config.corpus=wiki")
  assert "--config.corpus: expected one of stdlib, python_reference" in bad.stderr
