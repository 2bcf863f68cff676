"""``colabs/long_context``: the .ipynb matches its jupytext source, and the notebook runs on CPU
(its install cell is the quickstart's, tested there)."""

import json
import os
import pathlib

import pytest

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "long_context.py"
NOTEBOOK = REPO / "colabs" / "long_context.ipynb"
_PROBE = """\
import json
print(json.dumps({
  "cache_bytes": cache_bytes,
  "set_difference": float(set_difference),
  "plain_difference": float(plain_difference),
}))
"""


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert _cells(committed) == _cells(jupytext.read(SOURCE)), (
    "colabs/long_context.ipynb is stale: run `jupytext --to ipynb colabs/long_context.py`"
  )
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  monkeypatch.setenv("JAXREC_NOTEBOOK_LENGTH", "64")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = jupytext.read(SOURCE)
  nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  probe = json.loads("".join(o.get("text", "") for o in nb.cells[-1].outputs))
  assert probe["set_difference"] < 1e-5 < 1e-3 < probe["plain_difference"], probe
  sizes = probe["cache_bytes"]
  assert sizes["lm_infinite"] < sizes["vanilla"] and sizes["think"] < sizes["vanilla"], sizes
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert any("image/png" in out.get("data", {}) for out in outputs), "no plot"
