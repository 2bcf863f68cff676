"""Every ``experiments/bench_*.py`` from its flags to its finished table (and JSON, where it writes
one) at a tiny size, so that a change elsewhere cannot silently break a benchmark. The timings
themselves are not checked, only that each row is there and its figures are positive numbers.

Each benchmark runs as a subprocess (they define overlapping absl flags at import) on one CPU
device, sharing the test run's persistent XLA cache (``tests/conftest.py``).
"""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(module: str, *flags: str, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  argv = [sys.executable, "-m", f"experiments.{module}", *flags]
  done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("machine: "), done.stdout[:500]
  return done


def _tables(stdout: str) -> list[list[dict[str, str]]]:
  """The markdown tables of ``stdout``, each a list of ``{column: cell}`` rows."""
  tables, lines = [], stdout.splitlines()
  for i, line in enumerate(lines[:-1]):
    if line.startswith("| ") and re.fullmatch(r"\|(-+:?\|)+", lines[i + 1]):
      head = [c.strip() for c in line.strip("|").split("|")]
      rows = []
      for body in lines[i + 2 :]:
        if not body.startswith("| "):
          break
        rows.append(dict(zip(head, (c.strip() for c in body.strip("|").split("|")), strict=True)))
      tables.append(rows)
  return tables


def _number(cell: str) -> float:
  """A table's figure: ``1,234.5``, ``0.36×``."""
  return float(cell.replace(",", "").rstrip("×"))


def _positive(rows, *columns):
  for row in rows:
    for column in columns:
      assert _number(row[column]) > 0, row


def test_bench_decode(tmp_path):
  done = _run(
    "bench_decode",
    "--contexts=16,32",
    "--steps=2",
    "--repeats=1",
    "--d_model=16",
    "--num_layers=1",
    "--num_heads=2",
    "--vocab_size=16",
    f"--json={tmp_path / 'decode.json'}",
    cwd=tmp_path,
  )
  (table,) = _tables(done.stdout)
  want = [(m, c) for c in ("16", "32") for m in ("gla", "mlstm", "attention")]
  assert [(r["method"], r["context"]) for r in table] == want
  _positive(table, "ms/token", "memory bound (ms)", "× bound", "tokens/s", "× own first context")
  _positive(table, "× gla")
  rows = json.loads((tmp_path / "decode.json").read_text())
  # The bound grows with the context only for attention (its KV cache); spreads are sane.
  bounds = {(r["method"], r["context"]): r["bound_ms"] for r in rows}
  assert bounds[("attention", 32)] > bounds[("attention", 16)]
  assert bounds[("gla", 32)] == bounds[("gla", 16)]
  assert all(r["spread"] >= 0 for r in rows)
  assert [(r["method"], str(r["context"])) for r in rows] == want
  assert all(r["vs_gla"] == 1.0 for r in rows if r["method"] == "gla")
  assert all(r["vs_first_context"] == 1.0 for r in rows if r["context"] == 16)


def test_bench_longctx(tmp_path):
  # The policies are the papers' sizes (LongHeads' chunk is 256 tokens): the shortest context
  # they all fit, with a tiny model.
  done = _run(
    "bench_longctx",
    "--contexts=512",
    "--steps=2",
    "--repeats=1",
    "--d_model=16",
    "--num_layers=1",
    "--num_heads=2",
    f"--json={tmp_path / 'longctx.json'}",
    cwd=tmp_path,
  )
  (table,) = _tables(done.stdout)
  methods = ["vanilla", "lm_infinite", "recycled", "longheads", "think"]
  assert [r["method"] for r in table] == methods
  _positive(table, "ms/token", "memory bound (ms)", "× bound", "tokens/s", "speed-up vs vanilla")
  _positive(table, "cache / vanilla")
  rows = {r["method"]: r for r in json.loads((tmp_path / "longctx.json").read_text())}
  assert list(rows) == methods
  assert rows["vanilla"]["cache_vs_vanilla"] == 1.0 and rows["vanilla"]["speedup"] == 1.0
  # ThinK stores older keys without floor(0.4 · 8) = 3 of their 8 channels (head_dim 16 / 2).
  assert rows["think"]["pruned_keys_vs_full"] == 5 / 8, rows["think"]
  assert rows["think"]["cache_vs_vanilla"] < 1
  assert all(rows[m]["pruned_keys_vs_full"] is None for m in methods[:-1])


def test_bench_mlstm(tmp_path):
  done = _run(
    "bench_mlstm",
    "--methods=sequential,chunk",
    "--seq_lens=32",
    "--batch=1",
    "--heads=1",
    "--dim=8",
    "--chunk_size=16",
    "--repeats=1",
    cwd=tmp_path,
  )
  (table,) = _tables(done.stdout)
  got = [(r["method"], r["mode"]) for r in table]
  assert got == [(m, mode) for m in ("sequential", "chunk") for mode in ("fwd", "fwd+bwd")]
  assert {r["shape"] for r in table} == {"B=1 T=32 H=1 K=V=8 float32"}
  _positive(table, "ms", "tokens/s")
  assert {r["× peer time"] for r in table} == {"–"}  # no peer rows asked for


def test_bench_newton(tmp_path):
  # gru's dense Jacobian is skipped above --dense_max_d: its Newton rows are left out.
  done = _run(
    "bench_newton",
    "--cells=paragru,gru",
    "--seq_lens=8",
    "--widths=4",
    "--batches=2",
    "--dense_max_d=2",
    "--repeats=1",
    "--input_dim=4",
    cwd=tmp_path,
  )
  (table,) = _tables(done.stdout)
  methods = {
    "paragru": ("lax.scan", "newton", "python loop"),
    "gru": ("lax.scan", "python loop"),
  }
  want = [(c, m, mode) for c, ms in methods.items() for mode in ("fwd", "fwd+bwd") for m in ms]
  assert [(r["cell"], r["method"], r["mode"]) for r in table] == want
  _positive(table, "ms", "tokens/s", "vs lax.scan")
  for row in table:
    # Newton from a zero guess needs an iteration, and at most T of them.
    iterations = row["iterations"]
    assert 1 <= int(iterations) <= 8 if row["method"] == "newton" else iterations == "–", row


def test_bench_peers_gpu_runs_its_jaxrec_part_on_cpu(tmp_path):
  """Without a GPU (or torch, or fla) the FLA rows are skipped with the reason, and jaxrec's forms
  are checked against its sequential form instead."""
  done = _run("bench_peers_gpu", "--smoke", "--methods=chunk,three_pass", cwd=tmp_path)
  assert "FLA skipped: " in done.stdout
  for method in ("chunk", "three_pass"):
    assert f"agreement {method} vs sequential at B=1 T=256 H=2 K=V=32: ok" in done.stdout
  (table,) = _tables(done.stdout)
  got = [(r["impl"], r["mode"]) for r in table]
  impls = ("chunk", "three_pass", "sequential")
  assert got == [(i, mode) for i in impls for mode in ("fwd", "fwd+bwd")]
  _positive(table, "ms", "tokens/s", "time / sequential")


def test_bench_rat(tmp_path):
  done = _run(
    "bench_rat",
    "--lengths=32",
    "--chunk_sizes=8",
    "--d_model=16",
    "--num_heads=2",
    "--repeats=1",
    "--experts=4",
    "--moe_tokens=32",
    f"--json={tmp_path / 'rat.json'}",
    cwd=tmp_path,
  )
  rows = json.loads((tmp_path / "rat.json").read_text())
  # Top-2 of 4 experts of hidden 4·16/2 against a dense SwiGLU of the active hidden 64.
  moe = ["dense(F=64)", "moe", "moe-no-drop", "moe-sorted", "moe-sorted-ragged_dot"]
  names = ["attention", "rat(L=8)", *moe]
  assert [r["method"] for r in rows] == names
  assert all(r["train_ms"] > 0 for r in rows)
  assert all(r["spread"] >= 0 and r["ratio_to_dense"] > 0 for r in rows[2:])
  assert all(r["decode_ms"] > 0 and r["T"] == 32 for r in rows[:2])
  lines = done.stdout.splitlines()[1:]
  assert [re.search(r"method=(\S+)", line).group(1) for line in lines] == names


def test_bench_scan(tmp_path):
  done = _run(
    "bench_scan",
    "--seq_lens=32",
    "--batch=1",
    "--scan_widths=8",
    "--gla_shapes=1x8",
    "--methods=sequential,associative,chunk,three_pass",
    "--repeats=1",
    cwd=tmp_path,
  )
  assert "## linear_scan" in done.stdout and "## gated_linear_attention" in done.stdout
  scan, gla = _tables(done.stdout)
  modes = ("fwd", "fwd+bwd")
  got = [(r["method"], r["mode"]) for r in scan]
  assert got == [(m, mode) for mode in modes for m in ("sequential", "associative", "chunk")]
  # linear_scan has no three-pass form, GLA no associative one; softmax attention is there for
  # scale.
  got = [(r["method"], r["mode"]) for r in gla]
  gla_rows = ("sequential", "chunk", "three_pass", "softmax attention")
  assert got == [(m, mode) for mode in modes for m in gla_rows]
  for table in (scan, gla):
    _positive(table, "ms", "tokens/s", "speed-up vs sequential")
    assert all(
      _number(r["speed-up vs sequential"]) == 1 for r in table if r["method"] == "sequential"
    )


def test_bench_real_on_a_tiny_checkpoint_without_its_peers(tmp_path):
  """jaxrec's two sides on a tiny Hugging Face directory (no torch, no llama.cpp asked for)."""
  from flax import nnx

  from jaxrec.models import LM, LMConfig, save_pretrained

  cfg = LMConfig(
    vocab_size=64,
    d_model=16,
    num_layers=2,
    mixer_pattern=("attention",),
    num_heads=2,
    num_kv_heads=1,
    tie_embeddings=True,
    max_seq_len=64,
  )
  save_pretrained(LM(cfg, rngs=nnx.Rngs(0)), tmp_path / "tiny")
  done = _run(
    "bench_real",
    f"--model={tmp_path / 'tiny'}",
    "--sides=jaxrec-fp32,jaxrec-bf16",
    "--prefill=16",
    "--contexts=16,32",
    "--steps=4",
    "--repeats=1",
    "--bandwidth_mib=8",
    f"--json={tmp_path / 'real.json'}",
    cwd=tmp_path,
  )
  assert "memory bandwidth: " in done.stdout and "load average " in done.stdout
  prefill, decode = _tables(done.stdout)
  sides = ("jaxrec-fp32", "jaxrec-bf16")
  assert [(r["method"], r["shape"]) for r in prefill] == [(s, "P=16") for s in sides]
  assert [(r["method"], r["shape"]) for r in decode] == [
    (s, f"C={c}") for s in sides for c in (16, 32)
  ]
  _positive(prefill, "tokens/s", "ratio")
  _positive(decode, "tokens/s", "ratio", "bound tokens/s", "× bound")
  rows = json.loads((tmp_path / "real.json").read_text())["rows"]
  fp32 = [r for r in rows if r["method"] == "jaxrec-fp32"]
  assert all(r["ratio"] == 1.0 for r in fp32)  # the reference without transformers
  # Weights + KV cache: bf16 reads half of fp32's bytes per token; fp32 agrees with itself.
  for r32, r16 in zip(fp32[1:], [r for r in rows if r["method"] == "jaxrec-bf16"][1:], strict=True):
    assert r16["bytes_per_token"] * 2 == r32["bytes_per_token"] and r32["same_tokens"] == 4
