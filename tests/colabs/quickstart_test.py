"""``colabs/quickstart``: the .ipynb matches its jupytext source, and the notebook runs on CPU."""

import json
import os
import pathlib

import pytest

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "quickstart.py"
NOTEBOOK = REPO / "colabs" / "quickstart.ipynb"
STEPS = 10
# Read back from the kernel after the notebook's own cells have run.
_PROBE = """\
import json
print(json.dumps({
  "losses": [float(x) for x in losses],
  "op_difference": float(abs(o_seq - o_chunk).max()),
  "state_difference": float(abs(state_seq - state_chunk).max()),
  "tokens_shape": list(tokens.shape),
}))
"""


def _cells(nb):
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def _stdout(cell) -> str:
  return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert _cells(committed) == _cells(jupytext.read(SOURCE)), (
    "colabs/quickstart.ipynb is stale: run `jupytext --to ipynb colabs/quickstart.py`"
  )
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebook_runs_on_cpu_and_the_loss_falls(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  monkeypatch.setenv("JAXREC_NOTEBOOK_STEPS", str(STEPS))
  # The kernel imports jaxrec from this checkout, not from whatever copy is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = jupytext.read(SOURCE)
  nb.cells.append(nbformat.v4.new_code_cell(_PROBE))

  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()

  probe = json.loads(_stdout(nb.cells[-1]))
  losses = probe["losses"]
  assert len(losses) == STEPS
  assert losses[-1] < losses[0] - 0.5, losses  # about 5.4 -> 3.6 nats in 10 steps
  assert probe["op_difference"] < 1e-4 and probe["state_difference"] < 1e-4, probe
  assert probe["tokens_shape"] == [1, 1 + 4 + 200]  # bos, "def ", the new tokens

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert any("image/png" in out.get("data", {}) for out in outputs), "no loss plot"
  sample_cell = next(cell for cell in nb.cells if "jaxrec.generate(" in cell.source)
  assert _stdout(sample_cell).startswith("def ")
