"""The run record, ``<workdir>/run.json``: what a run is, so that it can be resumed, continued and
sampled without repeating its flags.

A fresh run writes it before its first step, atomically (a temporary file renamed over)::

  {"format": 2,
   "model": {every LMConfig field and option group, resolved (LMConfig.to_dict)},
   "parameters": 10293824,
   "tokenizer": {"spec": "byte"} or {"spec": <path given>, "file": "tokenizer.json", "sha256": ...},
   "data": {"train": ..., "validation": ..., "seq_len": ...},
   "config": {the experiment config as run, model fields as given},
   "history": [{"event": "start", ...}, {"event": "resume", "step": 200, "changed": {...}}, ...]}

A HuggingFace ``tokenizer.json`` is copied into the workdir, so the run does not depend on the
original file. ``resolve`` turns a command's config into the config to run:

* ``--config.resume=True`` and ``experiments.sample`` take everything from the workdir's record;
  the flags given on the command line must agree with it, except those a later command may
  change (``_RESUME_MAY_CHANGE``: more steps, the mesh and processes, logging, evaluation and
  checkpoint cadence, sampling; ``_SAMPLE_MAY_CHANGE``: the mesh, processes and sampling).
* ``--config.init_from=RUN`` takes the model and tokenizer from ``RUN``'s record; flags given for
  them must agree with it. Everything else (data, optimizer, schedule, steps) is the new run's.

Flags that disagree stop the command with one message that lists each as flag, recorded value and
given value. A run without a record (made before records existed) is rebuilt from the flags as
given, with a warning. A record of format 1, written before the model's options were grouped,
names them flat (``gla_chunk_size``, ``moe_top_k``, ``window``); ``read`` returns it in format 2
(``gla.chunk_size``, ...: ``jaxrec.models.config.FLAT_NAMES``), and a resume writes it back so.
"""

import copy
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Collection, Mapping
from typing import Any

import ml_collections
from absl import logging

from jaxrec.models import LMConfig
from jaxrec.models.config import group_flat_names
from jaxrec.train import checkpoint, metrics
from jaxrec.train.config_checks import ConfigError, parse_list

RECORD_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = 2
# Format 1: the model's options under their flat names (``LMConfig`` before option groups).
_FLAT_FORMAT = 1
_BYTE = "byte"

# Dotted config fields, or whole sections, that may differ from the record.
_RESUME_MAY_CHANGE = (
  "steps",
  "grad_accum_steps",
  "resume",
  "mesh",
  "multihost",
  "distributed",
  "log_every",
  "eval_every",
  "eval_batches",
  "checkpoint_every",
  "max_to_keep",
  "progress",
  "tensorboard",
  "profile_steps",
  "sample",
)
_SAMPLE_MAY_CHANGE = ("mesh", "multihost", "distributed", "sample")
# How this process is launched, not what the run is: always the command's (a run started on two
# hosts resumes on one without rejoining a coordinator that no longer exists).
_LAUNCH = ("multihost", "distributed")
# What --config.init_from takes from the source run; the rest is the new run's own.
_SOURCE_FIELDS = ("model", "data.tokenizer")


def resolve(
  config: ml_collections.ConfigDict,
  workdir: str,
  given: Collection[str] | None = None,
  *,
  purpose: str = "train",
) -> ml_collections.ConfigDict:
  """The config to run: ``config`` completed from the run record that applies.

  Args:
    config: the command's experiment config.
    workdir: the run's directory.
    given: the dotted fields given on the command line (``config_flags.get_override_values``);
      ``None`` counts every field of ``config`` that is set (a library caller's complete config).
    purpose: ``"train"`` (a fresh run, ``resume`` or ``init_from``) or ``"sample"``.

  Returns:
    A new config. With a record: the recorded config, the model fields set to the recorded
    ``LMConfig``, ``data.tokenizer`` pointing at the record's copy, and the given fields that may
    change applied.

  Raises:
    ConfigError: a given flag disagrees with the record (all are listed).
  """
  if purpose not in ("train", "sample"):
    raise ValueError(f"purpose: expected 'train' or 'sample', got {purpose!r}")
  flat = _flatten(config.to_dict())
  given = {k for k, v in flat.items() if v is not None} if given is None else set(given)
  if purpose == "sample" or config.resume:
    record = _read_or_warn(workdir)
    if record is None:
      return config
    may_change = _SAMPLE_MAY_CHANGE if purpose == "sample" else _RESUME_MAY_CHANGE
    out, disagreements = _follow(
      config, record, workdir, given, lambda p: not _under(p, may_change), rest_from_record=True
    )
    what = "experiments.sample" if purpose == "sample" else "--config.resume"
    _raise_on(disagreements, f"{what} takes the run from {_path(workdir)}")
    return out
  if config.init_from:
    record = _read_or_warn(config.init_from)
    if record is None:
      return config
    out, disagreements = _follow(
      config,
      record,
      config.init_from,
      given,
      lambda p: _under(p, _SOURCE_FIELDS),
      rest_from_record=False,
    )
    _raise_on(
      disagreements,
      f"--config.init_from={config.init_from} takes the model and tokenizer from "
      f"{_path(config.init_from)}",
    )
    return out
  return config


def read(workdir: str) -> dict[str, Any] | None:
  """The record in ``workdir``, or ``None`` if it has none."""
  path = _path(workdir)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"--workdir: {path} is not a readable run record ({e})") from e
  if record.get("format") == _FLAT_FORMAT:
    return _grouped(record)
  if record.get("format") != _FORMAT:
    raise ConfigError(
      f"--workdir: {path} has record format {record.get('format')!r}; this version of jaxrec "
      f"reads formats {_FLAT_FORMAT} and {_FORMAT}"
    )
  return record


def _grouped(record: dict[str, Any]) -> dict[str, Any]:
  """A format-1 record in format 2: the flat option names of its model, and of its config's
  model section, moved into their groups (``gla_chunk_size`` to ``gla.chunk_size``)."""
  record = {**record, "format": _FORMAT, "model": group_flat_names(record["model"])}
  if isinstance(record.get("config", {}).get("model"), Mapping):
    record["config"] = {**record["config"], "model": group_flat_names(record["config"]["model"])}
  return record


def write(
  workdir: str, config: ml_collections.ConfigDict, model: LMConfig, num_params: int
) -> None:
  """Writes the record of a fresh run, copying a ``tokenizer.json`` next to it."""
  os.makedirs(workdir, exist_ok=True)
  spec = config.data.tokenizer
  tokenizer = {"spec": spec}
  if spec != _BYTE:
    _copy_atomically(spec, os.path.join(workdir, TOKENIZER_FILE))
    tokenizer.update(file=TOKENIZER_FILE, sha256=_sha256(spec))
  record = {
    "format": _FORMAT,
    "model": _jsonable(model.to_dict()),
    "parameters": num_params,
    "tokenizer": tokenizer,
    "data": {k: config.data[k] for k in ("train", "validation", "seq_len")},
    "config": _jsonable(config.to_dict()),
    "history": [{"event": "start", "time": _now()}],
  }
  _write_json_atomically(_path(workdir), record)


def note_resume(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """Records a resume at ``step`` and the fields it changed (more steps, ...) in the record."""
  record = read(workdir)
  if record is None:
    return
  recorded = _flatten(record["config"])
  now = _flatten(_jsonable(config.to_dict()))
  # The command's own flag is no property of the run.
  changed = {
    path: [recorded[path], now[path]]
    for path in recorded
    if _under(path, _RESUME_MAY_CHANGE)
    and path != "resume"
    and path in now
    and now[path] != recorded[path]
  }
  for path, (_, value) in changed.items():
    _set(record["config"], path, value)
  record["history"].append({"event": "resume", "step": step, "time": _now(), "changed": changed})
  _write_json_atomically(_path(workdir), record)


def set_aside_leftovers(workdir: str) -> str | None:
  """Moves the files of a run that stopped before its first checkpoint into a dated folder.

  A fresh run calls this once it knows ``workdir`` holds no finished checkpoint, so the new run
  neither appends to the old metrics nor mixes with its plot, sample or record. Other files are
  left alone.

  Returns:
    The folder the leftovers went to, or ``None`` when there were none.
  """
  names = (
    RECORD_FILE,
    TOKENIZER_FILE,
    metrics.METRICS_FILE,
    metrics.PLOT_FILE,
    metrics.SAMPLE_FILE,
    checkpoint.CHECKPOINT_DIR,
  )
  found = [n for n in names if os.path.lexists(os.path.join(workdir, n))]
  if not found:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  target, n = os.path.join(workdir, f"stale-{stamp}"), 1
  while os.path.lexists(target):
    n += 1
    target = os.path.join(workdir, f"stale-{stamp}-{n}")
  os.makedirs(target)
  for name in found:
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  logging.warning(
    "%s held %s of a run that stopped before its first checkpoint: moved to %s; this run "
    "starts anew",
    workdir,
    ", ".join(found),
    target,
  )
  return target


def _follow(config, record, workdir, given, fixed, rest_from_record: bool):
  """``config`` completed from ``record``, and the given fields that disagree with it.

  A field that ``fixed(path)`` selects comes from the record, and a given value must agree with
  it. Any other field keeps a given value; when not given it comes from the record if
  ``rest_from_record`` (but never the launch fields, ``_LAUNCH``), else it keeps ``config``'s.
  """
  out = copy.deepcopy(config)
  flat = _flatten(out.to_dict())
  recorded = _flatten(record["config"])
  # The resolved LMConfig stands for the model fields; the record's copy for the tokenizer file.
  model = {k: v for k, v in record["model"].items() if k != "vocab_size"}
  recorded.update(_flatten(model, "model."))
  tokenizer = record["tokenizer"]
  recorded["data.tokenizer"] = (
    os.path.join(workdir, tokenizer["file"]) if "file" in tokenizer else _BYTE
  )
  disagreements = []
  for path, value in recorded.items():
    if path not in flat:  # a field this version of the config does not have
      continue
    if fixed(path):
      if path in given and not _agrees(path, flat[path], value, tokenizer):
        shown = tokenizer["spec"] if path == "data.tokenizer" else value
        disagreements.append((path, shown, flat[path]))
    elif path in given or not rest_from_record or _under(path, _LAUNCH):
      continue
    _set(out, path, _from_json(out, path, value))
  return out, disagreements


def _from_json(config: ml_collections.ConfigDict, path: str, value):
  """A recorded value as its config field takes it: a JSON list is a comma-separated string for
  a list field (``parse_list``; records before that dialect hold lists), else a tuple."""
  if not isinstance(value, list):
    return value
  *parents, name = path.split(".")
  for parent in parents:
    config = config[parent]
  if config.get_type(name) is str:
    return ",".join(str(v) for v in value)
  return tuple(value)


def _agrees(path: str, value, recorded, tokenizer: Mapping[str, Any]) -> bool:
  if path == "data.tokenizer":
    if "file" not in tokenizer:
      return value == _BYTE
    return os.path.isfile(value) and _sha256(value) == tokenizer["sha256"]
  if isinstance(recorded, list) and isinstance(value, str):  # a list field (``parse_list``)
    return list(parse_list(value, f"--config.{path}")) == [str(v) for v in recorded]
  return _jsonable(value) == recorded


def _raise_on(disagreements, what: str) -> None:
  if not disagreements:
    return
  lines = [
    f"  --config.{path}: recorded {old!r}, given {new!r}" for path, old, new in disagreements
  ]
  raise ConfigError(
    f"{what}; these flags disagree with it (leave them out, or give the recorded values):\n"
    + "\n".join(lines)
  )


def _read_or_warn(workdir: str) -> dict[str, Any] | None:
  record = read(workdir)
  if record is None:
    logging.warning(
      "%s has no run record (%s): the model, tokenizer and data are built from the flags as "
      "given, which must repeat those the run was trained with",
      workdir,
      RECORD_FILE,
    )
  return record


def _under(path: str, prefixes: Collection[str]) -> bool:
  return any(path == p or path.startswith(p + ".") for p in prefixes)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _set(tree, path: str, value) -> None:
  *parents, name = path.split(".")
  for parent in parents:
    tree = tree[parent]
  tree[name] = value


def _jsonable(value):
  """Tuples as lists, as JSON writes them."""
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  return value


def _path(workdir: str) -> str:
  return os.path.join(workdir, RECORD_FILE)


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json_atomically(path: str, record: Mapping[str, Any]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _copy_atomically(source: str, path: str) -> None:
  tmp = f"{path}.tmp"
  shutil.copyfile(source, tmp)
  os.replace(tmp, path)
