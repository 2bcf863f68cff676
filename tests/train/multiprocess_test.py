"""A real multi-process run on one machine: two processes of four CPU devices each, joined by
``jax.distributed.initialize`` on localhost (gloo collectives), train the default model over one
8-device mesh through the launcher, checkpoint, and resume; every loss equals that of one
process with all eight devices."""

import os
import socket
import subprocess
import sys

import numpy as np

from jaxrec.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The default model's mixers, narrow and one layer each. A constant learning rate after warmup
# (WSD without cooldown), so a 2-step run resumed to 4 steps follows the same schedule as a
# straight 4-step run.
FLAGS = [
  "--config.model.d_model=32",
  "--config.model.num_layers=2",
  "--config.model.mixer_pattern=('gla','attention')",
  "--config.model.num_heads=2",
  "--config.model.gla.chunk_size=8",
  "--config.data.seq_len=32",
  "--config.batch_size=16",
  "--config.optim.schedule=wsd",
  "--config.optim.warmup_steps=1",
  "--config.optim.decay_steps=0",
  "--config.log_every=1",
  "--config.eval_every=0",
  "--config.eval_batches=1",
  "--config.checkpoint_every=2",
  "--config.sample.max_new_tokens=0",
  "--config.progress=False",
]
TIMEOUT = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(workdir, steps, *, processes, resume=False):
  """Runs ``python -m experiments.train`` as ``processes`` processes sharing 8 CPU devices."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES=str(8 // processes),
    # Compiling is most of the time; the resumed run reuses the first run's compilations from
    # the test run's persistent cache (tests/conftest.py).
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )
  command = [
    sys.executable,
    "-m",
    "experiments.train",
    f"--workdir={workdir}",
    f"--config.steps={steps}",
    f"--config.resume={resume}",
    *FLAGS,
  ]
  if processes > 1:
    port = _free_port()
    command += [
      "--config.multihost=True",
      f"--config.distributed.coordinator_address=localhost:{port}",
      f"--config.distributed.num_processes={processes}",
    ]
  runs = [
    subprocess.Popen(
      command + ([f"--config.distributed.process_id={i}"] if processes > 1 else []),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    outputs = [run.communicate(timeout=TIMEOUT)[0] for run in runs]
  finally:
    for run in runs:
      run.kill()
  for i, (run, out) in enumerate(zip(runs, outputs)):
    assert run.returncode == 0, f"process {i} of {processes} failed:\n{out[-4000:]}"
  return outputs


def _losses(workdir):
  records = metrics.read_metrics(str(workdir))
  return {s: r["loss"] for s, r in records["train"].items()}, records["validation"]


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  outputs = _train(multi, 4, processes=2)
  assert "process 1 of 2" in outputs[1]
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
  _train(multi, 8, processes=2, resume=True)
  _train(single, 8, processes=1)

  got, got_validation = _losses(multi)
  want, want_validation = _losses(single)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=2e-6, err_msg=f"step {step}")
  assert len({round(v, 5) for v in want.values()}) == 8  # the losses do change step to step
  np.testing.assert_allclose(got_validation[8]["loss"], want_validation[8]["loss"], rtol=2e-6)
