"""``experiments/long_context.py`` at a tiny size: a random Llama (trained context 384) with a BPE
tokenizer written as a Hugging Face directory, both parts from their flags to their outputs.

The passkey prompts have exactly the asked length with the needle where asked; the NLL a part
reports equals ``loglikelihood`` of the same window computed here, outside the launcher (vanilla,
one call; a policy, through its own scoring); the cache sizes follow the policies' budgets; the
tables, JSON, plot and report are written under the workdir, and into a checkout's ``results/``
and ``RESULTS.md`` only with ``--publish`` (the repository's copies stay as they are).
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from testing_utils import lm_logits_atol, save_chat_llama

from experiments import long_context as lc
from experiments.configs import long_context as lc_config
from jaxrec.inference import loglikelihood, longctx
from jaxrec.models import load_pretrained

pytest.importorskip("gguf")

REPO = pathlib.Path(__file__).resolve().parents[2]
CONTEXT = 384
# Both parts scaled to a 384-token context (a passkey prompt needs about 300 of this small
# tokenizer's tokens).
TINY = {
  "beyond": [
    "--config.beyond.passkey_lengths=384,448",
    "--config.beyond.depths=0.0,1.0",
    "--config.beyond.nll_length=448",
    "--config.beyond.nll_windows=2",
    "--config.beyond.nll_bin=128",
    "--config.beyond.lm_infinite.global_tokens=2",
    "--config.beyond.lm_infinite.top_k=2",
    "--config.beyond.lm_infinite.top_k_from_layer=1",
    "--config.beyond.lm_infinite.top_k_insert_at=64",
    "--config.beyond.longheads.chunk_size=16",
    "--config.beyond.longheads.chunks_per_head=4",
  ],
  "within": [
    "--config.within.lengths=320,384",
    "--config.within.depths=0.5",
    "--config.within.nll_windows=2",
    "--config.within.nll_scored=16",
    "--config.within.budget=64",
    "--config.within.sink_tokens=2",
    "--config.within.recycled.stride=4",
    "--config.within.think.observation=4",
    "--config.within.snapkv_kernel=3",
  ],
}
COMMON = [
  "--config.passkey.digits=2",
  "--config.passkey.new_tokens=4",
  "--config.prefill_chunk=128",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny-llama")
  _, tokenizer = save_chat_llama(folder, max_seq_len=CONTEXT)
  return folder, tokenizer


def _run(part, checkpoint, tmp_path, publish):
  folder, _ = checkpoint
  paths = ["RESULTS.md", f"results/long_context_{part}.json", f"results/long_context_{part}.png"]
  stamp = lambda: {p: (REPO / p).stat().st_mtime_ns if (REPO / p).exists() else None for p in paths}
  before = stamp()
  work, checkout = tmp_path / "work", tmp_path / "checkout"
  argv = [sys.executable, "-m", "experiments.long_context", f"--workdir={work}"]
  argv += [f"--config.part={part}", f"--config.model={folder}", *COMMON, *TINY[part]]
  argv += [f"--publish={checkout}"] if publish else []
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert stamp() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "work"][not publish :]
  stem = f"long_context_{part}"
  results = json.loads((work / f"{stem}.json").read_text())
  assert (work / f"{stem}.png").stat().st_size > 0
  reports = [(work, "")] + [(checkout, "results/")] * publish
  for report, prefix in reports:
    text = (report / "RESULTS.md").read_text()
    assert f"## {lc.SECTIONS[part]}" in text and "**Verdict: " in text
    assert lc._sample_size(results) in text and "**Sample size.** Each passkey figure" in text
    assert "python -m experiments.long_context --workdir=" in text
    assert f"]({prefix}{stem}.png)" in text and f"`{prefix}{stem}.json`" in text
    assert lc.tables(results) in text and lc.tables(results) in done.stdout
  if publish:
    for ext in ("json", "png"):
      published = (checkout / "results" / f"{stem}.{ext}").read_bytes()
      assert published == (work / f"{stem}.{ext}").read_bytes()
  return results


def test_passkey_prompts_have_the_asked_length_and_the_needle_at_its_depth(checkpoint):
  _, tokenizer = checkpoint
  needle = tokenizer.encode(lc.NEEDLE.format(key="42"))
  for length in (520, 641):
    places = []
    for depth in (0.0, 0.5, 1.0):
      ids = lc.passkey_prompt(tokenizer, length, "42", depth)
      assert len(ids) == length
      text = tokenizer.decode(ids)
      assert text.startswith(lc.PREAMBLE) and text.endswith(lc.QUESTION)
      assert text.count("The pass key is 42.") == 1
      places.append(next(i for i in range(length) if ids[i : i + len(needle)] == needle))
    assert places[0] == len(tokenizer.encode(lc.PREAMBLE)) and places[0] < places[1] < places[2]
  with pytest.raises(Exception, match="lengths: a passkey prompt needs at least"):
    lc.passkey_prompt(tokenizer, 200, "42", 0.5)


def test_beyond_runs_and_its_numbers_are_the_models(checkpoint, tmp_path):
  results = _run("beyond", checkpoint, tmp_path, publish=True)
  assert list(results["methods"]) == ["vanilla", "lm_infinite", "longheads"]
  assert results["context"] == CONTEXT
  folder, tokenizer = checkpoint
  model = load_pretrained(folder)
  config = lc_config.get_config()
  # The same windows, scored here: vanilla in one call, LM-Infinite's Λ-mask in one pass.
  windows = lc.text_windows(tokenizer, 2, 449, config.seed + 1)
  policy = longctx.lm_infinite(2, CONTEXT, CONTEXT, top_k=2, top_k_from_layer=1, top_k_insert_at=64)
  for name, m in (("vanilla", model), ("lm_infinite", longctx.apply(model, policy))):
    with warnings.catch_warnings():  # vanilla past its context, as the launcher measures it
      warnings.filterwarnings("ignore", message=".*trained context.*")
      nll = -np.asarray(loglikelihood(m, windows, prefill_chunk=None))
    want = [nll[:, s : s + 128].mean() for s in (0, 128, 256, 384)]
    # A log-softmax moves by at most twice its logits' error; the launcher read in chunks.
    atol = 2 * lm_logits_atol(model(windows[:, :-1])[0], model.cfg, windows.shape[1])
    np.testing.assert_allclose(results["nll"][name]["bins"], want, rtol=0, atol=atol)
    np.testing.assert_allclose(results["nll"][name]["past"], nll[:, CONTEXT:].mean(), atol=atol)
  for name, r in results["passkey"].items():
    assert set(r) == {"384", "448"}, name
    for v in r.values():
      assert 0 <= v["exact"] <= v["digits"] <= 1 and v["decode_ms"] > 0
      assert [a["depth"] for a in v["answers"]] == [0.0, 1.0]
  # LM-Infinite keeps its global tokens, a window of the context and (top-k) every key.
  kv = results["full_kv_bytes"]
  assert results["cache_bytes"]["vanilla"] == kv
  assert kv["448"] > kv["384"]


def test_within_runs_and_its_numbers_are_the_models(checkpoint, tmp_path):
  results = _run("within", checkpoint, tmp_path, publish=False)
  assert list(results["methods"]) == [
    "vanilla",
    "sink_window",
    "recycled",
    "recycled_dynamic",
    "think",
    "think_snapkv",
    "snapkv",
  ]
  folder, tokenizer = checkpoint
  model = load_pretrained(folder)
  windows = lc.text_windows(tokenizer, 2, 385, lc_config.get_config().seed + 1)
  # Vanilla's decoding equals one parallel pass; the scored tokens are each window's last 16.
  for n in (320, 384):
    w = windows[:, -(n + 1) :]
    nll = -np.asarray(loglikelihood(model, w, prefill_chunk=None))
    atol = 2 * lm_logits_atol(model(w[:, :-1])[0], model.cfg, n)
    np.testing.assert_allclose(
      results["nll"]["vanilla"][str(n)]["windows"], nll[:, -16:].mean(1), rtol=0, atol=atol
    )
  # Recycled Attention decodes its first step after the prefill in full, then from its cache:
  # its numbers are its own, not vanilla's.
  assert results["nll"]["recycled"]["384"]["mean"] != results["nll"]["vanilla"]["384"]["mean"]
  sizes, kv = results["cache_bytes"], results["full_kv_bytes"]
  # The sink + window cache and SnapKV keep the budget of 64 keys whatever the length; ThinK
  # alone keeps every token with 40% fewer key channels; Recycled keeps the full cache (for its
  # full steps) and the recycled cache's indices.
  assert sizes["sink_window"]["320"] == sizes["sink_window"]["384"] < kv["320"] / 2
  assert sizes["snapkv"]["320"] == sizes["snapkv"]["384"] < kv["320"] / 2
  for n in ("320", "384"):
    assert 0.75 * kv[n] < sizes["think"][n] < 0.85 * kv[n]
    assert 0.95 * kv[n] < sizes["recycled"][n] < 1.05 * kv[n]


def test_help_lists_the_workdir_the_publish_flag_and_the_config(tmp_path):
  argv = [sys.executable, "-m", "experiments.long_context", "--help"]
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  shown = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert "--workdir: Directory for the results." in shown.stdout
  assert "--publish: A jaxrec checkout whose results/ files and RESULTS.md" in shown.stdout
  assert "--config.part=" in shown.stdout
  assert not list(tmp_path.iterdir())
