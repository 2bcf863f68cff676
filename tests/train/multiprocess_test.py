"""A real multi-process run on one machine: two processes of four CPU devices each, joined by
``jax.distributed.initialize`` on localhost (gloo collectives), train the default model over one
8-device mesh through the launcher, checkpoint, and resume, against one process with all eight
devices. What the README promises is checked over a run long enough for rounding differences to
grow: the same batches at every step (``batch_checksum``, exact), the same first step (same
initial parameters and data, up to the order of float32 sums across devices), a resume by the
same number of processes, and a clear error from a resume by another number."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

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


def _train_records(workdir):
  return metrics.read_metrics(str(workdir))["train"]


def _assert_same_step(got, want, step):
  # One step's loss and gradient norm: fp32 sums over 16 x 32 tokens and ~10^4 parameters added
  # in another order; rtol 2e-6 is ~16 float32 ulps, while one different row or parameter moves
  # them by more than 1e-3.
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-6, err_msg=f"step {step} {key}")


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
  steps = 24
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  outputs = _train(multi, 4, processes=2)
  assert "process 1 of 2" in outputs[1]
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
  _train(multi, steps, processes=2, resume=True)
  _train(single, steps, processes=1)

  got, want = _train_records(multi), _train_records(single)
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  # The same rows in the same order at every step, resumed or not, on either number of hosts.
  assert [got[s]["batch_checksum"] for s in want] == [want[s]["batch_checksum"] for s in want]
  assert len({r["batch_checksum"] for r in want.values()}) == steps
  # The same initial parameters and data: the same first step. (Later steps are not compared:
  # the runs add float32 sums across devices in another order, and training amplifies that.)
  _assert_same_step(got[1], want[1], 1)
  assert len({round(r["loss"], 5) for r in want.values()}) == steps  # the losses do change

  # One process cannot take the two processes' data positions: it says how to resume.
  again = tmp_path / "resumed_by_one"
  shutil.copytree(multi, again)
  with pytest.raises(AssertionError) as failed:
    _train(again, steps + 2, processes=1, resume=True)
  assert f"checkpoint {again}/checkpoints/{steps}: written by 2 processes, resumed by 1" in str(
    failed.value
  )
  assert "--config.distributed.num_processes=2" in str(failed.value)
