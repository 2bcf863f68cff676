"""``colabs/liger``: the .ipynb matches its jupytext source, and the notebook runs on CPU (a few
training steps): it converts, fine-tunes and compares, and the converted model's decoding state
does not grow with the context while the teacher's does."""

import json
import os
import pathlib

import numpy as np
import pytest

jupytext = pytest.importorskip("jupytext", reason="the [colab] extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the [colab] extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the [colab] extra is not installed")

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCE = REPO / "colabs" / "liger.py"
NOTEBOOK = REPO / "colabs" / "liger.ipynb"
STEPS = 5
_PROBE = """\
import json
print(json.dumps({
  "scores": scores,
  "memory": memory,
  "mixers": list(student.cfg.layer_mixers),
  "samples": {k: len(v) for k, v in samples.items()},
  "n_lora": int(n_lora),
}))
"""


def test_ipynb_matches_its_jupytext_source():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  cells = [(c.cell_type, c.source) for c in committed.cells]
  assert cells == [(c.cell_type, c.source) for c in jupytext.read(SOURCE).cells], (
    "colabs/liger.ipynb is stale: run `jupytext --to ipynb colabs/liger.py`"
  )
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source


def test_notebook_converts_fine_tunes_and_compares_on_cpu(tmp_path, monkeypatch):
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

  out = json.loads("".join(o.get("text", "") for o in nb.cells[-1].outputs))
  assert out["mixers"] == ["liger"] * 2
  assert set(out["scores"]) == {"teacher", "converted", "fine-tuned"}
  assert all(v > 0 for v in out["scores"].values()), out
  teacher, liger = out["memory"]["teacher"], out["memory"]["liger"]
  assert len(set(liger)) == 1, out["memory"]
  # The notebook's lengths 256 .. 65536: per token, each of 2 layers keeps fp32 keys and values
  # (2 heads x 32) and an int32 segment id.
  per_token = np.diff(teacher) / np.diff([256, 1024, 4096, 16384, 65536])
  np.testing.assert_array_equal(per_token, 2 * (2 * 2 * 32 * 4 + 4))
  prompt = 1 + len("def ")  # bos and the bytes of the notebook's prompt
  assert out["samples"] == {"teacher": prompt + 120, "liger": prompt + 120}
  # Rank 8 on q (128 -> 4 x 32), k and v (128 -> 2 x 32) in each of 2 layers.
  assert out["n_lora"] == 2 * (8 * 128 + 8 * 128 + 2 * (8 * 128 + 8 * 64))
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no memory plot"
