"""Samples from a trained run: ``python -m experiments.sample --workdir DIR [--config.sample.FIELD=...]``.

Pass the same ``--config`` file and model overrides the run was trained with; the prompt and the
sampling settings are the ``sample`` fields of the config, e.g.
``--config.sample.prompt='class ' --config.sample.temperature=0.5``.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from jaxrec.train import ConfigError, restore_model, sample_text

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (holds checkpoints/).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    model, tokenizer = restore_model(config, _WORKDIR.value)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e
  print(config.sample.prompt + sample_text(model, tokenizer, config.sample))


if __name__ == "__main__":
  app.run(main)
