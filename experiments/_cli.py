"""What the launchers share: the ``--config`` flag, the fields given on the command line, and
errors a user can cause printed as a few lines instead of a traceback.

``--help`` prints the launcher's documentation, its flags and every ``--config.*`` field with its
default and the comment the config file gives it, and exits 0; ``--print_config`` prints the
config the command would run (its file and overrides resolved) and exits 0. Logs stay quiet: no
per-step orbax lines and no probe for a TPU backend on a machine without one.

A mistyped config field (``--config.stpes=10``) is found by ``ml_collections`` while it parses the
config: at flag definition when ``--config`` is left at its default, else while absl parses the
command line. Both places report it as ``--config.stpes: no such field ... Did you mean "steps"``.
"""

import contextlib
import glob
import importlib.util
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxrec.train import CheckpointError, ConfigError, TrainingInterrupted

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


# The default config file of the launcher's --config flag (define_config_flag), for --help.
_CONFIG_FILE: list[str] = []


def define_config_flag(help_string: str, default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
  """``--config``: an experiment config file (default ``configs/default.py``), each field
  overridable as ``--config.FIELD=VALUE``; and ``--print_config``."""
  _CONFIG_FILE[:] = [default]
  flags.DEFINE_bool(
    "print_config", False, "Print the config this command would run (overrides applied), exit."
  )
  try:
    return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
  except (KeyError, AttributeError) as e:
    sys.exit(_unknown_field(e))


def given_fields(config_flag: flags.FlagHolder) -> set[str]:
  """The dotted config fields given on the command line (``model.num_layers``, ``steps``)."""
  return set(config_flags.get_override_values(flags.FLAGS[config_flag.name]))


def run(main) -> None:
  """``app.run(main)``, with mistyped config fields reported in a line, ``--help`` and
  ``--print_config`` (see the module docstring), and orbax's per-step INFO logs and the TPU
  probe dropped."""
  logging.get_absl_handler().addFilter(_OrbaxWarningsOnly())
  logging.get_absl_handler().addFilter(_NoBackendProbe())

  app.run(main, flags_parser=_parse_flags)


@contextlib.contextmanager
def short_errors():
  """Exits with the message of an error the user can fix (it names the flag), no traceback."""
  try:
    yield
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")
  except TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signal_number)


def _parse_flags(argv: list[str]) -> list[str]:
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in argv[1:]):
    print(_help(argv))
    sys.exit(0)
  printing = any(re.fullmatch(r"--print_config(=(true|True|1))?", a) for a in argv[1:])
  if printing and "config" in flags.FLAGS:
    try:
      flags.FLAGS(argv)
    except flags.IllegalFlagValueError:
      pass  # a required flag (--workdir) is not needed to print the config
    except (KeyError, AttributeError) as e:
      sys.exit(_unknown_field(e))
    print(flags.FLAGS.config)
    sys.exit(0)
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


def _help(argv: list[str]) -> str:
  """The launcher's docstring, its own flags, and its config's fields (``--config.FIELD``,
  default, the config file's comment on it)."""
  main = sys.modules.get("__main__")
  parts = [(getattr(main, "__doc__", None) or "").strip()]
  own = flags.FLAGS.main_module_help().strip()
  if own:
    parts.append(own)
  shared = flags.FLAGS.module_help("experiments._results").strip()  # --publish
  if shared:
    parts.append(shared)
  given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  path = given[-1] if given else (_CONFIG_FILE[0] if _CONFIG_FILE else None)
  if path and os.path.isfile(path):
    parts.append(_config_help(path))
  parts.append(
    "--print_config prints the resolved config and exits; --helpfull lists every flag of the "
    "libraries too."
  )
  return "\n\n".join(p for p in parts if p)


def _config_help(path: str) -> str:
  """``--config.FIELD=DEFAULT  comment`` for every field of the config file ``path``."""
  spec = importlib.util.spec_from_file_location("_config_for_help", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  docs = {}
  # The comments of the config's own file win over those of the files it builds on.
  for source in [*sorted(glob.glob(os.path.join(os.path.dirname(path), "*.py"))), path]:
    docs |= _field_comments(source)
  lines = [f"Config fields ({path}; set with --config.FIELD=VALUE):"]
  for field, value in _fields(config):
    doc = docs.get(field, "")
    lines.append(f"  --config.{field}={value!r}" + (f"\n      {doc}" if doc else ""))
  return "\n".join(lines)


def _fields(config, prefix: str = ""):
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


_ASSIGNMENT = re.compile(r"^\s*(?:config|run)\.([\w.]+)\s*=\s*[^#]*?(?:#\s*(.*))?$")


def _field_comments(path: str) -> dict[str, str]:
  """``{field: comment}`` from ``config.FIELD = value  # comment`` lines of ``path``, or the
  comment lines right above the assignment."""
  out, above = {}, []
  with open(path, encoding="utf-8") as f:
    for line in f:
      stripped = line.strip()
      if stripped.startswith("#"):
        above.append(stripped.lstrip("# ").rstrip())
        continue
      match = _ASSIGNMENT.match(line)
      if match:
        text = match.group(2) or " ".join(above)
        if text:
          out[match.group(1)] = text
      above = []
  return out


class _NoBackendProbe(std_logging.Filter):
  """JAX looks for a TPU at start-up and logs "Unable to initialize backend 'tpu'" where there is
  none: noise on a CPU or GPU machine."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unable to initialize backend")


class _OrbaxWarningsOnly(std_logging.Filter):
  """Orbax logs every step of every checkpoint write at INFO; keep only its warnings, less the one
  about the read-only manager that reading another run's checkpoint opens on purpose."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    return record.levelno >= std_logging.WARNING and not record.getMessage().startswith(
      "Given directory is read only"
    )
