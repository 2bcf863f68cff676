"""``experiments/rat_moe.py``'s outputs: the JSON, the plot and the ``RESULTS.md`` section, with
each paper's ordering checked on the numbers (so a rerun at another scale says what holds then)."""

import itertools
import json
import os
import statistics

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import _results

SECTION = "RAT and RMoE at small scale"
# The RMoE paper's names (Table 4): SMoE is the linear router, NP the GRU without the state
# passed between layers.
ROUTER_NAMES = {
  "linear": "SMoE (linear)",
  "gru": "RMoE (GRU)",
  "mlp": "MLP + previous state",
  "gru_no_recurrence": "NP (GRU, no recurrence)",
  "gru_detached": "GRU, h detached",
}
_STATS = (
  ("moe/entropy", "gate entropy (nats)", "%.3f"),
  ("moe/top_ratio", "IB (top-1 / top-2 weight)", "%.2f"),
  ("moe/selected_weight", "OB (weight on selected)", "%.3f"),
  ("moe/load_max", "max load × E", "%.2f"),
  ("moe/dropped", "dropped", "%.4f"),
  ("moe/layer_mi_bits", "cross-layer MI (bits)", "%.3f"),
)


def write(results: dict, out_dir: str, publish: str | None = None) -> list[str]:
  """Writes ``rat_moe.json``, ``rat_moe.png`` and the report under ``out_dir`` (and, with
  ``publish``, into that checkout's ``results/`` and ``RESULTS.md``; ``_results.write_report``).
  ``results`` holds the parts that ran (``lm``, ``mqar``, ``moe``: each its command, machine,
  settings and runs); the other parts come from the JSON of an earlier run, if any (the published
  one, then ``out_dir``'s), so one part can be rerun alone. Returns the reports written."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = (os.path.join(out_dir, f"rat_moe.{ext}") for ext in ("json", "png"))
  earlier = [json_path]
  if publish:
    earlier.insert(0, os.path.join(publish, "results", "rat_moe.json"))
  merged = {}
  for path in earlier:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        merged |= json.load(f)
  results = merged | results
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  plot(results, png_path)
  text = lambda link: section(results, link(png_path), link(json_path))
  print(text(os.path.basename))
  return _results.write_report(out_dir, [json_path, png_path], text, publish=publish)


def _order(results: dict) -> list[str]:
  return [p for p in ("lm", "mqar", "moe") if p in results]


def moe_summary(runs: list[dict]) -> dict[str, dict]:
  """Per router: the mean and the sample standard deviation (n - 1; 0 for one seed) over seeds of
  every number of its runs."""
  std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
  out = {}
  for router in dict.fromkeys(r["router"] for r in runs):
    rows = [r for r in runs if r["router"] == router]
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out[router] = {
      k: (statistics.mean(r[k] for r in rows), std([r[k] for r in rows])) for k in keys
    }
    out[router]["seeds"] = len(rows)
  return out


def plot(results: dict, path: str) -> None:
  parts = _order(results)
  fig = Figure(figsize=(5 * len(parts), 4))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(parts), squeeze=False)[0]
  for ax, part in zip(axes, parts, strict=True):
    runs = results[part]["runs"]
    if part in ("lm", "mqar"):
      key = "val_bits_per_byte" if part == "lm" else "accuracy"
      rows = by_chunk(runs)
      xs = [r["chunk_size"] for r in rows]
      for r in runs:  # every seed, faint
        ax.plot(r["chunk_size"], r[key], "o", color="C0", alpha=0.3)
      ax.errorbar(xs, [r[key][0] for r in rows], [r[key][1] for r in rows], fmt="o-", color="C0")
      ax.set_xscale("log", base=2)
      ax.set_xlabel("RAT chunk length L (1: attention, T: RNN)")
      ax.set_ylabel("validation bits per byte" if part == "lm" else "MQAR accuracy")
      ax.set_title("byte-level LM" if part == "lm" else "MQAR recall")
      if part == "lm":
        twin = ax.twinx()
        twin.plot(xs, [r["step_ms"][0] for r in rows], "s--", color="C1")
        twin.set_ylabel("train step (ms)", color="C1")
    else:
      summary = moe_summary(runs)
      names = list(summary)
      for i, router in enumerate(names):
        values = [r["val_bits_per_byte"] for r in runs if r["router"] == router]
        ax.plot([i] * len(values), values, "o", color="C0", alpha=0.6)
        ax.plot([i - 0.25, i + 0.25], [summary[router]["val_bits_per_byte"][0]] * 2, "k-")
      ax.set_xticks(range(len(names)), [ROUTER_NAMES.get(n, n) for n in names], rotation=25)
      ax.set_ylabel("val bits per byte (dots: seeds, bar: mean)")
      ax.set_title("MoE LM by router")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def section(results: dict, png: str, json_path: str) -> str:
  writers = {"lm": _lm, "mqar": _mqar, "moe": _moe}
  body = "\n\n".join(
    writers[p](results[p]["runs"], results[p]["settings"]) + "\n\n" + _command(results[p])
    for p in _order(results)
  )
  return f"""## {SECTION}

RAT (arXiv 2507.04416) and RMoE (arXiv 2408.06793) at the sizes two CPU cores allow.
`python -m experiments.rat_moe --config.out_dir=runs/rat_moe --publish=.` runs all three parts
below; each part gives the command that produced it (`--config.experiments=lm`, `mqar` or `moe`
reruns one and keeps the others).

{body}

![LM bits per byte and step time against L, MQAR accuracy against L, MoE bits per byte by router]({png})

Data: `{json_path}` (every number above, the settings, and the train-loss curves). Step times are
medians of the timed train steps after the compiling first one, on a CPU shared with other jobs:
compare them within this run only.
"""


def by_chunk(runs: list[dict]) -> list[dict]:
  """The runs of each chunk length ``L`` (in increasing ``L``): its label, parameters, number of
  seeds and, for every number of its runs, ``(mean, sample std)`` (std 0 for one seed)."""
  out = []
  for size in sorted({r["chunk_size"] for r in runs}):
    rows = [r for r in runs if r["chunk_size"] == size]
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    out.append(
      {
        "chunk_size": size,
        "label": rows[0]["label"],
        "params": rows[0]["params"],
        "seeds": len(rows),
      }
      | {k: (statistics.mean(r[k] for r in rows), std([r[k] for r in rows])) for k in keys}
    )
  return out


def _pm(value: tuple[float, float], spec: str, seeds: int) -> str:
  mean, std = value
  return f"{spec % mean} ± {spec % std}" if seeds > 1 else spec % mean


def _seeds(c: dict) -> str:
  seeds = str(c.get("seeds", c.get("seed", 0)))
  return f"seeds {seeds} (mean ± sample std)" if "," in seeds else f"seed {seeds}"


def _lm(runs: list[dict], c: dict) -> str:
  rows = [
    "| model | parameters | val bits/byte | vs attention | train step (ms) |",
    "|---|---:|---:|---:|---:|",
  ]
  table = by_chunk(runs)
  base = next((r for r in table if r["chunk_size"] == 1), None)
  for r in table:
    bits = r["val_bits_per_byte"]
    gap = "–" if base is None else _rel(bits[0], base["val_bits_per_byte"][0])
    rows.append(
      f"| {r['label']} | {r['params']:,} | {_pm(bits, '%.4f', r['seeds'])} | {gap} | "
      f"{r['step_ms'][0]:.1f} |"
    )
  bits = [r["val_bits_per_byte"] for r in table]
  monotone = all(a[0] <= b[0] for a, b in itertools.pairwise(bits))
  verdict = (
    f"Mean bits per byte {'rise monotonically' if monotone else 'do not rise monotonically'} "
    "with L (the paper: a smooth interpolation between attention and the RNN)."
  )
  verdict += _unresolved(table, "val_bits_per_byte", "%.4f")
  rat16 = next((r for r in table if r["chunk_size"] == 16), None)
  if base and rat16:
    gap = _rel(rat16["val_bits_per_byte"][0], base["val_bits_per_byte"][0])
    verdict += f" RAT(16) is {gap} from attention (the paper: within about 1% in perplexity)."
  return f"""### Byte-level LM, sweep over L

{c["num_layers"]} RAT layers (InterRoPE), d_model {c["d_model"]}, {c["num_heads"]} heads,
{c["steps"]} steps of {c["batch_size"]}×{c["seq_len"]} bytes of the embedded corpus (peak lr
{c["learning_rate"]:g}, cosine), {_seeds(c)}; validation: {c["eval_batches"]} batches.
The reference note's smallest CPU experiment (`seed_models.md` §3; not a setting of the paper,
whose repository configures 1.3B models only) is 4 layers, d 256, T 512.

{chr(10).join(rows)}

{verdict}

How far to read it: these models saw {c["steps"] * c["batch_size"] * c["seq_len"] / 1e6:.2g}M
bytes each and are far from converged; gaps of a percent or two between the L are within what
another seed or data order can move, so an ordering is read only where it exceeds the seed
spread.
With T = {c["seq_len"]} the attention term (T² / L) is a small part of a train step, so the
step times here mostly measure fixed costs on a shared CPU; the per-layer cost as T grows is
measured by `experiments/bench_rat.py` (BENCHMARKS.md)."""


def _unresolved(table: list[dict], key: str, spec: str) -> str:
  """How many steps between neighbouring L in ``key`` are within twice the largest seed std (not
  resolved by the seeds), naming them; empty for one seed."""
  if table[0]["seeds"] < 2:
    return ""
  spread = max(r[key][1] for r in table)
  pairs = list(itertools.pairwise(table))
  within = [(a, b) for a, b in pairs if abs(b[key][0] - a[key][0]) <= 2 * spread]
  names = "; ".join(f"{a['label']} → {b['label']}" for a, b in within)
  return (
    f" {len(within)} of the {len(pairs)} steps between neighbouring L are within twice the "
    f"largest seed std ({spec % spread}): those differences are not resolved by "
    f"{table[0]['seeds']} seeds" + (f" ({names})." if within else ".")
  )


def _mqar(runs: list[dict], c: dict) -> str:
  rows = [
    "| model | parameters | accuracy | exact match | train step (ms) |",
    "|---|---:|---:|---:|---:|",
  ]
  table = by_chunk(runs)
  for r in table:
    n = r["seeds"]
    rows.append(
      f"| {r['label']} | {r['params']:,} | {_pm(r['accuracy'], '%.3f', n)} | "
      f"{_pm(r['exact_match'], '%.3f', n)} | {r['step_ms'][0]:.1f} |"
    )
  accuracy = [r["accuracy"][0] for r in table]
  holds = all(a >= b for a, b in itertools.pairwise(accuracy))
  verdict = (
    f"Mean recall {'falls' if holds else 'does not fall'} monotonically as L grows (the paper: "
    "attention ≳ RAT(small L) > RAT(large L) ≫ RNN)."
  ) + _unresolved(table, "accuracy", "%.3f")
  base = table[0] if table[0]["chunk_size"] == 1 else None
  floor = 1 / c["num_pairs"] if "num_pairs" in c else 0.0
  if base and base["accuracy"][0] < 0.5:
    verdict += f""" Not testable here: attention (L=1) did not learn the task in these steps
(accuracy {base["accuracy"][0]:.3f}; guessing one of the {c["num_pairs"]} values of an example
gives about {floor:.3f}), so the ordering the paper states cannot be read from this run."""
  elif accuracy[-1] < max(accuracy):
    verdict += """ The drop towards large L is what the paper's capacity argument predicts: a
chunk's one (k̃, ṽ) state holds several pairs, and the RNN's one state all of them."""
  return f"""### MQAR recall

{_mqar_layers(c)}, d_model {c["d_model"]}, {c["num_heads"]} heads; MQAR with
{c["num_pairs"]} key-value pairs in {c["seq_len"]} tokens over a vocabulary of
{c["vocab_size"]}, {c["steps"]} steps of {c["batch_size"]} examples (peak lr
{c["learning_rate"]:g}), {_seeds(c)}; accuracy over {c["test_examples"]} held-out examples (exact match: every
query of an example right). RAT's paper and repository have no MQAR experiment: the task and its
settings are this project's, after the reference note's smallest CPU experiment (`seed_models.md`
§3: T 256, d 128, D ∈ {{16, 32, 64}}, Zoology's MQAR).

{chr(10).join(rows)}

{verdict}"""


def _mqar_layers(c: dict) -> str:
  if not c.get("short_conv", False):
    return f"{c['num_layers']} RAT layers"
  return (
    f"{c['num_layers']} layers alternating BaseConv and RAT (Zoology's MQAR layout: the short "
    "convolution lets attention form its induction step; without it attention did not learn "
    "the task here)"
  )


def _moe(runs: list[dict], c: dict) -> str:
  summary = moe_summary(runs)
  head = ["router", "val bits/byte", "train step (ms)", *(name for _, name, _ in _STATS)]
  rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for router, s in summary.items():
    mean, std = s["val_bits_per_byte"]
    cells = [ROUTER_NAMES.get(router, router), f"{mean:.4f} ± {std:.4f}", f"{s['step_ms'][0]:.1f}"]
    cells += [_mean_std(s, key, spec) for key, _, spec in _STATS]
    rows.append("| " + " | ".join(cells) + " |")
  initial = _at_init(summary)
  order = sorted(summary, key=lambda r: summary[r]["val_bits_per_byte"][0])
  verdict = "Ordering by mean bits per byte (best first): " + " < ".join(
    ROUTER_NAMES.get(r, r) for r in order
  )
  verdict += " (the paper: RMoE < NP ≈ SMoE < detach)."
  if "gru" in summary and "linear" in summary:
    gain = summary["linear"]["val_bits_per_byte"][0] - summary["gru"]["val_bits_per_byte"][0]
    spread = max(summary[r]["val_bits_per_byte"][1] for r in ("gru", "linear"))
    verdict += (
      f" RMoE's gain over SMoE is {gain:+.4f} bits per byte against a seed spread (std) of up to "
      f"{spread:.4f} (the paper: 0.005-0.015 on enwik8 at 12 layers)."
    )
    ib, ob = (
      {r: summary[r][k][0] for r in ("gru", "linear")}
      for k in ("moe/top_ratio", "moe/selected_weight")
    )
    flatter = ib["gru"] < ib["linear"] and ob["gru"] < ob["linear"]
    # Resolved only where both differences exceed twice the larger seed std (0 for one seed).
    resolved = all(
      abs(summary["gru"][k][0] - summary["linear"][k][0])
      > 2 * max(summary["gru"][k][1], summary["linear"][k][1])
      for k in ("moe/top_ratio", "moe/selected_weight")
    )
    outcome = ("flatter" if flatter else "not flatter") if resolved else "not resolved as flatter"
    verdict += (
      f" RMoE's gates are {outcome} than SMoE's: IB "
      f"{ib['gru']:.2f} vs {ib['linear']:.2f}, OB {ob['gru']:.3f} vs {ob['linear']:.3f} (the "
      "paper: IB 2.02 vs 34.7, OB 0.573 vs 0.915)"
      + (
        "."
        if resolved
        else f", differences within twice the seed std over {summary['gru']['seeds']} seeds)."
      )
    )
  seeds = ",".join(str(s) for s in dict.fromkeys(r["seed"] for r in runs))
  return f"""### MoE LM: linear router vs the RMoE GRU router vs the ablations

Attention LMs of {c["num_layers"]} layers, d_model {c["d_model"]}, whose feed-forward is an MoE of
{c["num_experts"]} experts (hidden {c["expert_hidden"]}), top-{c["top_k"]}, {_routing(c)},
router state p = {c["router_dim"]}, load-balancing weight 0.01; {c["steps"]} steps of
{c["batch_size"]}×{c["seq_len"]} bytes (peak lr {c["learning_rate"]:g}), seeds {seeds} (parameters
and data order); validation: {c["eval_batches"]} batches. Mean ± sample std over seeds; the routing
statistics are validation means (IB and OB as in the RMoE paper, but means, not medians). The
reference note's smallest CPU experiment (`seed_models.md` §4, after the paper's enwik8 depth
sweep, whose gain is about 0 at 6 layers) is 12 layers, d 128, 16 experts top-2, p 64-128.

{chr(10).join(rows)}
{initial}
{verdict}

Why the ordering of bits per byte says little at this size: the paper's gain is small (about
0.01 bits) at 12 layers after 80k steps and about zero at 6 layers; with fewer layers the router
state passes through few steps, and {c["steps"]} training steps leave the models far from
converged, so the routers' differences sit inside the seed spread. The routing statistics react
sooner and are the signal the paper itself calls more robust.{_drops(summary, c)}"""


def _mean_std(summary: dict, key: str, spec: str) -> str:
  if key not in summary:
    return "–"
  mean, std = summary[key]
  return f"{spec % mean} ± {spec % std}" if summary["seeds"] > 1 else spec % mean


def _at_init(summary: dict) -> str:
  """The routing statistics of the initial parameters (runs that recorded them), a table, and
  whether training moved each router's IB (top-1 / top-2 gate ratio) by more than twice the
  seed spread."""
  routers = [r for r, s in summary.items() if "init/moe/top_ratio" in s]
  if not routers:
    return ""
  stats = [(k, name, spec) for k, name, spec in _STATS if k != "moe/dropped"]
  head = ["router", *(name for _, name, _ in stats)]
  rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  moved = []
  for r in routers:
    s = summary[r]
    cells = [ROUTER_NAMES.get(r, r), *(_mean_std(s, "init/" + k, spec) for k, _, spec in stats)]
    rows.append("| " + " | ".join(cells) + " |")
    (a, sa), (b, sb) = s["init/moe/top_ratio"], s["moe/top_ratio"]
    if abs(b - a) > 2 * max(sa, sb):
      moved.append(ROUTER_NAMES.get(r, r))
  table = chr(10).join(rows)
  return f"""
The same statistics of the initial parameters (before any step, same seeds):

{table}

Training moved IB by more than twice its seed spread for {len(moved)} of {len(routers)} routers
({", ".join(moved) if moved else "none"}).
"""


def _routing(c) -> str:
  """How the run's MoE dispatches: dropless (RMoE's reference) or with a capacity factor."""
  factor = c.get("capacity_factor", 1.25)  # runs before the setting had 1.25
  if isinstance(factor, str) and factor.strip().lower() == "none":
    return "dropless (tokens sorted by expert, grouped matmuls; RMoE's reference MoE drops none)"
  return f"capacity factor {factor} (assignments past an expert's capacity dropped)"


def _drops(summary: dict, c) -> str:
  dropped = [s["moe/dropped"][0] for s in summary.values() if "moe/dropped" in s]
  if not dropped or max(dropped) < 0.1:
    return ""
  return (
    f" At {_routing(c).split(' (')[0]} every router still drops {min(dropped):.0%}-"
    f"{max(dropped):.0%} of "
    "the token-to-expert assignments (past an expert's capacity; a token dropped by both its "
    "experts keeps only its residual stream): the routing is far from balanced this early."
  )


def _command(part: dict) -> str:
  return f"""Ran on {part["machine"]}, {part["seconds"] / 60:.1f} min:

```
{part["command"]}
```"""


def _rel(value: float, base: float) -> str:
  return f"{100 * (value - base) / base:+.1f}%"
