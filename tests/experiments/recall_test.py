"""``experiments/recall.py``: a user error names its flag, and the verdict on the papers' claims
follows its stated criteria on runs made up here (the sweep itself is too long for the tests)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from flax import nnx

from experiments import _recall_report
from experiments.configs import recall as recall_config
from jaxrec import inference, models
from jaxrec import train as train_lib
from jaxrec.data import tasks as tasks_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _recall_cli(tmp_path, *flags):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, "-m", "experiments.recall", *flags]
  argv.append(f"--config.out_dir={tmp_path / 'out'}")
  return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_mixer_names_the_flag(tmp_path):
  result = _recall_cli(tmp_path, "--config.mixers=attention,lstm")
  assert result.returncode != 0
  assert "--config.mixers: unknown ['lstm']" in result.stderr
  assert "'swa'" in result.stderr and "'pla'" in result.stderr  # the registry plus swa
  assert not list(tmp_path.iterdir())


def test_a_bad_feed_forward_names_the_flag(tmp_path):
  result = _recall_cli(tmp_path, "--config.ffn=moe")
  assert result.returncode != 0
  assert "--config.ffn: expected 'mlp' or 'none' (the mixers alone), got 'moe'" in result.stderr
  assert not list(tmp_path.iterdir())


def _sets(family, variant, width, short_first, long_first):
  scores = {"4x12": {"accuracy": short_first}, "12x4": {"accuracy": long_first}}
  return {"family": family, "variant": variant, "d_model": width, "scores": scores}


def _mqar(variant, width, accuracy, state_bytes=1000):
  scores = {"repeats=1": {"accuracy": accuracy}, "repeats=2": {"accuracy": accuracy}}
  run = {"family": "mqar", "variant": variant, "d_model": width, "scores": scores}
  return run | {"state_bytes": state_bytes}


def test_verdict_follows_its_criteria():
  runs = [
    _sets("sets", "based", 32, 0.9, 0.5),  # gap 0.4 at the small width
    _sets("sets", "based", 64, 0.9, 0.8),  # gap 0.1 at the large width
    _sets("sets_jrt", "based", 32, 0.9, 0.85),  # JRT: gap 0.05, 7/8 of it closed
    _sets("sets_jrt", "based", 64, 0.9, 0.9),
    _sets("sets", "pla", 32, 0.92, 0.9),
    _sets("sets", "pla", 64, 0.9, 0.9),
    # A window that cannot reach the first set: its gap is a floor, left out of the mean.
    _sets("sets", "swa", 32, 0.9, 0.1),
    _mqar("attention", 32, 0.95, 8000),
    _mqar("attention", 64, 0.99, 16000),
    _mqar("based", 32, 0.4),
    _mqar("based", 64, 0.6, 2000),
  ]
  lines = _recall_report.verdict(runs).splitlines()
  assert "(a) larger set first is harder" in lines[0] and ": reproduces" in lines[0]
  assert "+0.400 at width 32, +0.100 at width 64" in lines[0]
  assert "Left out: swa, whose window cannot reach the first set" in lines[0]
  assert "JRT-Prompt closes most" in lines[1] and "reproduces" in lines[1]
  assert "mean fraction closed 0.94" in lines[1]  # (1 - 0.05/0.4 + 1 - 0/0.1) / 2
  assert "prefix linear attention has no order gap: reproduces" in lines[2]
  assert "(c) attention solves the MQAR settings: reproduces" in lines[3]
  assert (
    "(c) fixed-state mixers trail attention where its cache outgrows their states: " in lines[4]
  )
  assert (
    "reproduces" in lines[4]
    and "width 64: attention +0.390 over the best fixed-state mixer (based) with a cache 8.0x"
    in lines[4]
  )
  assert "(c) fixed-state recall grows with state: reproduces" in lines[5]
  assert "based +0.200" in lines[5]
  # Reversed orders: claim (a) does not reproduce.
  flipped = [_sets("sets", "based", w, 0.5, 0.9) for w in (32, 64)]
  assert ": does not reproduce" in _recall_report.verdict(flipped).splitlines()[0]


def test_mqar_state_claims_need_attention_to_solve_it_and_a_fixed_state_mixer_to_recall():
  floor = [_mqar("attention", 32, 0.95), _mqar("attention", 64, 0.97)]
  floor += [_mqar("gla", 32, 0.05), _mqar("gla", 64, 0.07)]
  text = _recall_report.verdict(floor)
  assert "trail attention where its cache outgrows their states: reproduces" in text
  assert "grows with state: not testable here: no fixed-state mixer reaches 0.25" in text
  close = [_mqar("attention", 32, 0.95), _mqar("attention", 64, 0.97)]
  close += [_mqar("gla", 32, 0.93), _mqar("gla", 64, 0.95)]
  text = _recall_report.verdict(close)
  assert "trail attention where its cache outgrows their states: does not reproduce" in text
  assert "grows with state: does not reproduce" in text  # +0.02 is no gain
  unsolved = [_mqar("attention", 32, 0.5), _mqar("gla", 32, 0.05)]
  text = _recall_report.verdict(unsolved)
  assert "(c) attention solves the MQAR settings: does not reproduce" in text
  assert "trail attention" not in text and "Caveat: the models are undertrained" in text


def test_sets_every_recurrent_model_solves_leave_the_order_claim_untested():
  """The claim is about a first set that outgrows the state: where every causal recurrent model
  passes 0.9 in both orders there is no gap, and no test of it either."""
  runs = [
    _sets("sets", v, w, 0.97, 0.98) | {"state_bytes": 5000 * w}
    for v in ("attention", "pla", "based", "gla")
    for w in (32, 64)
  ]
  text = _recall_report.verdict(runs)
  assert "(a) larger set first is harder" in text
  assert "not testable at these set sizes: every causal recurrent model passes 0.9" in text
  assert "A first set of at most 12 tokens" in text and "smallest state here is 160,000" in text
  assert "Chance, guessing" not in text
  runs[4] = _sets("sets", "based", 32, 0.97, 0.88) | {"state_bytes": 1}  # fails an order, no gap
  text = _recall_report.verdict(runs)
  assert "more so with less state: does not reproduce" in text and "Chance, guessing" in text


def test_mqar_state_growth_is_unresolved_where_the_recalling_mixers_disagree():
  runs = [_mqar("attention", 32, 0.95), _mqar("attention", 64, 0.97)]
  runs += [_mqar("gla", 32, 0.1), _mqar("gla", 64, 0.4), _mqar("mlstm", 32, 0.3)]
  runs += [_mqar("mlstm", 64, 0.1), _mqar("based", 32, 0.1), _mqar("based", 64, 0.05)]
  text = _recall_report.verdict(runs)
  assert "grows with state: not resolved here: the mixers disagree (mlstm did not gain)" in text
  runs[-3] = _mqar("mlstm", 64, 0.5)  # based never recalls: left out of the criterion
  assert "grows with state: reproduces" in _recall_report.verdict(runs)


def test_set_disjointness_unlearned_by_attention_or_pla_leaves_the_order_claims_untested():
  runs = [_sets("sets", "based", 32, 0.9, 0.5), _sets("sets", "attention", 32, 0.97, 0.6)]
  text = _recall_report.verdict(runs)
  assert "(a), (b) on reading order: not testable here: the models did not learn" in text
  assert "attention d=32 reaches 0.600 in its worse order" in text
  assert "(a) larger set first is harder" not in text
  # With one mixer layer the report says why; with two it does not claim that reason.
  assert "With one mixer layer this is structural" in _recall_report.verdict(runs, num_layers=2)
  assert "With one mixer layer" not in _recall_report.verdict(runs, num_layers=4)
  runs.append(_sets("sets", "pla", 32, 0.95, 0.7))
  assert "pla d=32 reaches 0.700" in _recall_report.verdict(runs)
  runs[1:] = [_sets("sets", "attention", 32, 0.97, 0.95), _sets("sets", "pla", 32, 0.95, 0.93)]
  text = _recall_report.verdict(runs)
  assert "did not learn" not in text and "(a) larger set first is harder" in text


def test_unmirrored_set_sizes_leave_the_order_claims_untested():
  scores = {"4x12": {"accuracy": 0.5}}
  runs = [{"family": "sets", "variant": "based", "d_model": 32, "state_bytes": 8, "scores": scores}]
  assert "(a), (b) on reading order: not testable here" in _recall_report.verdict(runs)
  assert "| 0.500 | – |" in _recall_report.sets_table(runs)


def test_state_bytes_of_sliding_window_attention_stop_growing_at_the_window():
  """The sweep's models, ``(baseconv, attention)`` with and without its window, measured by
  ``jaxrec.inference.state_bytes`` (``experiments.recall`` is not imported: one launcher per
  process defines the ``--config`` flag)."""

  def size(window, tokens):
    cfg = models.LMConfig(
      vocab_size=64,
      d_model=32,
      num_layers=2,
      mixer_pattern=("baseconv", "attention"),
      num_heads=2,
      mixer_options={"attention": {"window": window}},
      max_seq_len=tokens,
    )
    return inference.state_bytes(nnx.eval_shape(lambda: models.LM(cfg, rngs=nnx.Rngs(0))), tokens)

  def kv_bytes(tokens):  # fp32 keys and values of width 32 and int32 document ids
    return tokens * (2 * 32 * 4 + 4)

  conv = size(None, 8) - kv_bytes(8)  # the BaseConv layer's state
  assert size(None, 64) == conv + kv_bytes(64)
  assert size(8, 8) == conv + kv_bytes(8)
  assert size(8, 64) == size(8, 1000) == conv + kv_bytes(8) + 8 * 4  # ring + its positions


def test_a_tiny_sweep_writes_its_numbers_plots_and_section(tmp_path):
  """Every task and report path end to end, a few steps each (the default sweep takes ~35 min)."""
  out = tmp_path / "out"
  argv = [
    sys.executable,
    "-m",
    "experiments.recall",
    "--config.mixers=based,swa",
    "--config.d_models=16",
    "--config.ffn=none",
    "--config.steps=8",
    "--config.mqar.vocab_size=32",
    "--config.mqar.seq_len=32",
    "--config.mqar.num_pairs=4",
    "--config.mqar.train_mix=16x2,48x4",  # one longer than the scored 32x4
    "--config.sets.steps=8",
    "--config.sets.ffns=none,mlp",
    "--config.warmup_steps=2",
    "--config.eval_every=4",
    "--config.test_examples=64",
    "--config.counting.mixers=based",
    "--config.counting.formats=plain,items",
    "--config.counting.steps=8",
    "--config.counting.d_model=16",
    "--config.counting.lengths=4-6,7-8",
    "--config.progress=False",
    f"--config.out_dir={out}",
    f"--publish={tmp_path / 'checkout'}",
  ]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads((out / "recall.json").read_text())["runs"]
  families = sorted((r["family"], r["variant"]) for r in runs)
  assert families == sorted(
    [("mqar", v) for v in ("based", "swa")]
    + [(f, v) for f in ("sets", "sets_jrt") for v in ("based", "swa") for _ in ("none", "mlp")]
    + [("counting:plain", "based"), ("counting:items", "based")]
  )
  layouts = {(r["family"], r["ffn"], r["num_layers"]) for r in runs if r["family"] != "mqar"}
  assert {(f, n) for f, _, n in layouts} == {
    ("sets", 4),
    ("sets_jrt", 4),
    ("counting:plain", 2),
    ("counting:items", 2),
  }
  assert {f for fam, f, _ in layouts if fam.startswith("sets")} == {"none", "mlp"}
  assert all(r["steps"] <= 8 for r in runs)
  assert {p.name for p in out.glob("*.png")} == {"mqar.png", "sets.png", "counting.png"}
  published = tmp_path / "checkout" / "results" / "recall"
  names = ["recall.json", "mqar.png", "sets.png", "counting.png", "tokenizer.json"]
  assert sorted(p.name for p in published.iterdir()) == sorted(names)
  for report, prefix in ((out, ""), (tmp_path / "checkout", "results/recall/")):
    text = (report / "RESULTS.md").read_text()
    for title in ("### Verdict on the papers' claims", "### MQAR", "### Set disjointness"):
      assert title in text
    assert "(d) letters merged into one token count worse" in text
    assert "The mixers `based`, `swa` (`swa` is attention with a window of" in text
    assert "without MLPs (JRT's layout) and with a SwiGLU MLP after every mixer" in text
    assert "trained on the mix 16x2,48x4" in text
    assert "Counting (mixers `based`): " in text and "Every registered" not in text
    for name in names[:4]:
      assert f"({prefix}{name})" in text or f"`{prefix}{name}`" in text
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "out"]  # nothing in the cwd


def test_the_report_shows_only_the_tasks_that_ran(tmp_path):
  """An MQAR-only sweep: no set or counting subsection, no link to a plot that was not drawn."""
  config = recall_config.get_config().to_dict()
  scores = {"repeats=1": {"accuracy": 0.5}, "repeats=2": {"accuracy": 0.75}}
  run = {"family": "mqar", "variant": "based", "d_model": 16, "state_bytes": 4096, "steps": 8}
  results = {
    "command": "python -m experiments.recall --config.tasks=mqar",
    "config": {**config, "mixers": "based", "tasks": "mqar"},
    "machine": "test",
    "seconds": 1.0,
    "notes": [],
    "runs": [{**run, "scores": scores}],
  }
  (tmp_path / "sets.png").write_bytes(b"an earlier sweep's plot")
  (report,) = _recall_report.write(results, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "mqar.png", "recall.json"]
  text = pathlib.Path(report).read_text()
  assert "### MQAR" in text and "](mqar.png)" in text and "| based | 16 | 4,096 | 8 |" in text
  assert "Set disjointness\n" not in text and "### Counting" not in text
  assert "The mixers `based`, trained" in text and "Counting (not run): " in text


def test_every_count_is_one_token_of_the_counting_tokenizer(tmp_path):
  """Two-token answers (12, 13, ...) were harder than one-token ones for a reason that is the
  answer's tokenization, not the string's format: every count is one token now."""
  config = recall_config.get_config()
  tokenizer = _recall_report.train_bpe(config, 4, 16, str(tmp_path / "tokenizer.json"))
  for n in range(17):
    assert len(tokenizer.encode(str(n))) == 1, n
  task = tasks_lib.Counting(tokenizer, format="comma", min_length=13, max_length=16)
  example = task.example(np.random.default_rng(0))
  assert int(example.weights.sum()) == 2  # the count and eos


def test_the_paper_scale_preset_sets_known_fields_to_valid_settings():
  """``--config.full=True``: every field it sets exists with the default's type, JRT's twelve set
  sizes come in both orders, and Zoology's MQAR mix holds no more pairs than the scored setting."""
  config = recall_config.get_config()
  for field, value in recall_config.FULL.items():
    section, _, name = field.rpartition(".")
    default = (config[section] if section else config)[name]
    assert type(value) is type(default) or {type(value), type(default)} == {int, float}, field
  full = recall_config.FULL
  sizes = train_lib.parse_int_pairs(full["sets.sizes"], "--config.sets.sizes")
  assert len(sizes) == 12 and {(b, a) for a, b in sizes} == set(sizes)
  for a, b in sizes:
    tasks_lib.SetDisjointness(full["sets.vocab_size"], a, b)
  mix = train_lib.parse_int_pairs(full["mqar.train_mix"], "--config.mqar.train_mix")
  assert (full["mqar.seq_len"], full["mqar.num_pairs"]) in mix
  for seq_len, pairs in mix:
    assert pairs <= full["mqar.num_pairs"]
    tasks_lib.MQAR(vocab_size=full["mqar.vocab_size"], seq_len=seq_len, num_pairs=pairs)
