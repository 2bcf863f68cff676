"""What the launchers share: the ``--config`` flag, the fields given on the command line, and
errors a user can cause printed as a few lines instead of a traceback.

A mistyped config field (``--config.stpes=10``) is found by ``ml_collections`` while it parses the
config: at flag definition when ``--config`` is left at its default, else while absl parses the
command line. Both places report it as ``--config.stpes: no such field ... Did you mean "steps"``.
"""

import contextlib
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrec.train import CheckpointError, ConfigError

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

# What a user can cause and fix from the message alone: bad flags, a workdir that does not fit the
# command (missing, already used, a file), a damaged or different checkpoint.
_USER_ERRORS = (
  ConfigError,
  CheckpointError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
)


def define_config_flag(help_string: str, default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
  """``--config``: an experiment config file (default ``configs/default.py``), each field
  overridable as ``--config.FIELD=VALUE``."""
  try:
    return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
  except (KeyError, AttributeError) as e:
    sys.exit(_unknown_field(e))


def given_fields(config_flag: flags.FlagHolder) -> set[str]:
  """The dotted config fields given on the command line (``model.num_layers``, ``steps``)."""
  return set(config_flags.get_override_values(flags.FLAGS[config_flag.name]))


def run(main) -> None:
  """``app.run(main)``, with mistyped config fields reported in a line and orbax's per-step INFO
  logs dropped."""
  logging.get_absl_handler().addFilter(_OrbaxWarningsOnly())
  app.run(main, flags_parser=_parse_flags)


@contextlib.contextmanager
def short_errors():
  """Exits with the message of an error the user can fix (it names the flag), no traceback."""
  try:
    yield
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    sys.exit(_unknown_field(e))


def _unknown_field(error: Exception) -> str:
  """``--config.stpes: no such field in the config. Did you mean "steps" instead of "stpes"?``"""
  # ml_collections raises AttributeError(KeyError("'stpes'\nDid you mean ...")).
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  key, _, hint = str(message).partition("\n")
  key = key.strip("'\"")
  flag = next(
    (
      arg.split("=", 1)[0]
      for arg in sys.argv[1:]
      if arg.startswith("--config.") and key in arg.split("=", 1)[0].split(".")
    ),
    f"--config.{key}",
  )
  return f"error: {flag}: no such field in the config. {hint}".rstrip()


class _OrbaxWarningsOnly(std_logging.Filter):
  """Orbax logs every step of every checkpoint write at INFO; keep only its warnings, less the one
  about the read-only manager that reading another run's checkpoint opens on purpose."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and not record.getMessage().startswith(
      "Given directory is read only"
    )
