"""A training run an experiment needs once: trained into its directory, reused when finished."""

import copy
import os
import time

from absl import logging

from jaxrec import train
from jaxrec.train import checkpoint


def train_unless_finished(run, run_dir: str, *, name: str, progress: bool) -> None:
  """Trains the launcher config ``run`` into ``run_dir`` unless its checkpoint has reached
  ``run.steps``; an interrupted run resumes. ``name`` labels the log lines."""
  run = copy.deepcopy(run)
  try:
    saved = checkpoint.check_directory(
      os.path.join(run_dir, checkpoint.CHECKPOINT_DIR), resume=True
    )
  except FileNotFoundError:
    saved = []
  if saved and saved[-1] >= run.steps:
    logging.info("%s: reusing %s (step %d)", name, run_dir, saved[-1])
    return
  run.resume = bool(saved)
  run.progress = progress
  start = time.perf_counter()
  train.train_and_evaluate(run, run_dir)
  logging.info("%s trained in %.0f s", name, time.perf_counter() - start)
