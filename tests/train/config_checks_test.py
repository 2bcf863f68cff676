"""Config validation: every error names the flag to fix."""

import dataclasses

import pytest

from experiments.configs import default
from jaxrec import models
from jaxrec.train import config_checks, loop

ConfigError = config_checks.ConfigError


def _config(**fields):
  config = default.get_config()
  for dotted, value in fields.items():
    *parents, name = dotted.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def test_default_config_is_valid():
  config_checks.validate_config(default.get_config(), num_devices=8, num_processes=1)
  cfg = config_checks.model_config(default.get_config(), vocab_size=259)
  assert cfg.mixer_pattern == ("gla", "gla", "attention")
  assert (cfg.num_layers, cfg.d_model, cfg.vocab_size) == (3, 128, 259)
  assert round(models.param_count(cfg) / 1e6, 1) == 0.7  # the README's default job


@pytest.mark.parametrize("name, millions", [("small-hybrid", 10.29), ("1b", 1178.57)])
def test_a_preset_is_taken_whole(name, millions):
  cfg = config_checks.model_config(_config(model__preset=name), vocab_size=259)
  assert cfg == models.get_preset(name, vocab_size=259)
  assert (
    round(models.param_count(cfg) / 1e6, 2) == millions
  )  # counted abstractly, nothing allocated


def test_a_model_field_given_replaces_the_presets():
  config = _config(model__preset="small-hybrid", model__num_layers=4)
  config.model.mixer_pattern = "gla,attention"  # --config.model.mixer_pattern=gla,attention
  cfg = config_checks.model_config(config, vocab_size=259)
  preset = models.get_preset("small-hybrid", vocab_size=259)
  assert cfg == dataclasses.replace(preset, num_layers=4, mixer_pattern=("gla", "attention"))


def test_a_models_section_reads_back_to_its_config():
  cfg = models.get_preset(
    "small-hybrid",
    vocab_size=259,
    mixer_pattern=("gla", "attention"),
    gla={"chunk_size": 32},
    attention={"window": 16},
    ffn="moe",
    moe={"top_k": 1, "capacity_factor": 2.0},
  )
  config = default.get_config()
  config.model.update(config_checks.model_section(cfg))
  assert config.model.mixer_pattern == "gla,attention" and config.model.dtype == "float32"
  assert config.model.gla.chunk_size == 32 and config.model.moe.top_k == 1
  assert config_checks.model_config(config, vocab_size=259) == cfg


def test_every_model_field_and_option_has_a_flag():
  fields = {f.name for f in dataclasses.fields(models.LMConfig)} - {"vocab_size", "mixer_options"}
  section = default.get_config().model
  assert set(section) == fields | set(models.mixer_names()) | {"preset"}
  assert set(section.moe) == {f.name for f in dataclasses.fields(models.MoEOptions)}
  for name in models.mixer_names():
    options = {f.name for f in dataclasses.fields(models.get_mixer(name).options)}
    assert set(section[name]) == options, name


def test_an_option_given_replaces_that_option_of_the_presets():
  """``--config.model.rat.chunk_size=4`` on ``tiny-rat-swa``: RAT's other options and the
  preset's attention window stay."""
  config = _config(model__preset="tiny-rat-swa", model__rat__chunk_size=4)
  cfg = config_checks.model_config(config, vocab_size=259)
  preset = models.get_preset("tiny-rat-swa", vocab_size=259)
  assert cfg.options("rat") == dataclasses.replace(preset.options("rat"), chunk_size=4)
  assert cfg.options("attention").window == 128
  assert cfg == preset.replace(rat={"chunk_size": 4})


@pytest.mark.parametrize(
  "fields, message",
  [
    (
      {"model__mixer_pattern": "gla,lstm"},
      r"--config.model.mixer_pattern: unknown mixer 'lstm'",
    ),
    ({"model__preset": "huge"}, r"--config.model.preset: expected one of"),
    ({"model__num_kv_heads": 3}, r"--config.model.num_kv_heads: .*divisor of num_heads"),
    ({"model__gla__chunk_size": 0}, r"^--config\.model\.gla\.chunk_size: gla\.chunk_size: exp"),
    ({"model__gla__expand_v": 0.01}, r"^--config\.model\.gla\.expand_v: .* num_heads=4"),
    ({"model__moe__top_k": 9}, r"^--config\.model\.moe\.top_k: .* at most num_experts=8"),
    ({"mesh__fsdp": 3}, r"--config.mesh.fsdp: expected a size dividing the 8 devices, got 3"),
    ({"mesh__tensor": -1}, r"--config.mesh.data, --config.mesh.tensor: at most one"),
    ({"mesh__data": 4, "mesh__fsdp": 4}, r"--config.mesh.data=4, --config.mesh.fsdp=4, .* got 16"),
    (
      {"batch_size": 12},
      r"--config.batch_size: expected a multiple of the batch shards .* = 8, got 12",
    ),
    (
      {"batch_size": 16, "grad_accum_steps": 3},
      r"--config.grad_accum_steps: expected a divisor .* = 2",
    ),
    ({"steps": 0}, r"--config.steps: expected a positive integer, got 0"),
    ({"optim__schedule": "step"}, r"--config.optim.schedule: expected one of \('cosine', 'wsd'\)"),
    ({"optim__warmup_steps": 700}, r"--config.optim.warmup_steps: .* --config.steps=600"),
    ({"optim__warmup_steps": 600}, r"--config.optim.warmup_steps: .*expected < --config.steps=600"),
    ({"optim__schedule": "wsd", "optim__decay_shape": "exp"}, r"--config.optim.decay_shape"),
    ({"data__seq_len": 0}, r"--config.data.seq_len: expected a positive integer"),
  ],
)
def test_errors_name_the_flag(fields, message):
  with pytest.raises(ConfigError, match=message):
    config_checks.validate_config(_config(**fields), num_devices=8, num_processes=1)


def test_batch_must_split_over_processes():
  config = _config(batch_size=8, mesh__data=1)
  with pytest.raises(
    ConfigError, match=r"--config.batch_size: expected a multiple of the 3 processes"
  ):
    config_checks.validate_config(config, num_devices=8, num_processes=3)


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"mesh__fsdp": 3}, r"--config\.mesh\.fsdp: "),
    (
      {"data__train": "missing/*.txt"},
      r"--config\.data\.train: pattern 'missing/\*\.txt' matches no",
    ),
    ({"data__validation": "missing.jsonl"}, r"--config\.data\.validation: no such file 'missing"),
    ({"data__tokenizer": "missing/tokenizer.json"}, r"--config\.data\.tokenizer: expected 'byte'"),
  ],
)
def test_train_and_evaluate_validates_before_touching_the_workdir(tmp_path, fields, message):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=message):
    loop.train_and_evaluate(_config(**fields), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize(
  "value, item, want",
  [
    ("gla,attention", str, ("gla", "attention")),  # the dialect: comma-separated
    (" gla , attention ", str, ("gla", "attention")),
    ("gla", str, ("gla",)),
    ("('gla', 'attention')", str, ("gla", "attention")),  # a quoted Python tuple, as before
    ("['gla']", str, ("gla",)),
    (("gla", "attention"), str, ("gla", "attention")),  # given in Python, or a record's list
    ("128,256", int, (128, 256)),
    ("(128, 256)", int, (128, 256)),
    ("(128)", int, (128,)),
    ([1, 2], int, (1, 2)),
    (64, int, (64,)),
    ("1e-3,0.5", float, (1e-3, 0.5)),
  ],
)
def test_a_list_field_is_read_in_every_spelling(value, item, want):
  got = config_checks.parse_list(value, "--config.x", item)
  assert got == want and all(type(x) is item for x in got)


@pytest.mark.parametrize(
  "value, item", [("", str), ("a,,b", str), ("()", str), ("1,x", int), ("(1.5,)", int), (True, int)]
)
def test_a_bad_list_names_its_flag(value, item):
  with pytest.raises(ConfigError, match=r"^--config.x: expected comma-separated .* got "):
    config_checks.parse_list(value, "--config.x", item)


def test_int_pairs_are_read_with_their_separator():
  assert config_checks.parse_int_pairs("4x12, 12x4", "--config.x") == ((4, 12), (12, 4))
  assert config_checks.parse_int_pairs("4-8,9-12", "--config.x", "-") == ((4, 8), (9, 12))


@pytest.mark.parametrize("value", ["4x", "4x12x3", "4-12", "ax4", ""])
def test_a_bad_pair_names_its_flag_and_shows_an_example(value):
  with pytest.raises(ConfigError, match=r"^--config.x: expected .*got "):
    config_checks.parse_int_pairs(value, "--config.x", "x", "32x4,128x16")
