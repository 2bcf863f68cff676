"""Training metrics: a progress bar, ``metrics.jsonl`` in the work directory, a loss plot.

Each JSONL line is one record ``{"step": int, "split": "train" | "validation", <name>: float}``.
A resumed run appends to the same file, starting after its checkpoint's step, so the steps that an
interrupted run logged after its last checkpoint appear twice, recomputed identically; readers
(``read_metrics``, the plot) keep the last record per ``(split, step)``. A fresh run never appends
to another run's file (``run_record.set_aside_leftovers``).
"""

import json
import math
import os
import sys
from collections.abc import Mapping

import numpy as np
import tqdm
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxrec.data import ByteTokenizer

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLE_FILE = "sample.txt"
TENSORBOARD_DIR = "tensorboard"


def token_byte_lengths(tokenizer) -> np.ndarray | None:
  """``[vocab_size]`` UTF-8 bytes per token id, or ``None`` when the tokenizer cannot say.

  For the byte tokenizer, ids ``0..255`` are one byte each and the special ids (pad, bos, eos)
  stand for no text. Subword tokenizers do not expose an exact byte count per id (byte-fallback
  pieces and merges decode differently in context), so they get ``None`` and the trainer reports
  bits per token.
  """
  if isinstance(tokenizer, ByteTokenizer):
    lengths = np.zeros(tokenizer.vocab_size, np.int32)
    lengths[:256] = 1
    return lengths
  return None


class MetricsWriter:
  """Appends metric records to ``<workdir>/metrics.jsonl`` and drives a progress bar.

  Args:
    workdir: where ``metrics.jsonl`` lives.
    total_steps: length of the run, for the bar.
    initial_step: where the bar starts (the restored step when resuming); records of later steps,
      which an interrupted run wrote after its last checkpoint and the resumed run repeats, are
      dropped from the file.
    progress: show a tqdm bar; by default only when stderr is a terminal.
    write: write the file and show the bar; ``False`` on all but one process of a multi-process
      run, which then only logs.
    tensorboard: also write every record's values as TensorBoard scalars (``split/name``) into
      ``<workdir>/tensorboard`` (tensorboardX's event files), and ``text`` there.
  """

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    initial_step: int = 0,
    progress: bool | None = None,
    *,
    write: bool = True,
    tensorboard: bool = False,
  ):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._file = None
    self._board = _board(workdir) if write and tensorboard else None
    if write:
      os.makedirs(workdir, exist_ok=True)
      if initial_step and os.path.exists(self.path):
        _drop_after(self.path, initial_step)
      self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — closed in close()
    enabled = write and (sys.stderr.isatty() if progress is None else progress)
    self._bar = tqdm.tqdm(
      total=total_steps, initial=initial_step, disable=not enabled, dynamic_ncols=True
    )

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    if self._board is not None:
      for name, value in record.items():
        if name not in ("step", "split"):
          self._board.add_scalar(f"{split}/{name}", value, int(step))
    if self._bar.disable:  # no terminal (a batch job's log): one line per record instead
      shown = {k: v for k, v in record.items() if k not in ("step", "split", "batch_checksum")}
      values = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
      logging.info("step %d %s: %s", step, split, values)
    elif split == "train" and "loss" in metrics:
      self._bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", refresh=False)

  def advance(self, steps: int = 1) -> None:
    self._bar.update(steps)

  def text(self, tag: str, text: str, step: int) -> None:
    """``text`` under ``tag`` in TensorBoard's text tab (nothing without ``tensorboard``)."""
    if self._board is not None:
      self._board.add_text(tag, text, int(step))

  def close(self) -> None:
    self._bar.close()
    if self._file is not None:
      self._file.close()
    if self._board is not None:
      self._board.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _board(workdir: str):
  from tensorboardX import SummaryWriter

  return SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))


def write_text(workdir: str, tag: str, text: str, step: int) -> None:
  """``text`` under ``tag`` in the TensorBoard event files of ``workdir``."""
  board = _board(workdir)
  board.add_text(tag, text, int(step))
  board.close()


def _drop_after(path: str, step: int) -> None:
  """Rewrites the records file ``path`` without the records of steps after ``step``."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> dict[str, dict[int, dict[str, float]]]:
  """``{split: {step: record}}`` from ``metrics.jsonl``, the last record per step winning."""
  out: dict[str, dict[int, dict[str, float]]] = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        out.setdefault(record["split"], {})[record["step"]] = record
  return out


def plot_losses(workdir: str) -> str:
  """Plots train and validation loss (bits per byte or per token) against step; returns the PNG."""
  records = read_metrics(workdir)
  # An Agg canvas on a bare Figure: no pyplot, so no global backend switch (notebooks keep theirs).
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for split, style in (("train", "-"), ("validation", "o-")):
    steps = sorted(records.get(split, {}))
    if not steps:
      continue
    first = records[split][steps[0]]
    key = "bits_per_byte" if "bits_per_byte" in first else "bits_per_token"
    values = [records[split][s].get(key, math.nan) for s in steps]
    ax.plot(steps, values, style, label=f"{split} ({key.replace('_', ' ')})")
  ax.set_xlabel("step")
  ax.set_ylabel("bits")
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, PLOT_FILE)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
