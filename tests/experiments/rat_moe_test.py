"""``experiments/rat_moe.py`` at tiny sizes: every part trains, is scored and lands in the JSON, the
plot and the report in ``out_dir`` and, published, in a checkout's ``results/`` and ``RESULTS.md``;
a part rerun alone keeps the others; the orderings the section
states are read off the numbers; settings a user can get wrong name their flag."""

import json

import pytest

from experiments import _rat_moe_report, rat_moe
from experiments.configs import rat_moe as rat_moe_config
from jaxrec.train import ConfigError

COMMAND = "python -m experiments.rat_moe --tiny"


def _tiny(tmp_path):
  config = rat_moe_config.get_config()
  config.out_dir = str(tmp_path / "out")
  config.progress = False
  for part in ("lm", "mqar", "moe"):
    c = config[part]
    c.d_model, c.num_heads, c.num_layers = 16, 2, 1
    c.batch_size, c.steps, c.warmup_steps = 2, 2, 1
  # One model per part (compiling is most of the time); the MoE seeds share their compilation.
  config.lm.seq_len, config.lm.chunk_sizes, config.lm.eval_batches = 8, "4", 1
  config.mqar.vocab_size, config.mqar.seq_len, config.mqar.num_pairs = 16, 16, 2
  config.mqar.chunk_sizes, config.mqar.test_examples = "16", 4
  config.mqar.num_layers = 2  # BaseConv, then RAT (Zoology's MQAR layout)
  # Two layers, so the GRU router's state passes between layers.
  config.moe.num_layers, config.moe.seq_len, config.moe.eval_batches = 2, 8, 1
  config.moe.routers, config.moe.seeds = "gru", "0,1"
  config.moe.num_experts, config.moe.expert_hidden, config.moe.router_dim = 4, 16, 8
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("rat_moe")
  config = _tiny(tmp_path)
  return tmp_path, config, rat_moe.run_experiments(config, COMMAND, str(tmp_path / "checkout"))


def test_every_part_is_trained_scored_and_reported(tiny):
  tmp_path, _, results = tiny
  assert [(r["chunk_size"], r["label"]) for r in results["lm"]["runs"]] == [(4, "RAT (L=4)")]
  assert [(r["router"], r["seed"]) for r in results["moe"]["runs"]] == [("gru", 0), ("gru", 1)]
  for run in results["lm"]["runs"] + results["moe"]["runs"]:
    assert 0 < run["val_bits_per_byte"] < 10 and run["step_ms"] > 0
    assert [s for s, _ in run["curve"]] == [2]
  # The seeds give different models and data; the routers report their statistics.
  moe = results["moe"]["runs"]
  assert moe[0]["val_bits_per_byte"] != moe[1]["val_bits_per_byte"]
  assert all(0 <= r["moe/dropped"] < 1 and r["moe/entropy"] > 0 for r in moe)
  # Dropless by default; the routers' statistics at initialisation are recorded beside.
  assert all(r["moe/dropped"] == 0 and r["init/moe/entropy"] > 0 for r in moe)
  (mqar,) = results["mqar"]["runs"]
  assert 0 <= mqar["accuracy"] <= 1 and mqar["label"] == "RNN (L=T=16)"

  saved = json.loads((tmp_path / "out" / "rat_moe.json").read_text())
  assert saved["lm"]["runs"] == json.loads(json.dumps(results["lm"]["runs"]))
  assert (tmp_path / "out" / "rat_moe.png").stat().st_size > 0
  for name in ("rat_moe.json", "rat_moe.png"):
    published = tmp_path / "checkout" / "results" / name
    assert published.read_bytes() == (tmp_path / "out" / name).read_bytes()
  for report, prefix in (("out", ""), ("checkout", "results/")):
    text = (tmp_path / report / "RESULTS.md").read_text()
    assert text.count(COMMAND) == 3
    for title in ("### Byte-level LM", "### MQAR recall", "### MoE LM"):
      assert title in text
    assert "| RAT (L=4) | " in text and "| RNN (L=T=16) | " in text and "| RMoE (GRU) | " in text
    assert "2 layers alternating BaseConv and RAT (Zoology's MQAR layout" in text
    assert "statistics of the initial parameters" in text and "dropless" in text
    assert f"]({prefix}rat_moe.png)" in text and f"`{prefix}rat_moe.json`" in text


def test_a_part_rerun_alone_keeps_the_others(tiny):
  tmp_path, _, results = tiny
  lm = {**results["lm"], "command": "python -m experiments.rat_moe --config.experiments=lm"}
  lm["runs"] = [{**r, "val_bits_per_byte": r["val_bits_per_byte"] + 1} for r in lm["runs"]]
  # Rerun into a fresh out_dir: the other parts come from the published JSON.
  _rat_moe_report.write({"lm": lm}, str(tmp_path / "out_lm"), str(tmp_path / "checkout"))
  saved = json.loads((tmp_path / "checkout" / "results" / "rat_moe.json").read_text())
  assert saved["lm"]["command"] == lm["command"]
  assert saved["moe"] == json.loads(json.dumps(results["moe"]))
  text = (tmp_path / "checkout" / "RESULTS.md").read_text()
  assert text.count(_rat_moe_report.SECTION) == 1
  assert text.count(COMMAND) == 2 and lm["command"] in text


def _lm_run(chunk_size, bits):
  return {
    "chunk_size": chunk_size,
    "label": str(chunk_size),
    "params": 1,
    "step_ms": 1.0,
    "val_bits_per_byte": bits,
  }


def test_the_stated_orderings_follow_the_numbers():
  settings = {
    "num_layers": 1,
    "d_model": 8,
    "num_heads": 1,
    "steps": 1,
    "batch_size": 1,
    "seq_len": 16,
    "learning_rate": 1.0,
    "eval_batches": 1,
    "seed": 0,
  }
  smooth = [_lm_run(1, 2.0), _lm_run(16, 2.03), _lm_run(4, 2.01)]
  text = _rat_moe_report._lm(smooth, settings)
  assert "rise monotonically" in text and "RAT(16) is +1.5% from attention" in text
  assert "do not rise" in _rat_moe_report._lm([_lm_run(1, 2.0), _lm_run(4, 1.9)], settings)
  # Two seeds per L: means and sample stds; a step between neighbouring L inside twice the
  # largest std is called unresolved.
  seeded = [
    {**_lm_run(size, bits + delta), "seed": seed}
    for size, bits in ((1, 2.0), (4, 2.005), (16, 2.1))
    for seed, delta in ((0, -0.01), (1, 0.01))
  ]
  text = _rat_moe_report._lm(seeded, settings | {"seeds": "0,1"})
  assert "| 4 | 1 | 2.0050 ± 0.0141 |" in text and "seeds 0,1 (mean ± sample std)" in text
  assert "1 of the 2 steps between neighbouring L are within twice the largest seed std" in text

  def mqar(*accuracies):
    return [
      {**_lm_run(size, 0.0), "accuracy": a, "exact_match": 0.0}
      for size, a in zip((1, 4, 16), accuracies, strict=True)
    ]

  settings |= {"num_pairs": 2, "vocab_size": 16, "test_examples": 4}
  text = _rat_moe_report._mqar(mqar(0.9, 0.8, 0.1), settings)
  assert "Mean recall falls monotonically" in text and "Not testable" not in text
  text = _rat_moe_report._mqar(mqar(0.1, 0.9, 0.2), settings)
  assert "does not fall" in text and "Not testable here: attention (L=1) did not learn" in text
  text = _rat_moe_report._mqar(mqar(0.9, 0.95, 0.95), settings)
  assert "Not testable" not in text and "capacity argument" not in text
  seeded = [
    {**run, "seed": seed, "accuracy": run["accuracy"] + delta}
    for run in mqar(0.98, 0.94, 0.12)
    for seed, delta in ((0, -0.03), (1, 0.03))
  ]
  text = _rat_moe_report._mqar(seeded, settings | {"seeds": "0,1"})
  assert "falls monotonically" in text
  assert "1 of the 2 steps between neighbouring L are within twice the largest seed std" in text
  assert "not resolved by 2 seeds (1 → 4)." in text  # the labels of L=1 and L=4

  stats = {  # router: (bits, IB, OB, dropped)
    "linear": (2.0, 3.0, 0.9, 0.05),
    "gru": (1.9, 2.0, 0.6, 0.2),
    "gru_detached": (2.1, 2.5, 0.7, 0.1),
  }
  moe = [
    {
      "router": router,
      "seed": seed,
      "val_bits_per_byte": bits + 0.01 * seed,
      "step_ms": 1.0,
      "moe/top_ratio": ib,
      "moe/selected_weight": ob,
      "moe/dropped": dropped,
    }
    for router, (bits, ib, ob, dropped) in stats.items()
    for seed in (0, 1)
  ]
  settings |= {"num_experts": 4, "expert_hidden": 8, "top_k": 2, "router_dim": 4}
  text = _rat_moe_report._moe(moe, settings)
  assert "RMoE (GRU) < SMoE (linear) < GRU, h detached (the paper" in text
  assert (
    # Two seeds 0.01 apart: a sample std of 0.01 / sqrt(2).
    "gain over SMoE is +0.1000 bits per byte against a seed spread (std) of up to 0.0071" in text
  )
  assert "gates are flatter than SMoE's: IB 2.00 vs 3.00, OB 0.600 vs 0.900" in text
  assert "every router still drops 5%-20% of" in text
  moe = [{**r, "moe/top_ratio": 9.0} if r["router"] == "gru" else r for r in moe]
  assert "gates are not flatter" in _rat_moe_report._moe(moe, settings)
  # IB 9 and 1 over the GRU's two seeds (std 5.7): the difference from 3.0 is not resolved.
  moe = [{**r, "moe/top_ratio": 9.0 - 8 * r["seed"]} if r["router"] == "gru" else r for r in moe]
  assert "not resolved as flatter than SMoE's" in _rat_moe_report._moe(moe, settings)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("out_dir", "", r"--config.out_dir: expected the folder for rat_moe.json"),
    ("experiments", "lm,rnn", r"--config.experiments: expected names of .* got \['rnn'\]"),
    ("lm.chunk_sizes", "1,256", r"--config.lm.chunk_sizes: expected chunk lengths in \[1, "),
    ("mqar.warmup_steps", 10_000, r"--config.mqar.warmup_steps: expected at most"),
    ("moe.top_k", 9, r"--config.moe.top_k: moe\.top_k: expected at most num_experts=8"),
    ("lm.num_heads", 3, r"--config.lm.num_heads: num_heads: RAT needs a divisor of d_model"),
    ("moe.num_heads", 3, r"--config.moe: head_dim: expected an even attention head width"),
    ("moe.capacity_factor", "lots", r"--config.moe.capacity_factor: expected 'none' \(dropless"),
    ("moe.capacity_factor", "0", r"--config.moe.capacity_factor: expected 'none' \(dropless"),
    ("mqar.num_layers", 3, r"--config.mqar.num_layers: expected an even number with "),
  ],
)
def test_bad_settings_name_their_flag(tmp_path, field, value, message):
  config = rat_moe_config.get_config()
  config.out_dir = str(tmp_path)
  config.progress = False
  part, _, name = field.rpartition(".")
  (config[part] if part else config)[name] = value
  with pytest.raises(ConfigError, match=message):
    rat_moe.run_experiments(config, COMMAND)
  assert not list(tmp_path.iterdir())


def test_moe_capacity_factor_none_is_the_dropless_dispatch():
  section = rat_moe_config.get_config().moe
  assert section.capacity_factor == "none"  # the default: RMoE's reference drops nothing
  cfg = rat_moe._moe_config(section, "gru", vocab_size=259)
  assert (cfg.moe.dispatch, cfg.moe.capacity_factor) == ("sorted", None)
  section.capacity_factor = "1.5"  # --config.moe.capacity_factor=1.5
  cfg = rat_moe._moe_config(section, "gru", vocab_size=259)
  assert (cfg.moe.dispatch, cfg.moe.capacity_factor) == ("capacity", 1.5)
