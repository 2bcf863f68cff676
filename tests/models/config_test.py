"""``LMConfig``'s option groups: each mixer's options beside its builder, held by the config,
written as nested dicts, and read from the flat names of configs written before the groups."""

import dataclasses
import json
import pathlib

import pytest

from jaxrec.models import (
  AttentionOptions,
  GLAOptions,
  LMConfig,
  MoEOptions,
  ParaRNNOptions,
  RATOptions,
  get_preset,
)
from jaxrec.models.config import FLAT_NAMES, group_flat_names

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "moe_checkpoint"
CFG = LMConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2)


def test_a_mixers_options_default_to_its_registered_ones():
  assert CFG.options("gla") == GLAOptions() and CFG.options("rat") == RATOptions()
  assert CFG.moe == MoEOptions() and CFG.mixer_options == ()
  # Options equal to the defaults are not kept: the same model has the same (hashable) config.
  same = dataclasses.replace(CFG, mixer_options={"gla": GLAOptions(), "rat": {"chunk_size": 16}})
  assert same == CFG and hash(same) == hash(CFG)
  given = dataclasses.replace(CFG, mixer_options={"gla": {"chunk_size": 8}})
  assert given.mixer_options == (("gla", GLAOptions(chunk_size=8)),) and given != CFG


def test_replace_changes_the_options_given_and_keeps_the_others():
  cfg = CFG.replace(gla={"chunk_size": 8}, moe={"top_k": 1}).replace(gla={"gate_rank": 4})
  assert cfg.options("gla") == GLAOptions(chunk_size=8, gate_rank=4)
  assert cfg.moe == MoEOptions(top_k=1)
  assert cfg.replace(gla=GLAOptions(expand_v=2.0)).options("gla") == GLAOptions(expand_v=2.0)
  # A new pattern keeps the options (a model converted to another mixer and back).
  assert dataclasses.replace(cfg, mixer_pattern=("rat",)).options("gla").chunk_size == 8
  assert cfg.replace(num_layers=3).options("gla").gate_rank == 4


def test_options_are_checked_against_the_model_only_for_the_mixers_it_uses():
  """Each group's own checks always run; those against the shared fields (RAT's groups dividing
  the heads) only for a mixer in the pattern."""
  assert CFG.replace(rat={"qk_groups": 3}).options("rat").qk_groups == 3
  with pytest.raises(ValueError, match=r"^rat\.qk_groups: expected a divisor of num_heads=2"):
    CFG.replace(mixer_pattern=("rat",), rat={"qk_groups": 3})
  with pytest.raises(ValueError, match=r"^rat\.chunk_size: expected a positive int, got 0"):
    CFG.replace(rat={"chunk_size": 0})
  with pytest.raises(ValueError, match=r"^paragru\.heads: expected a divisor of d_model=16"):
    CFG.replace(mixer_pattern=("paragru",), num_heads=3)
  # Built directly, an options class names its own field.
  with pytest.raises(ValueError, match=r"^max_iters: expected a positive int, got 0"):
    ParaRNNOptions(max_iters=0)


def test_the_dict_form_reads_back_through_json():
  cfg = get_preset("tiny-rat-swa").replace(
    rat={"chunk_size": 4},
    ffn="moe",
    moe={"capacity_factor": None, "router": "gru"},
    gla={"chunk_size": 8},  # not in the pattern: kept, and written
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64,
    },
  )
  written = cfg.to_dict()
  assert written["attention"] == {"window": 128}
  assert written["rat"] == {"chunk_size": 4, "qk_groups": 2, "position": "inter_rope"}
  assert written["gla"]["chunk_size"] == 8 and "mlstm" not in written
  assert written["moe"]["capacity_factor"] is None and written["moe"]["router"] == "gru"
  assert LMConfig.from_dict(json.loads(json.dumps(written))) == cfg
  with pytest.raises(ValueError, match=r"^lstm: expected an LMConfig field or a registered"):
    LMConfig.from_dict({**written, "lstm": {"chunk_size": 8}})


def test_a_config_written_before_the_options_were_grouped_reads_to_the_same_model():
  """The resolved model of a real run record of that time (format 1, 53 flat fields)."""
  old = json.loads((FIXTURE / "run" / "run.json").read_text())["model"]
  assert len(old) == 53
  want = LMConfig(
    vocab_size=259,
    d_model=16,
    num_layers=2,
    mixer_pattern=("attention",),
    num_heads=2,
    max_seq_len=16,
    ffn="moe",
    moe=MoEOptions(num_experts=4, router="gru", router_dim=8, hidden=8),
  )
  assert LMConfig.from_dict(old) == want


def test_every_flat_name_moves_to_its_group():
  """A value other than the default for each of the 31 flat names, read as the options written
  by hand."""
  flat = {
    "window": 5,
    "gla_expand_k": 1.0,
    "gla_expand_v": 2.0,
    "gla_gate_rank": 3,
    "gla_gate_normalizer": 4.0,
    "gla_chunk_size": 8,
    "pararnn_heads": 4,
    "pararnn_max_iters": 2,
    "liger_variant": "hgrn2",
    "liger_window": 6,
    "liger_gate_source": "projection",
    "liger_chunk_size": 16,
    "based_feature_dim": 4,
    "baseconv_kernel_size": 5,
    "pla_prefix_len": 7,
    "mlstm_qk_dim_factor": 1.0,
    "mlstm_v_dim_factor": 0.5,
    "mlstm_gate_soft_cap": None,
    "mlstm_igate_bias_init": -3.0,
    "mlstm_chunk_size": 16,
    "mlstm_eps": 1e-5,
    "rat_chunk_size": 4,
    "rat_qk_groups": 1,
    "rat_position": "nope",
    "moe_num_experts": 4,
    "moe_top_k": 1,
    "moe_capacity_factor": None,
    "moe_router": "mlp",
    "moe_router_dim": 8,
    "moe_hidden": 32,
    "moe_aux_weight": 0.1,
  }
  assert set(flat) == set(FLAT_NAMES) and len(flat) == 31
  want = {
    "attention": {"window": 5},
    "gla": dict(expand_k=1.0, expand_v=2.0, gate_rank=3, gate_normalizer=4.0, chunk_size=8),
    "paragru": {"heads": 4, "max_iters": 2},
    "paralstm": {"heads": 4, "max_iters": 2},
    "liger": dict(variant="hgrn2", window=6, gate_source="projection", chunk_size=16),
    "based": {"feature_dim": 4},
    "baseconv": {"kernel_size": 5},
    "pla": {"prefix_len": 7, "feature_dim": 4},
    "mlstm": dict(
      qk_dim_factor=1.0,
      v_dim_factor=0.5,
      gate_soft_cap=None,
      igate_bias_init=-3.0,
      chunk_size=16,
      eps=1e-5,
    ),
    "rat": dict(chunk_size=4, qk_groups=1, position="nope"),
    "moe": dict(
      num_experts=4,
      top_k=1,
      capacity_factor=None,
      router="mlp",
      router_dim=8,
      hidden=32,
      aux_weight=0.1,
    ),
  }
  assert group_flat_names({"d_model": 16, **flat}) == {"d_model": 16, **want}
  shared = {k: v for k, v in CFG.to_dict().items() if not isinstance(v, dict)}
  cfg = LMConfig.from_dict({**shared, **flat})
  assert cfg == CFG.replace(**want)
  assert cfg.options("attention") == AttentionOptions(window=5)
  # A group given nested wins over its flat names (a dict in the grouped form passes unchanged).
  assert group_flat_names({"gla_chunk_size": 8, "gla": {"chunk_size": 4}}) == {
    "gla": {"chunk_size": 4}
  }
