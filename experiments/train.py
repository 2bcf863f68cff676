"""Trains a language model: ``python -m experiments.train --workdir DIR [--config.FIELD=VALUE ...]``.

The config is ``experiments/configs/default.py`` unless ``--config`` names another file; every
field can be overridden, e.g. ``--config.model.preset=tiny --config.steps=100``. This file only
parses flags; the loop is ``jaxrec.train.train_and_evaluate``.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrec.train import ConfigError, train_and_evaluate

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file(
  "config", _DEFAULT_CONFIG, "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["workdir"])


class _OrbaxWarningsOnly(std_logging.Filter):
  """Orbax logs every step of every checkpoint write at INFO; keep only its warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_OrbaxWarningsOnly())
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
