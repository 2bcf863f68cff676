"""train_and_evaluate: an interrupted and resumed run equals an uninterrupted one."""

import glob
import logging
import os
import pathlib
import struct

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import default
from jaxrec.train import ConfigError, loop, metrics

STEPS = 4


def tiny_config():
  """The default config shrunk to compile and run in seconds on one CPU device."""
  config = default.get_config()
  config.model.d_model = 32
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mixer_pattern = "gla,attention"
  config.model.gla.chunk_size = 8
  config.data.seq_len = 32
  config.batch_size = 4
  config.mesh.data = 1
  config.steps = STEPS
  config.optim.warmup_steps = 1
  config.log_every = 1
  config.eval_every = 0
  config.eval_batches = 1
  config.checkpoint_every = 2
  config.sample.max_new_tokens = 0
  config.progress = False
  return config


class _Preempted(Exception):
  pass


def _raw_state(workdir, step):
  """The saved train state as plain arrays, read without any jaxrec code."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state


def _train_losses(workdir):
  return {s: r["loss"] for s, r in metrics.read_metrics(workdir)["train"].items()}


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch, caplog):
  straight = tmp_path / "straight"
  config = tiny_config()
  config.profile_steps = 1
  result = loop.train_and_evaluate(config, str(straight))
  assert result["step"] == STEPS
  _check_tensorboard_and_profile(straight)

  # Interrupt the second run right after step 2, whose checkpoint is then on disk.
  interrupted = tmp_path / "interrupted"
  calls = []

  def preempt(self, steps=1):
    calls.append(steps)
    if len(calls) == 2:
      raise _Preempted

  with monkeypatch.context() as patch:
    patch.setattr(metrics.MetricsWriter, "advance", preempt)
    with pytest.raises(_Preempted):
      loop.train_and_evaluate(tiny_config(), str(interrupted))
  assert sorted(os.listdir(interrupted / "checkpoints")) == ["2"]

  config = tiny_config()
  config.resume = True
  resumed = loop.train_and_evaluate(config, str(interrupted))

  want = _train_losses(straight)
  got = _train_losses(interrupted)
  assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
  for step in want:  # different batches after the resume would give different losses
    np.testing.assert_allclose(got[step], want[step], rtol=1e-6, err_msg=f"step {step}")
  # ... and the data are the same rows in the same order, to the bit.
  checksums = [
    {s: r["batch_checksum"] for s, r in metrics.read_metrics(str(w))["train"].items()}
    for w in (straight, interrupted)
  ]
  assert checksums[0] == checksums[1] and len(set(checksums[0].values())) == STEPS
  assert len({round(v, 6) for v in want.values()}) == STEPS
  np.testing.assert_allclose(resumed["loss"], result["loss"], rtol=1e-6)

  final_straight = _raw_state(straight, STEPS)
  final_resumed = _raw_state(interrupted, STEPS)
  flat_straight = _flatten(final_straight)
  flat_resumed = _flatten(final_resumed)
  assert flat_straight.keys() == flat_resumed.keys()
  for key, value in flat_straight.items():
    np.testing.assert_allclose(flat_resumed[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  assert int(flat_resumed["step"]) == STEPS

  # Training the finished run further stretches its cosine schedule (the learning rate rises
  # again): the run says so. A constant schedule would not change, and would not warn.
  further = tiny_config()
  further.resume, further.steps = True, STEPS + 2
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(further, str(straight))
  (warning,) = [r.getMessage() for r in caplog.records if "stretches" in r.getMessage()]
  assert f"--config.steps={STEPS + 2} stretches the cosine schedule" in warning
  assert f"over {STEPS} steps: the learning rate at step {STEPS} rises" in warning


def _check_tensorboard_and_profile(workdir):
  """The TensorBoard event files hold every metrics.jsonl value as a scalar, the config and the
  sample as text; the profiler traced a step."""
  from tensorboardX.proto import event_pb2

  scalars, texts = {}, {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    data = pathlib.Path(path).read_bytes()
    at = 0
    while at < len(data):  # TFRecord framing: length, its CRC, the record, its CRC
      (n,) = struct.unpack("<Q", data[at : at + 8])
      event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
      at += 12 + n + 4
      for value in event.summary.value:
        if value.HasField("tensor"):
          texts[value.tag] = value.tensor.string_val[0].decode()
        else:
          scalars[(value.tag, event.step)] = value.simple_value
  records = metrics.read_metrics(str(workdir))
  want = {
    (f"{split}/{name}", step): v
    for split, by_step in records.items()
    for step, record in by_step.items()
    for name, v in record.items()
    if name not in ("step", "split")
  }
  assert scalars.keys() == want.keys() and ("train/loss", STEPS) in want
  for key, value in want.items():
    np.testing.assert_allclose(scalars[key], value, rtol=1e-6, err_msg=str(key))
  assert '"steps": 4' in texts["config/text_summary"]
  assert texts["sample/text_summary"].startswith(tiny_config().sample.prompt)
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out
  if isinstance(tree, (list, tuple)):
    return _flatten({str(i): v for i, v in enumerate(tree)}, prefix)
  return {} if tree is None else {prefix: np.asarray(tree)}


def test_data_files_that_cannot_fill_a_batch_are_refused(tmp_path):
  """An empty document, or files whose bytes (a bound on their tokens) fall short of one batch
  of 4 x 33 tokens, stop the run before any training, naming the flag and the numbers."""
  (tmp_path / "empty.txt").write_text("  \n")
  (tmp_path / "a.txt").write_text("x" * 60)
  (tmp_path / "b.txt").write_text("y" * 67)  # 60 + 67 bytes + 2 x (bos, eos) = 131 < 132
  config = tiny_config()
  config.data.train = str(tmp_path / "*.txt")
  with pytest.raises(ConfigError, match=r"--config.data.train: .*empty.txt' holds no text"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  config.data.train = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
  with pytest.raises(
    ConfigError,
    match=r"--config.data.train: 2 file\(s\) of 2 document\(s\) hold at most 131 tokens, fewer "
    r"than one batch of --config.batch_size x \(--config.data.seq_len \+ 1\) = 132",
  ):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
