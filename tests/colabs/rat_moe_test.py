"""``colabs/rat_moe``: the .ipynb matches its jupytext source, and the notebook runs on CPU (its
install cell is the quickstart's, tested there) with a few steps of a narrow model."""

import math
import pathlib

import pytest
from testing_utils import execute_notebook

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "rat_moe.py"
NOTEBOOK = REPO / "colabs" / "rat_moe.ipynb"
STEPS, WIDTH = 4, 32
# Read back from the kernel after the notebook's own cells have run.
_PROBE = """\
import json
print(json.dumps({
  "losses": losses,
  "layers": cfg.num_layers,
  "chunk": CHUNK,
  "contexts": contexts,
  "rat_bytes": rat_bytes,
  "kv_bytes": kv_bytes,
  "generated": np.asarray(generated).tolist(),
  "prompt": prompt,
  "vocab": tokenizer.vocab_size,
  "stats": moe_stats,
  "loads": {r: np.asarray(v).tolist() for r, v in moe_loads.items()},
  "experts": models.get_preset("tiny-moe").moe.num_experts,
}))
"""


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  source = jupytext.read(SOURCE)
  assert [(c.cell_type, c.source) for c in committed.cells] == [
    (c.cell_type, c.source) for c in source.cells
  ], "colabs/rat_moe.ipynb is stale: run `jupytext --to ipynb colabs/rat_moe.py`"
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def _rat_layer_bytes(t, chunk, d):
  """fp32 chunk keys and values ``[ceil(T/L), D]``, the running key and value ``[D]``, the int32
  position in the current document and the token count."""
  n = -(-t // chunk)
  return 4 * (2 * n * d + 2 * d + 1 + 1)


def _kv_layer_bytes(t, d):
  """fp32 keys and values ``[T, D]``, an int32 segment id per token and the token count."""
  return 4 * (2 * t * d + t + 1)


def test_notebook_trains_generates_and_routes(tmp_path, monkeypatch):
  nb, probe = execute_notebook(
    SOURCE,
    _PROBE,
    tmp_path,
    monkeypatch,
    JAXREC_NOTEBOOK_STEPS=str(STEPS),
    JAXREC_NOTEBOOK_WIDTH=str(WIDTH),
  )
  losses = probe["losses"]
  assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0] - 0.1, losses

  layers, chunk, contexts = probe["layers"], probe["chunk"], probe["contexts"]
  assert probe["rat_bytes"] == [layers * _rat_layer_bytes(t, chunk, WIDTH) for t in contexts]
  assert probe["kv_bytes"] == [layers * _kv_layer_bytes(t, WIDTH) for t in contexts]
  ratios = [kv / r for kv, r in zip(probe["kv_bytes"], probe["rat_bytes"], strict=True)]
  # -> L (2D + 1) / 2D for long T: a KV cache also holds a segment id per token, RAT's state
  # only one position per row.
  limit = chunk * (2 * WIDTH + 1) / (2 * WIDTH)
  assert ratios == sorted(ratios) and 0.9 * limit < ratios[-1] <= limit

  (row,) = probe["generated"]
  prompt = probe["prompt"]
  assert row[: len(prompt)] == prompt and len(row) > len(prompt)
  assert all(0 <= i < probe["vocab"] for i in row)

  experts = probe["experts"]
  for router in ("gru", "linear"):
    stats, loads = probe["stats"][router], probe["loads"][router]
    assert all(math.isfinite(v) for v in stats.values()), stats
    # Every layer's loads are fractions of its k·N assignments; the pooled busiest-expert
    # statistic is their mean maximum relative to a balanced load.
    assert len(loads) == 3 and all(abs(sum(row) - 1) < 1e-5 for row in loads)
    assert all(len(row) == experts and min(row) >= 0 for row in loads)
    load_max = experts * sum(max(row) for row in loads) / len(loads)
    assert stats["moe/load_max"] == pytest.approx(load_max, rel=1e-5)
    assert 0 < stats["moe/entropy"] <= math.log(experts) + 1e-6
    assert 0 <= stats["moe/dropped"] < 1
    assert 0 <= stats["moe/layer_mi_bits"] <= math.log2(experts) + 1e-6
    assert stats["moe/balance_loss"] > 0
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert sum("image/png" in out.get("data", {}) for out in outputs) == 2, "a plot is missing"
