"""Document corpora: lazy sequences of ``str``, one element per document.

A corpus only stores where each document lives (file, byte offset, line number) and reads the text
when indexed, so it is cheap to build over large files, picklable for grain worker processes and
usable directly as a ``grain.MapDataset.source``.

* :func:`stdlib_corpus`: the embedded default, the ``*.py`` files of the running interpreter's
  standard library; no download, deterministic, with a hashed train/validation split.
* :func:`python_reference_corpus`: English prose, the Python language and library reference
  topics that ship with every Python (``pydoc_data.topics``, about 465k characters).
* :func:`text_file_corpus`: local ``.txt`` files (one document per file) and ``.jsonl`` files (one
  document per non-blank line, taken from a string field).
"""

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

SPLITS = ("train", "validation")
# Standard-library folders left out of the default corpus: third-party code, the test suites,
# GUI/demo code and generated data tables (codec maps, pydoc topics) that are not typical code.
_STDLIB_EXCLUDED = frozenset(
  {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "encodings",
    "pydoc_data",
    "__phello__",
    "__pycache__",
  }
)


class DocumentCorpus(Sequence):
  """Documents read lazily from files.

  Element ``i`` is the whole file ``paths[file_index[i]]`` when ``offsets[i] < 0``, otherwise the
  string field ``text_field`` of the JSON object on the line starting at byte ``offsets[i]``.
  """

  def __init__(
    self,
    paths: Sequence[str],
    file_index: np.ndarray,
    offsets: np.ndarray,
    line_numbers: np.ndarray,
    text_field: str = "text",
  ):
    self.paths = tuple(paths)
    self.text_field = text_field
    self._file_index = np.asarray(file_index, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._line_numbers = np.asarray(line_numbers, np.int64)

  def __len__(self) -> int:
    return len(self._file_index)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index: expected a value in [0, {len(self)}), got {index}")
    path = self.paths[self._file_index[index]]
    offset = int(self._offsets[index])
    if offset < 0:
      with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
    with open(path, "rb") as f:
      f.seek(offset)
      line = f.readline()
    return _jsonl_text(line, path, int(self._line_numbers[index]), self.text_field)

  def __repr__(self) -> str:
    return f"DocumentCorpus({len(self)} documents from {len(self.paths)} files)"


def stdlib_corpus(
  split: str = "train",
  *,
  validation_fraction: float = 0.02,
  max_files: int | None = None,
  max_bytes: int | None = None,
  root: str | None = None,
) -> DocumentCorpus:
  """The ``*.py`` files of the Python standard library, one document per file.

  Files are listed in sorted order of their path relative to ``root`` and leave out third-party,
  test, GUI, demo and generated modules. A file is in the validation split when the SHA-256 of its
  relative path, read as a number in ``[0, 1)``, is below ``validation_fraction``; the split is
  therefore the same on every machine with the same Python version, and stable when files are
  added.

  Args:
    split: ``"train"`` or ``"validation"``.
    validation_fraction: share of files held out, in ``[0, 1)``.
    max_files: keep at most this many files of the split (the first in sorted order).
    max_bytes: stop adding files (in sorted order) once their total size reaches this many bytes;
      the last file kept may cross the limit, so at least one file is always kept.
    root: the standard-library folder; default ``sysconfig.get_paths()["stdlib"]``.
  """
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction: expected a value in [0, 1), got {validation_fraction}")
  _check_positive_or_none("max_files", max_files)
  _check_positive_or_none("max_bytes", max_bytes)
  root = root or sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise FileNotFoundError(f"root: expected the standard-library folder, got {root!r}")

  paths, total = [], 0
  for rel in _stdlib_files(root):
    if (_path_fraction(rel) < validation_fraction) != (split == "validation"):
      continue
    if (max_files is not None and len(paths) >= max_files) or (
      max_bytes is not None and total >= max_bytes
    ):
      break
    path = os.path.join(root, rel)
    paths.append(path)
    total += os.path.getsize(path)
  if not paths:
    raise ValueError(f"root: no standard-library files for split {split!r} under {root!r}")
  n = len(paths)
  return DocumentCorpus(paths, np.arange(n), np.full(n, -1), np.zeros(n))


def python_reference_corpus(split: str = "train", *, validation_fraction: float = 0.1) -> list[str]:
  """The topics of the Python reference that ``help()`` shows (``pydoc_data.topics``: the
  language reference's sections on statements, expressions, the data model, ...), one document per
  topic, in sorted order of their names: real English text (with code examples) shipped with every
  Python, for evaluating pretrained models without a download.

  A topic is in the validation split when the SHA-256 of its name, read as a number in ``[0, 1)``,
  is below ``validation_fraction`` (the same on every machine with the same Python version).

  Args:
    split: ``"train"`` or ``"validation"``.
    validation_fraction: share of topics held out, in ``[0, 1)``.
  """
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction: expected a value in [0, 1), got {validation_fraction}")
  from pydoc_data.topics import topics

  docs = [
    topics[name]
    for name in sorted(topics)
    if (_path_fraction(name) < validation_fraction) == (split == "validation")
  ]
  if not docs:
    raise ValueError(f"validation_fraction: no topics in split {split!r} at {validation_fraction}")
  return docs


def text_file_corpus(
  paths_or_globs: str | os.PathLike | Iterable[str | os.PathLike], *, text_field: str = "text"
) -> DocumentCorpus:
  """Documents from local ``.txt`` and ``.jsonl`` files.

  A ``.txt`` file is one document (its whole text). A ``.jsonl`` file holds one JSON object per
  line, whose string field ``text_field`` is one document; blank lines are skipped. The ``.jsonl``
  files are scanned once for line offsets here; each line is parsed when its document is read, so
  a malformed line raises there, naming the file and the line.

  Args:
    paths_or_globs: a path or glob pattern, or a sequence of them; globs expand in sorted order.
    text_field: field of each JSON object that holds the document.

  Raises:
    FileNotFoundError: a path does not exist or a pattern matches nothing.
    ValueError: a file is neither ``.txt`` nor ``.jsonl``, is unreadable, a ``.txt`` file holds
      no text (only whitespace), or there are no documents. (A ``.jsonl`` line whose text is
      empty raises when it is read, naming the file and the line.)
  """
  if isinstance(paths_or_globs, str | os.PathLike):
    paths_or_globs = [paths_or_globs]
  paths = []
  for pattern in map(os.fspath, paths_or_globs):
    if glob.has_magic(pattern):
      matches = sorted(glob.glob(pattern, recursive=True))
      if not matches:
        raise FileNotFoundError(f"paths_or_globs: pattern {pattern!r} matches no file")
      paths.extend(matches)
    elif os.path.isfile(pattern):
      paths.append(pattern)
    else:
      raise FileNotFoundError(f"paths_or_globs: no such file {pattern!r}")

  file_index, offsets, lines = [], [], []
  for i, path in enumerate(paths):
    if not os.access(path, os.R_OK):
      raise ValueError(f"paths_or_globs: {path!r} is not readable")
    if path.endswith(".txt"):
      if _blank(path):
        raise ValueError(
          f"paths_or_globs: {path!r} holds no text (a document must have some); remove it"
        )
      file_index.append(i)
      offsets.append(-1)
      lines.append(0)
    elif path.endswith(".jsonl"):
      for line_number, offset in _nonblank_lines(path):
        file_index.append(i)
        offsets.append(offset)
        lines.append(line_number)
    else:
      raise ValueError(f"paths_or_globs: expected .txt or .jsonl files, got {path!r}")
  if not file_index:
    raise ValueError(f"paths_or_globs: no documents in {paths}")
  return DocumentCorpus(paths, file_index, offsets, lines, text_field=text_field)


def _stdlib_files(root: str) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    # config-3.x-<platform> holds the build's Makefile and python-config.py, not library code.
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED and not d.startswith("config-")]
    rel_dir = os.path.relpath(dirpath, root)
    files.extend(os.path.normpath(os.path.join(rel_dir, f)) for f in filenames if f.endswith(".py"))
  return sorted(files)


def _path_fraction(rel_path: str) -> float:
  # Hash the '/'-separated path so the split does not depend on the OS path separator.
  digest = hashlib.sha256(rel_path.replace(os.sep, "/").encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _nonblank_lines(path: str) -> Iterable[tuple[int, int]]:
  """Yields ``(line_number, byte_offset)`` of every non-blank line, streaming the file."""
  offset = 0
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        yield line_number, offset
      offset += len(line)


def _blank(path: str) -> bool:
  """Whether the file holds only whitespace (read in blocks, stopping at the first text)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    while block := f.read(1 << 16):
      if block.strip():
        return False
  return True


def _jsonl_text(line: bytes, path: str, line_number: int, text_field: str) -> str:
  where = f"{path}:{line_number}"
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: expected a JSON object, got invalid JSON ({e.msg})") from e
  if not isinstance(record, dict) or text_field not in record:
    raise ValueError(f"{where}: expected a JSON object with field {text_field!r} (text_field)")
  text = record[text_field]
  if not isinstance(text, str):
    raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
  if not text.strip():
    raise ValueError(f"{where}: field {text_field!r} holds no text (a document must have some)")
  return text


def _check_positive_or_none(name: str, value: int | None) -> None:
  if value is not None and value <= 0:
    raise ValueError(f"{name}: expected None or a positive integer, got {value}")
