"""The launcher ``python -m experiments.train``: flags in, a trained model, metrics and a sample out."""

import os
import subprocess
import sys

import pytest
from absl import flags

from experiments import train as launcher
from jaxrec.train import metrics, restore_model, sample_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
  "--config.model.d_model=32",
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.model.mixer_pattern=('gla','attention')",
  "--config.model.gla_chunk_size=8",
  "--config.data.seq_len=32",
  "--config.batch_size=8",
  "--config.mesh.data=1",
]


@pytest.fixture
def parsed_flags(monkeypatch):
  """Parses argv as the launcher's command line (config_flags reads overrides from sys.argv)."""

  def parse(argv):
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)

  yield parse
  flags.FLAGS.unparse_flags()


def test_launcher_trains_checkpoints_and_samples(tmp_path, parsed_flags, capsys):
  argv = [
    "train",
    f"--config={os.path.join(REPO, 'experiments', 'configs', 'default.py')}",
    f"--workdir={tmp_path}",
    *TINY,
    "--config.steps=30",
    "--config.optim.learning_rate=0.01",
    "--config.optim.warmup_steps=5",
    "--config.log_every=5",
    "--config.eval_every=15",
    "--config.eval_batches=2",
    "--config.checkpoint_every=15",
    "--config.sample.max_new_tokens=8",
    "--config.progress=False",
  ]
  parsed_flags(argv)
  launcher.main(argv[:1])

  records = metrics.read_metrics(str(tmp_path))
  train = [records["train"][s]["loss"] for s in sorted(records["train"])]
  assert len(train) == 6
  assert train[-1] < train[0] - 1.0, train  # the loss falls
  assert all(r["tokens_per_s"] > 0 for r in records["train"].values())
  validation = records["validation"]
  assert sorted(validation) == [15, 30]
  assert validation[30]["bits_per_byte"] < 7.0  # uniform over 259 ids is log2(259) = 8.02
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["15", "30"]
  assert (tmp_path / "loss.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "validation bits per byte" in out
  sample = (tmp_path / "sample.txt").read_text()
  assert f"sample:\ndef {sample}" in out

  # experiments/sample.py's path: the restored checkpoint samples the same text with the same seed.
  model, tokenizer = restore_model(launcher._CONFIG.value, str(tmp_path))
  assert sample_text(model, tokenizer, launcher._CONFIG.value.sample) == sample


def test_bad_flag_is_named_on_the_command_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      f"--workdir={tmp_path / 'run'}",
      "--config.mesh.fsdp=3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "--config.mesh.fsdp: expected a size dividing the 8 devices, got 3" in result.stderr
  assert not (tmp_path / "run").exists()
