"""The launchers as a user runs them: the README's Train → Resume → Continue → Sample commands,
exactly as written but with small step counts and a tiny model, then the errors a user can cause.

The commands run as subprocesses in a fresh folder (the README's relative ``runs/...`` paths) on
one CPU device, sharing the test run's persistent XLA cache (``tests/conftest.py``): compiling is
most of their time.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments.configs import default
from jaxrec import models
from jaxrec.train import ConfigError, metrics, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_STEPS, RESUME_STEPS = 6, 9
# "Every field can be overridden by a flag" (README): a tiny version of the Train command's model,
# evaluated and checkpointed every 3 steps.
TINY = [
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.num_layers=3",
  "--config.model.gla.chunk_size=8",
  "--config.data.seq_len=32",
  "--config.batch_size=8",
  "--config.optim.learning_rate=0.01",
  "--config.optim.warmup_steps=2",
  "--config.log_every=1",
  "--config.eval_every=3",
  "--config.eval_batches=2",
  "--config.checkpoint_every=3",
  "--config.sample.max_new_tokens=8",
]


def readme_command(title: str) -> list[str]:
  """The argv of the bash block that follows the README paragraph starting ``**{title}``."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  match = re.search(rf"\*\*{re.escape(title)}.*?```bash\n(.*?)```", text, re.DOTALL)
  assert match, f"README: no command under **{title}"
  argv = shlex.split(match.group(1).replace("\\\n", " "))
  assert argv[:2] == ["python", "-m"], argv
  return [sys.executable, *argv[1:]]


def with_steps(argv: list[str], steps: int) -> list[str]:
  """``argv`` with its ``--config.steps`` set to ``steps`` (appended when absent)."""
  kept = [a for a in argv if not a.startswith("--config.steps=")]
  return [*kept, f"--config.steps={steps}"]


def _env() -> dict[str, str]:
  return {
    **os.environ,
    "PYTHONPATH": REPO,
    "JAX_PLATFORMS": "cpu",
    "JAX_NUM_CPU_DEVICES": "1",
  }


def _run(argv, cwd, env) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
  """The README's four commands run in order in a fresh folder: (folder, {title: result}, env)."""
  clone = tmp_path_factory.mktemp("clone")
  env = _env()
  commands = {
    "Train": [*with_steps(readme_command("Train"), TRAIN_STEPS), *TINY],
    "Resume": with_steps(readme_command("Resume"), RESUME_STEPS),
    # Its own defaults, shortened: 5 steps (warmup + the wsd cooldown, a fifth, must fit), a
    # short evaluation and sample.
    "Continue": [
      *with_steps(readme_command("Continue pretraining"), 5),
      "--config.optim.warmup_steps=1",
      "--config.eval_batches=2",
      "--config.sample.max_new_tokens=8",
    ],
    "Sample": readme_command("Sample"),
  }
  results = {}
  for title, argv in commands.items():
    results[title] = _run(argv, clone, env)
  return clone, results, env


def _ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "Event loop is closed" not in result.stderr


def _record(workdir):
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    return json.load(f)


def test_readme_train_records_the_whole_preset_and_logs_its_size(readme):
  clone, results, _ = readme
  _ok(results["Train"])
  record = _record(clone / "runs/hybrid")
  want = models.get_preset(
    "small-hybrid",
    vocab_size=259,
    d_model=32,
    num_heads=2,
    num_layers=3,
    gla={"chunk_size": 8},
    mixer_pattern=("gla", "gla", "attention"),
  )
  assert models.LMConfig.from_dict(record["model"]) == want
  assert record["model"]["gla"]["chunk_size"] == 8  # the options resolved, in their group
  assert record["model"]["max_seq_len"] == 1024  # small-hybrid's, not the default preset's 512
  n = models.param_count(want)
  assert record["parameters"] == n
  assert f"{n / 1e6:.2f}M parameters" in results["Train"].stderr

  records = metrics.read_metrics(str(clone / "runs/hybrid"))
  assert sorted(records["validation"]) == [3, 6, 9]  # Train's 3 and 6, then Resume's 9
  losses = [records["train"][s]["loss"] for s in range(1, TRAIN_STEPS + 1)]
  assert losses[-1] < losses[0] - 0.5, losses
  assert "validation bits per byte" in results["Train"].stdout


def test_readme_resume_needs_no_model_flags_and_continues_the_run(readme):
  clone, results, _ = readme
  _ok(results["Resume"])
  assert f"resumed from step {TRAIN_STEPS}" in results["Resume"].stderr
  workdir = clone / "runs/hybrid"
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(TRAIN_STEPS), str(RESUME_STEPS)]
  assert sorted(metrics.read_metrics(str(workdir))["train"]) == list(range(1, RESUME_STEPS + 1))
  resume = _record(workdir)["history"][-1]
  assert resume["event"] == "resume" and resume["step"] == TRAIN_STEPS
  assert resume["changed"]["steps"] == [TRAIN_STEPS, RESUME_STEPS]


def test_readme_continue_takes_the_model_from_the_source_run(readme):
  clone, results, _ = readme
  _ok(results["Continue"])
  assert f"parameters from runs/hybrid (step {RESUME_STEPS})" in results["Continue"].stderr
  source, continued = _record(clone / "runs/hybrid"), _record(clone / "runs/continued")
  assert continued["model"] == source["model"]
  assert continued["config"]["optim"]["schedule"] == "wsd"
  assert continued["config"]["data"]["seq_len"] == 128  # its own data settings: the default


def test_readme_sample_needs_no_model_flags(readme):
  _, results, _ = readme
  _ok(results["Sample"])
  assert results["Sample"].stdout.startswith("class ")
  assert len(results["Sample"].stdout) > len("class ")


def _copy_run(readme, tmp_path):
  clone, results, _ = readme
  _ok(results["Resume"])
  workdir = tmp_path / "run"
  shutil.copytree(clone / "runs/hybrid", workdir)
  return workdir


def _snapshot(root):
  """{relative path: (size, modification time)} of every file under ``root``."""
  return {
    str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in root.rglob("*")
    if p.is_file()
  }


@pytest.mark.parametrize("steps", [4, RESUME_STEPS])
def test_resume_to_a_step_at_or_below_the_checkpoint_is_refused_and_writes_nothing(
  readme, tmp_path, steps
):
  workdir = _copy_run(readme, tmp_path)
  before = _snapshot(workdir)
  config = default.get_config()
  config.steps = steps
  config.resume = True
  with pytest.raises(
    ConfigError, match=rf"--config.steps: .* at step {RESUME_STEPS} .* got {steps}"
  ):
    train_and_evaluate(config, str(workdir), given={"steps", "resume"})
  assert _snapshot(workdir) == before


def test_flags_that_disagree_with_the_record_are_listed_in_a_few_lines(readme, tmp_path):
  workdir = _copy_run(readme, tmp_path)
  before = _snapshot(workdir)
  argv = [
    *readme_command("Resume"),
    "--config.model.d_model=64",
    "--config.data.seq_len=64",
    "--config.eval_every=2",  # may change on resume: not listed
  ]
  argv[argv.index("--workdir") + 1] = str(workdir)
  result = _run(argv, tmp_path, readme[2])
  assert result.returncode != 0
  lines = _messages(result.stderr)
  assert lines[0].startswith(f"error: --config.resume takes the run from {workdir}/run.json")
  assert lines[1:] == [
    "  --config.data.seq_len: recorded 32, given 64",
    "  --config.model.d_model: recorded 32, given 64",
  ]
  assert _snapshot(workdir) == before


@pytest.mark.parametrize(
  "flag, message",
  [
    (
      "--config.stpes=10",
      'error: --config.stpes: no such field in the config. Did you mean "steps"',
    ),
    (
      "--config.model.nm_layers=3",
      'error: --config.model.nm_layers: no such field in the config. Did you mean "num_layers"',
    ),
    ("--config.mesh.fsdp=3", "error: --config.mesh.fsdp: expected a size dividing the 8 devices"),
  ],
)
def test_user_errors_are_one_line_naming_the_flag(tmp_path, flag, message):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_NUM_CPU_DEVICES": "8"}
  argv = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}", flag]
  result = _run(argv, tmp_path, env)
  assert result.returncode != 0
  lines = _messages(result.stderr)
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr
  assert not (tmp_path / "run").exists()
  assert "Unable to initialize backend" not in result.stderr  # no TPU probe noise on a CPU


def test_help_lists_the_config_fields_and_print_config_resolves_them(tmp_path):
  env = _env()
  shown = _run([sys.executable, "-m", "experiments.train", "--help"], tmp_path, env)
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert "--workdir: Directory for checkpoints" in shown.stdout
  # Every field with its default, and the config file's comment on it.
  for field, value in _fields(default.get_config()):
    assert f"--config.{field}={value!r}" in shown.stdout, field
  assert "--config.checkpoint_every=200\n      0: only the final checkpoint" in shown.stdout

  argv = [sys.executable, "-m", "experiments.train", "--print_config", "--config.steps=7"]
  printed = _run([*argv, "--config.model.preset=small-hybrid"], tmp_path, env)
  assert printed.returncode == 0, printed.stderr[-2000:]
  assert re.search(r"^steps: 7$", printed.stdout, re.M)
  assert re.search(r"^  preset: small-hybrid$", printed.stdout, re.M)
  assert os.listdir(tmp_path) == []  # nothing trained, nothing written


def _fields(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _messages(stderr: str) -> list[str]:
  """stderr without absl's log lines (``I1130 00:00:00.000 ...``)."""
  return [line for line in stderr.splitlines() if not re.match(r"[IWE]\d{4} ", line)]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_it_and_the_run_resumes_from_there(
  tmp_path, signal_number
):
  workdir = tmp_path / "run"
  argv = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *TINY]
  argv += ["--config.steps=500", "--config.checkpoint_every=1000", "--config.eval_every=0"]
  proc = subprocess.Popen(
    argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  rows = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while not (rows.exists() and len(rows.read_text().splitlines()) >= 2):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  proc.send_signal(signal_number)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal_number, stderr[-2000:]
  assert "Traceback" not in stderr
  name = signal.Signals(signal_number).name
  (line,) = [m for m in _messages(stderr) if m.startswith(f"{name}: stopped after step")]
  step = int(re.match(rf"{name}: stopped after step (\d+), saved in ", line).group(1))
  assert line.endswith(f"continue with --workdir={workdir} --config.resume=True")
  assert 2 <= step < 500 and os.listdir(workdir / "checkpoints") == [str(step)]

  resume = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}"]
  _ok(_run([*resume, "--config.resume=True", f"--config.steps={step + 2}"], tmp_path, _env()))
  records = [json.loads(x) for x in rows.read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)), keys  # no step recorded twice
  assert sorted(s for s, split in keys if split == "train") == list(range(1, step + 3))
