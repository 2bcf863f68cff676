"""``experiments/pararnn_lm.py`` from its flags to its outputs at a tiny size: a ParaRNN LM and an
attention LM are trained, the ParaRNN layers' Newton iterations and both models' throughput are
measured, and the JSON, the plot and the report land in the workdir, and with ``--publish`` in
the checkout's ``results/`` and ``RESULTS.md`` too (the default run takes ~15 minutes). One subprocess: the launcher defines its absl flags at import."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
  "--mixers=paragru,attention",
  "--steps=2",
  "--batch_size=4",
  "--seq_len=16",
  "--d_model=16",
  "--num_layers=2",  # the second ParaRNN layer solves on the first block's output
  "--num_heads=2",
  "--warmup_steps=1",
  "--eval_every=2",
  "--eval_batches=1",
  "--throughput_steps=1",
  "--max_param_gap=1",  # the tiny sizes are not balanced; the default sizes are (see the launcher)
]


def test_a_tiny_comparison_writes_its_numbers_plot_and_section(tmp_path):
  out, checkout = tmp_path / "runs", tmp_path / "checkout"
  argv = [
    sys.executable,
    "-m",
    "experiments.pararnn_lm",
    *TINY,
    f"--workdir={out}",
    f"--publish={checkout}",
  ]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  saved = json.loads((out / "pararnn_lm.json").read_text())
  results = saved["results"]
  assert list(results) == ["paragru", "attention"]
  for r in results.values():
    assert 0 < r["val_bits_per_byte"] < 10 and r["train_tokens_per_s"] > 0, r
    assert r["curves"]["validation"]["steps"] == [2]
    assert r["curves"]["train"]["steps"] == [2]  # log_every (10) and the last step
  # From a zero guess Newton needs at least one iteration, and it stops at the option
  # paragru.max_iters (10); the attention model has no Newton numbers at all.
  gru = results["paragru"]
  for stage in ("init", "trained"):
    assert 1 <= gru[f"newton_iterations_{stage}"] <= 10, gru
    assert 0 <= gru[f"fallback_fraction_{stage}"] <= 1, gru
  assert not any(k.startswith("newton") for k in results["attention"])

  assert (out / "pararnn_lm.png").stat().st_size > 0
  # The report in the workdir links its neighbours; the published one, the copies in results/.
  for folder, prefix in ((out, ""), (checkout, "results/")):
    text = (folder / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\n## ParaRNN LMs vs GLA and attention\n")
    newton = f"{gru['newton_iterations_init']:.2f} → {gru['newton_iterations_trained']:.2f}"
    assert f"| paragru | {gru['params']:,} | " in text and f" | {newton} | " in text
    assert f"]({prefix}pararnn_lm.png)" in text and f"`{prefix}pararnn_lm.json`" in text
    assert "python -m experiments.pararnn_lm --mixers=paragru,attention" in text
  for name in ("pararnn_lm.json", "pararnn_lm.png"):
    assert (checkout / "results" / name).read_bytes() == (out / name).read_bytes()
  assert "| attention |" in done.stdout  # the table is printed too
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "runs"]  # nothing in the cwd
