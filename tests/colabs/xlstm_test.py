"""``colabs/xlstm``: the .ipynb matches its jupytext source, and the notebook runs on CPU outside
the checkout, on the tiny checkpoint it writes itself (``models.save_xlstm``)."""

import pathlib

import pytest
from testing_utils import execute_notebook

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "xlstm.py"
NOTEBOOK = REPO / "colabs" / "xlstm.ipynb"
# Read back from the kernel after the notebook's own cells have run.
_PROBE = """\
import json
print(json.dumps({
  "tokens_shape": list(tokens.shape),
  "same": bool(same),
  "state_bytes": state_bytes,
  "kv_bytes": kv_bytes,
  "contexts": contexts,
  "files": sorted(p.name for p in CHECKPOINT.iterdir()),
}))
"""


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  source = jupytext.read(SOURCE)
  cells = [(c.cell_type, c.source) for c in committed.cells]
  assert cells == [(c.cell_type, c.source) for c in source.cells], (
    "colabs/xlstm.ipynb is stale: run `jupytext --to ipynb colabs/xlstm.py`"
  )
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebook_loads_generates_and_its_state_does_not_grow(tmp_path, monkeypatch):
  monkeypatch.delenv("JAXREC_XLSTM_CHECKPOINT", raising=False)
  nb, probe = execute_notebook(SOURCE, _PROBE, tmp_path, monkeypatch)
  assert probe["files"] == ["config.json", "model.safetensors"]
  assert probe["tokens_shape"] == [1, 8 + 16]
  assert probe["same"]  # generate's decoding from the state = the full forward's argmax
  assert len(set(probe["state_bytes"])) == 1  # constant in the context length
  # The KV cache grows linearly: per block, bf16 keys and values 32 wide and an int32 segment id a
  # token, and an int32 index.
  assert probe["kv_bytes"] == [2 * (2 * 32 * 2 * c + 4 * c + 4) for c in probe["contexts"]]
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert any("image/png" in out.get("data", {}) for out in outputs), "no plot"
