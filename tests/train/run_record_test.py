"""The run record: a fresh run writes what it is; resume, init_from and sampling rebuild it from there.

One short run with its own ``tokenizer.json``, in a workdir holding the leftovers of a run killed
before its first checkpoint, serves every test here.
"""

import hashlib
import json
import os
import pathlib
import shutil

import pytest

from experiments.configs import default
from jaxrec import data, models
from jaxrec.train import (
  ConfigError,
  config_checks,
  loop,
  metrics,
  restore_model,
  run_record,
  sample_text,
)

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "moe_checkpoint" / "run"

LEFTOVERS = {
  "metrics.jsonl": b'{"step": 1, "split": "train", "loss": 99.0}\n{"step": 50, "split": "train"}\n',
  "loss.png": b"the dead run's plot",
  "sample.txt": b"the dead run's sample",
  "run.json": b'{"format": 1, "config": {}}',
  "checkpoints/5.orbax-checkpoint-tmp-1/state/x": b"half a save",
}
MODEL = {"d_model": 16, "num_heads": 2, "num_layers": 1, "mixer_pattern": "attention"}


def _tokenizer_json(path):
  """A word-level tokenizer.json with the usual special tokens."""
  hf = pytest.importorskip("tokenizers")
  tok = hf.Tokenizer(hf.models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  trainer = hf.trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
  tok.train_from_iterator(["def return import class self if else for in while ( ) : ="], trainer)
  tok.save(str(path))


def _config(tokenizer: str):
  config = default.get_config()
  for name, value in MODEL.items():
    config.model[name] = value
  config.data.tokenizer = tokenizer
  config.data.seq_len = 16
  config.batch_size = 8
  config.mesh.data = 1
  config.steps = 2
  config.optim.warmup_steps = 1
  config.log_every = 1
  config.eval_batches = 1
  config.sample.max_new_tokens = 4
  config.progress = False
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, tokenizer.json path): a 2-step run trained with its own tokenizer."""
  tokenizer = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  _tokenizer_json(tokenizer)
  workdir = tmp_path_factory.mktemp("run")
  for name, content in LEFTOVERS.items():
    os.makedirs(os.path.dirname(workdir / name), exist_ok=True)
    (workdir / name).write_bytes(content)
  loop.train_and_evaluate(_config(str(tokenizer)), str(workdir))
  return workdir, tokenizer


def _record(workdir):
  with open(workdir / run_record.RECORD_FILE, encoding="utf-8") as f:
    return json.load(f)


def test_a_fresh_run_moves_a_dead_runs_files_aside_and_starts_anew(run):
  workdir, _ = run
  (stale,) = [p for p in workdir.iterdir() if p.name.startswith("stale-")]
  for name, content in LEFTOVERS.items():
    assert (stale / name).read_bytes() == content, name
  records = metrics.read_metrics(str(workdir))
  assert sorted(records["train"]) == [1, 2]
  assert all(r["loss"] < 10 for r in records["train"].values())
  assert (workdir / "sample.txt").read_bytes() != LEFTOVERS["sample.txt"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


def test_the_record_holds_the_resolved_model_and_a_copy_of_the_tokenizer(run):
  workdir, tokenizer = run
  record = _record(workdir)
  vocab_size = data.load_tokenizer(str(tokenizer)).vocab_size
  fields = {**MODEL, "mixer_pattern": ("attention",)}
  want = models.get_preset("micro-hybrid", vocab_size=vocab_size, **fields)
  assert record["format"] == 2 and models.LMConfig.from_dict(record["model"]) == want
  # The options of the mixers it uses and of the MoE feed-forward, each in its group.
  assert record["model"]["attention"] == {"window": None} and "gla" not in record["model"]
  assert record["model"]["moe"]["top_k"] == 2
  assert record["parameters"] == models.param_count(want)
  assert (workdir / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
  assert record["tokenizer"] == {
    "spec": str(tokenizer),
    "file": "tokenizer.json",
    "sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
  }
  assert record["data"] == {"train": "stdlib", "validation": "stdlib", "seq_len": 16}
  assert record["config"]["steps"] == 2
  assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]


def test_sampling_needs_neither_the_model_nor_the_tokenizer_flags(run, tmp_path):
  workdir, tokenizer = run
  moved = tmp_path / "elsewhere.json"
  os.replace(tokenizer, moved)  # the run must not depend on the original file
  try:
    model, tok, config = restore_model(default.get_config(), str(workdir), given=set())
  finally:
    os.replace(moved, tokenizer)
  assert tok.vocab_size == _record(workdir)["model"]["vocab_size"]
  assert config.sample.max_new_tokens == 4  # the run's own sampling settings
  # The run sampled with the same settings and seed right after training.
  assert sample_text(model, tok, config.sample) == (workdir / "sample.txt").read_text()


def test_resume_lists_every_given_flag_that_disagrees(run):
  workdir, _ = run
  config = default.get_config()
  config.resume = True
  config.steps = 5
  config.model.num_layers = 2
  config.data.tokenizer = "byte"
  config.optim.learning_rate = 1e-4
  given = {"resume", "steps", "model.num_layers", "data.tokenizer", "optim.learning_rate"}
  with pytest.raises(ConfigError) as error:
    run_record.resolve(config, str(workdir), given)
  lines = str(error.value).splitlines()
  assert lines[0].startswith(f"--config.resume takes the run from {workdir}/run.json")
  assert sorted(lines[1:]) == sorted(
    [
      "  --config.model.num_layers: recorded 1, given 2",
      f"  --config.data.tokenizer: recorded {str(run[1])!r}, given 'byte'",
      "  --config.optim.learning_rate: recorded 0.003, given 0.0001",
    ]
  )


def test_resume_takes_the_recorded_config_and_the_changes_it_allows(run):
  workdir, tokenizer = run
  config = default.get_config()
  config.resume = True
  config.steps = 5
  config.eval_every = 1
  config.data.tokenizer = str(tokenizer)  # the same file: agrees
  out = run_record.resolve(
    config, str(workdir), {"resume", "steps", "eval_every", "data.tokenizer"}
  )
  assert (out.steps, out.eval_every, out.resume) == (5, 1, True)
  assert (out.batch_size, out.data.seq_len, out.optim.warmup_steps) == (8, 16, 1)  # recorded
  assert out.data.tokenizer == str(workdir / "tokenizer.json")
  assert out.model.mixer_pattern == "attention" and out.model.d_model == 16


def test_the_launch_fields_are_the_commands_never_the_records(run, tmp_path):
  """A run started on two hosts resumes (or samples) on one: ``multihost`` and ``distributed``
  describe how this process starts, so they are never taken from the record."""
  workdir, _ = run
  moved = tmp_path / "two_hosts"
  shutil.copytree(workdir, moved)
  record = _record(moved)
  record["config"]["multihost"] = True
  record["config"]["distributed"] |= {"num_processes": 2, "process_id": 1}
  (moved / run_record.RECORD_FILE).write_text(json.dumps(record))
  for purpose, given in (("train", {"resume"}), ("sample", set())):
    config = default.get_config()
    config.resume = purpose == "train"
    out = run_record.resolve(config, str(moved), given, purpose=purpose)
    assert out.multihost is False and out.distributed.num_processes is None, purpose
    assert out.batch_size == 8  # the rest is the record's
  config = default.get_config()
  config.resume, config.multihost, config.distributed.num_processes = True, True, 4
  out = run_record.resolve(config, str(moved), {"resume", "multihost", "distributed.num_processes"})
  assert out.multihost is True and out.distributed.num_processes == 4


@pytest.mark.parametrize("pattern", ["attention", "('attention',)", "attention,attention"])
def test_a_list_flag_agrees_with_the_record_in_either_spelling(run, tmp_path, pattern):
  """The pattern as a comma-separated list or a quoted tuple (the spelling before lists were
  comma-separated) agrees with the record's list; a record of that time, which holds the
  experiment config's lists as JSON lists, still resumes."""
  workdir, _ = run
  old = tmp_path / "old"
  old.mkdir()
  record = _record(workdir)
  record["config"]["model"]["mixer_pattern"] = ["attention"]
  (old / run_record.RECORD_FILE).write_text(json.dumps(record))
  config = default.get_config()
  config.resume = True
  config.model.mixer_pattern = pattern
  given = {"resume", "model.mixer_pattern"}
  if pattern == "attention,attention":
    with pytest.raises(ConfigError, match=r"--config\.model\.mixer_pattern: recorded"):
      run_record.resolve(config, str(old), given)
  else:
    assert run_record.resolve(config, str(old), given).model.mixer_pattern == "attention"


def _flat_record(workdir):
  """The record of ``workdir`` as jaxrec wrote it before the model's options were grouped
  (format 1): its model section and its config's in the flat names of a real record of that
  time (``tests/fixtures/moe_checkpoint``), with this run's model and some options changed."""
  record = _record(workdir)
  old = json.loads((FIXTURE / "run.json").read_text())
  shared = {k: v for k, v in record["model"].items() if not isinstance(v, dict)}
  changed = {"window": 8, "gla_chunk_size": 16, "pararnn_heads": 1, "based_feature_dim": 4}
  record["model"] = {**old["model"], **shared, **changed, "moe_top_k": 1}
  given = {k: v for k, v in record["config"]["model"].items() if k in MODEL}
  record["config"]["model"] = {**old["config"]["model"], **given, "preset": "micro-hybrid"}
  record["format"] = 1
  assert len(record["model"]) == 53 and "gla_chunk_size" in record["config"]["model"]
  return record


def test_a_record_written_before_the_options_were_grouped_resumes(run, tmp_path):
  """Its flat names (``gla_chunk_size``, ``window``, ``moe_top_k``) are read as their groups'
  options; a given flag is compared with them; the resumed run trains on and rewrites the
  record in the grouped form."""
  workdir, tokenizer = run
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  (old / run_record.RECORD_FILE).write_text(json.dumps(_flat_record(workdir)))

  config = default.get_config()
  config.resume = True
  config.steps = 3
  out = run_record.resolve(config, str(old), {"resume", "steps"})
  vocab_size = data.load_tokenizer(str(tokenizer)).vocab_size
  want = models.get_preset(
    "micro-hybrid",
    vocab_size=vocab_size,
    **{**MODEL, "mixer_pattern": ("attention",)},
    attention={"window": 8},
    gla={"chunk_size": 16},
    paragru={"heads": 1},
    paralstm={"heads": 1},
    based={"feature_dim": 4},
    pla={"feature_dim": 4},
    moe={"num_experts": 4, "top_k": 1, "router": "gru", "router_dim": 8, "hidden": 8},
  )
  assert out.model.attention.window == 8 and out.model.gla.chunk_size == 16
  assert config_checks.model_config(out, vocab_size) == want

  config.model.gla.chunk_size = 32  # --config.model.gla.chunk_size=32
  with pytest.raises(ConfigError, match=r"--config\.model\.gla\.chunk_size: recorded 16, given 32"):
    run_record.resolve(config, str(old), {"resume", "steps", "model.gla.chunk_size"})

  config.model.gla.chunk_size = None
  result = loop.train_and_evaluate(config, str(old), given={"resume", "steps"})
  assert result["step"] == 3
  record = _record(old)
  assert record["format"] == 2 and record["history"][-1]["event"] == "resume"
  assert record["model"]["attention"] == {"window": 8} and "window" not in record["model"]
  assert models.LMConfig.from_dict(record["model"]) == want


def test_init_from_takes_model_and_tokenizer_and_nothing_else(run):
  workdir, _ = run
  config = default.get_config()
  config.init_from = str(workdir)
  config.optim.schedule = "wsd"
  out = run_record.resolve(config, "unused", {"init_from", "optim.schedule"})
  assert out.model.d_model == 16 and out.model.num_layers == 1
  assert out.data.tokenizer == str(workdir / "tokenizer.json")
  assert (out.steps, out.batch_size, out.data.seq_len) == (600, 16, 128)  # the new run's own
  assert out.optim.schedule == "wsd"
  config.model.d_model = 32
  with pytest.raises(ConfigError, match=r"--config.model.d_model: recorded 16, given 32"):
    run_record.resolve(config, "unused", {"init_from", "model.d_model"})


def test_a_run_without_record_is_built_from_the_flags(tmp_path):
  config = default.get_config()
  config.resume = True
  assert run_record.resolve(config, str(tmp_path), {"resume"}) is config
