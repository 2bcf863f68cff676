"""``colabs/recall``: the .ipynb matches its jupytext source, and the notebook runs on CPU (its
install cell is the quickstart's, tested there)."""

import json
import os
import pathlib

import pytest

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "recall.py"
NOTEBOOK = REPO / "colabs" / "recall.ipynb"
STEPS = 3
_PROBE = """\
import json
print(json.dumps({"accuracy": {f"{m} {r}": a for (m, r), a in accuracy.items()}, "row": ROW}))
"""


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  source = jupytext.read(SOURCE)
  assert [(c.cell_type, c.source) for c in committed.cells] == [
    (c.cell_type, c.source) for c in source.cells
  ], "colabs/recall.ipynb is stale: run `jupytext --to ipynb colabs/recall.py`"
  assert all(c.outputs == [] for c in committed.cells if c.cell_type == "code")


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  monkeypatch.setenv("JAXREC_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = jupytext.read(SOURCE)
  nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  probe = json.loads(out)
  assert sorted(probe["accuracy"]) == ["attention 1", "attention 2", "based 1", "based 2"]
  assert all(0 <= a <= 1 for a in probe["accuracy"].values())
  assert probe["row"] == 32 + 8  # the MQAR row plus a second copy of the 4 pairs
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot"
