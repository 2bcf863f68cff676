"""The project as installed (``pip install -e .``): launchers run from any directory, and
``import jaxrec`` gives every subpackage on attribute access."""

import os
import subprocess
import sys


def _env_without_checkout():
  """The environment with nothing pointing at the checkout: the installed package must do."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}


def test_subpackages_load_on_attribute_access(tmp_path):
  code = (
    "import jaxrec, sys\n"
    "assert 'jaxrec.models' not in sys.modules\n"
    "print(jaxrec.models.load_pretrained.__name__, jaxrec.train.Trainer.__name__)\n"
    "try:\n"
    "  jaxrec.nonexistent\n"
    "except AttributeError as e:\n"
    "  print(e)\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=tmp_path,
    env=_env_without_checkout(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines() == [
    "load_pretrained Trainer",
    "module 'jaxrec' has no attribute 'nonexistent'",
  ]


def test_a_launcher_runs_from_another_directory(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "experiments.sample", "--helpshort"],
    cwd=tmp_path,
    env=_env_without_checkout(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "No module named" not in done.stderr, done.stderr[-2000:]
  assert "--workdir" in done.stdout, done.stderr[-2000:]
