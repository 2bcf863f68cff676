"""``colabs/quickstart``: the .ipynb matches its jupytext source, and the notebook runs on CPU."""

import importlib.util
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
from testing_utils import execute_notebook

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
  "generated_shape": list(out.tokens.shape),
  "length": int(out.lengths[0]),
  "stopped": bool(out.tokens[0, out.lengths[0] - 1] == tokenizer.eos_id),
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


def _install_cell() -> str:
  """The notebook's first code cell, which installs jaxrec."""
  return next(c for c in jupytext.read(SOURCE).cells if c.cell_type == "code").source


def _run_install_cell(cwd, monkeypatch, installed_at):
  """Runs the install cell in ``cwd`` with jaxrec found at ``installed_at`` (``None``: not
  installed); returns the pip commands it ran (none is actually run)."""
  calls = []
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(argv))
  spec = (
    None
    if installed_at is None
    else SimpleNamespace(origin=str(installed_at / "jaxrec/__init__.py"))
  )
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
  monkeypatch.setattr(sys, "path", list(sys.path))
  exec(_install_cell(), {})
  return calls


@pytest.fixture
def checkout(tmp_path):
  root = tmp_path / "jaxrec-checkout"
  (root / "jaxrec").mkdir(parents=True)
  (root / "jaxrec" / "__init__.py").write_text("")
  (root / "colabs").mkdir()
  (root / "setup.cfg").write_text("[metadata]\nname = jaxrec\n")
  return root


def test_install_cell_installs_the_checkout_it_runs_in(checkout, monkeypatch, capsys):
  calls = _run_install_cell(checkout / "colabs", monkeypatch, installed_at=None)
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout)]]
  assert sys.path[0] == str(checkout)
  assert f"installed jaxrec from the checkout this notebook runs in: pip install -e {checkout}" in (
    capsys.readouterr().out
  )
  # Run again once it is installed from there: nothing to do.
  assert _run_install_cell(checkout / "colabs", monkeypatch, installed_at=checkout) == []


def test_install_cell_elsewhere_installs_from_the_repository_it_names(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREC_REPOSITORY", "git+https://example.org/jaxrec")
  calls = _run_install_cell(tmp_path, monkeypatch, installed_at=None)
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "git+https://example.org/jaxrec"]]
  monkeypatch.delenv("JAXREC_REPOSITORY")
  with pytest.raises(RuntimeError, match="JAXREC_REPOSITORY"):
    _run_install_cell(tmp_path, monkeypatch, installed_at=None)
  assert _run_install_cell(tmp_path, monkeypatch, installed_at=tmp_path / "site") == []


def test_notebook_runs_on_cpu_and_the_loss_falls(tmp_path, monkeypatch):
  nb, probe = execute_notebook(
    SOURCE, _PROBE, tmp_path, monkeypatch, JAXREC_NOTEBOOK_STEPS=str(STEPS)
  )
  losses = probe["losses"]
  assert len(losses) == STEPS
  assert losses[-1] < losses[0] - 0.5, losses  # about 5.4 -> 3.6 nats in 10 steps
  assert probe["op_difference"] < 1e-4 and probe["state_difference"] < 1e-4, probe
  assert probe["generated_shape"] == [1, 200]  # the new tokens, padded after an eos
  assert 1 <= probe["length"] <= 200 and (probe["length"] == 200 or probe["stopped"]), probe

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert any("image/png" in out.get("data", {}) for out in outputs), "no loss plot"
  sample_cell = next(cell for cell in nb.cells if "jaxrec.generate(" in cell.source)
  assert _stdout(sample_cell).startswith("def ")
