"""``experiments/long_context.py`` from its flags to its outputs at a tiny size: a two-step model,
every policy scored on perplexity, passkey and multiple choice, then the tables, the JSON, the plot
and the RESULTS.md section (the default run takes ~14 minutes).

The launcher writes ``results/long_context.{json,png}`` and ``RESULTS.md`` in its working
directory, so it runs in a fresh one: the repository's copies must stay as they are.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
POLICIES = ["vanilla", "lm_infinite", "recycled", "longheads", "think"]
TINY = [
  # The model: two steps of a 2-layer attention LM at 32 bytes per row.
  "--config.model_run.steps=2",
  "--config.model_run.batch_size=2",
  "--config.model_run.data.seq_len=32",
  "--config.model_run.model.d_model=16",
  "--config.model_run.model.num_layers=2",
  "--config.model_run.model.num_heads=2",
  "--config.model_run.optim.warmup_steps=1",
  "--config.model_run.eval_batches=1",
  "--config.model_run.sample.max_new_tokens=4",
  # One length per evaluation, beyond the training length; passkey prompts need 256 bytes.
  "--config.lengths=64",
  "--config.ppl_sequences=1",
  "--config.passkey.lengths=256",
  "--config.passkey.samples=1",
  "--config.passkey.digits=1",
  "--config.choice.questions=1",
  "--config.choice.prefix=8",
  "--config.choice.option_lengths=2,3",
  # The policies scaled to the 32-byte training context.
  "--config.lm_infinite.global_tokens=2",
  "--config.lm_infinite.window=16",
  "--config.lm_infinite.distance_cap=16",
  "--config.recycled.k=8",
  "--config.recycled.stride=4",
  "--config.longheads.chunk_size=8",
  "--config.longheads.chunks_per_head=3",
  "--config.think.observation=8",
]


def _stamps() -> dict[str, int | None]:
  """Modification times of the repository's outputs of this launcher (``None``: absent)."""
  paths = ["RESULTS.md", "results/long_context.json", "results/long_context.png"]
  return {p: (REPO / p).stat().st_mtime_ns if (REPO / p).exists() else None for p in paths}


def test_a_tiny_evaluation_writes_its_tables_numbers_plot_and_section(tmp_path):
  before = _stamps()
  workdir = tmp_path / "longctx"
  argv = [sys.executable, "-m", "experiments.long_context", f"--workdir={workdir}", *TINY]
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert _stamps() == before

  results = json.loads((tmp_path / "results" / "long_context.json").read_text())
  assert results == json.loads((workdir / "long_context.json").read_text())
  assert results["train_length"] == 32
  assert list(results["perplexity"]) == list(results["passkey"]) == POLICIES
  for name in POLICIES:
    assert 0 < results["perplexity"][name]["64"] < 10, results["perplexity"]
    passkey = results["passkey"][name]["256"]
    assert 0 <= passkey["exact"] <= passkey["digits"] <= 1, passkey
  # Set-Based Prompting sees the options as a set: the same pick in every order.
  assert results["choice"]["set_based"]["order_sensitive"] == 0.0, results["choice"]
  assert 0 <= results["choice"]["vanilla"]["order_sensitive"] <= 1

  assert (tmp_path / "results" / "long_context.png").stat().st_size > 0
  text = (tmp_path / "RESULTS.md").read_text()
  assert text.startswith("# Results\n\n## Long-context inference: LM-Infinite, Recycled")
  for table in ("| method | 64 |", "| method | 256 |", "| method | order-sensitive questions |"):
    assert table in text and table in done.stdout
  for name in POLICIES:
    assert f"| {name} | {results['perplexity'][name]['64']:.3f} |" in text
  assert "python -m experiments.long_context --workdir=" in text
