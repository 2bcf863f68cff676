"""Trains a language model: ``python -m experiments.train --workdir DIR [--config.FIELD=VALUE ...]``.

The config is ``experiments/configs/default.py`` unless ``--config`` names another file; every
field can be overridden, e.g. ``--config.model.preset=small-hybrid --config.steps=100``. The run
records its model, tokenizer and data in ``DIR/run.json``: ``--config.resume=True`` and
``--config.init_from=DIR`` rebuild them from there, so only what changes needs a flag. This file
only parses flags; the loop is ``jaxrec.train.train_and_evaluate``.
"""

from absl import app, flags

from experiments import _cli
from jaxrec.train import train_and_evaluate

_CONFIG = _cli.define_config_flag("Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, given=_cli.given_fields(_CONFIG))


if __name__ == "__main__":
  _cli.run(main)
