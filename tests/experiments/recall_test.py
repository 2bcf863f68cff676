"""``experiments/recall.py``: a user error names its flag, and the verdict on the papers' claims
follows its stated criteria on runs made up here (the sweep itself is too long for the tests)."""

import os
import subprocess
import sys

from experiments import _recall_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unknown_mixer_names_the_flag(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, "-m", "experiments.recall", "--config.mixers=attention,lstm"]
  result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "--config.mixers: unknown ['lstm']" in result.stderr
  assert "'swa'" in result.stderr and "'pla'" in result.stderr  # the registry plus swa
  assert not (tmp_path / "RESULTS.md").exists()


def _sets(family, variant, width, short_first, long_first):
  scores = {"4x12": {"accuracy": short_first}, "12x4": {"accuracy": long_first}}
  return {"family": family, "variant": variant, "d_model": width, "scores": scores}


def _mqar(variant, width, accuracy):
  scores = {"repeats=1": {"accuracy": accuracy}, "repeats=2": {"accuracy": accuracy}}
  return {"family": "mqar", "variant": variant, "d_model": width, "scores": scores}


def test_verdict_follows_its_criteria():
  runs = [
    _sets("sets", "based", 32, 0.9, 0.5),  # gap 0.4 at the small width
    _sets("sets", "based", 64, 0.9, 0.8),  # gap 0.1 at the large width
    _sets("sets_jrt", "based", 32, 0.9, 0.85),  # JRT: gap 0.05, 7/8 of it closed
    _sets("sets_jrt", "based", 64, 0.9, 0.9),
    _sets("sets", "pla", 32, 0.9, 0.88),
    _sets("sets", "pla", 64, 0.9, 0.9),
    _mqar("attention", 32, 0.95),
    _mqar("attention", 64, 0.99),
    _mqar("based", 32, 0.4),
  ]
  lines = _recall_report.verdict(runs).splitlines()
  assert "(a) larger set first is harder" in lines[0] and ": reproduces" in lines[0]
  assert "+0.400 at width 32, +0.100 at width 64" in lines[0]
  assert "JRT-Prompt closes most" in lines[1] and "reproduces" in lines[1]
  assert "mean fraction closed 0.94" in lines[1]  # (1 - 0.05/0.4 + 1 - 0/0.1) / 2
  assert "prefix linear attention has no order gap: reproduces" in lines[2]
  assert "(c) attention solves the MQAR settings: reproduces" in lines[3]
  # Reversed orders: claim (a) does not reproduce.
  flipped = [_sets("sets", "based", w, 0.5, 0.9) for w in (32, 64)]
  assert ": does not reproduce" in _recall_report.verdict(flipped).splitlines()[0]
