"""Samples from a trained run: ``python -m experiments.sample --workdir DIR [--config.sample.FIELD=...]``.

The model and tokenizer come from the run's record (``DIR/run.json``), so no model flag is needed;
the prompt and the sampling settings are the ``sample`` fields of the config (the run's own unless
given), e.g. ``--config.sample.prompt='class ' --config.sample.temperature=0.5``.
"""

from absl import app, flags

from experiments import _cli
from jaxrec.train import restore_model, sample_pieces

_CONFIG = _cli.define_config_flag("The run's config file (the run record takes precedence).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (holds checkpoints/).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with _cli.short_errors():
    model, tokenizer, config = restore_model(
      _CONFIG.value, _WORKDIR.value, given=_cli.given_fields(_CONFIG)
    )
  print(config.sample.prompt, end="", flush=True)
  for piece in sample_pieces(model, tokenizer, config.sample):  # as the tokens are decoded
    print(piece, end="", flush=True)
  print()


if __name__ == "__main__":
  _cli.run(main)
