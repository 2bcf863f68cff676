"""Tokenizers: a dependency-free UTF-8 byte tokenizer and a wrapper around HuggingFace files.

Both expose the same interface (:class:`Tokenizer`): ``vocab_size``, ``bos_id``, ``eos_id``,
``pad_id``, ``encode(text) -> list[int]`` (no specials added; the pipeline adds ``bos``/``eos``)
and ``decode(ids) -> str`` (specials skipped).
"""

import os
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

_BYTE_SPEC = "byte"
# Names tried, in order, when a tokenizer.json does not say which of its tokens are bos/eos/pad.
_BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the samplers need from a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids ``0..255``, then ``pad = 256``, ``bos = 257``, ``eos = 258``.

  Every string round-trips exactly; ``decode`` drops the special ids and replaces byte sequences
  that are not valid UTF-8 (e.g. a character cut at a packing boundary) with U+FFFD.
  """

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids: expected values in [0, {self.vocab_size}), got {bad[:5]}")
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A HuggingFace ``tokenizers.Tokenizer`` behind the :class:`Tokenizer` interface.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    bos_id, eos_id, pad_id: special ids; ``pad_id`` may equal ``eos_id`` (padding is always
      masked out by ``weights``, so sharing the id is harmless).
  """

  def __init__(self, tokenizer, *, bos_id: int, eos_id: int, pad_id: int):
    self._tokenizer = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self._specials = {bos_id, eos_id, pad_id}

  def encode(self, text: str) -> list[int]:
    # The pipeline adds bos/eos itself, so the file's post-processor template is not applied.
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in self._specials]
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def load_tokenizer(
  spec: str | os.PathLike,
  *,
  bos_token: str | None = None,
  eos_token: str | None = None,
  pad_token: str | None = None,
) -> Tokenizer:
  """Returns the tokenizer named by ``spec``.

  Args:
    spec: ``"byte"`` for :class:`ByteTokenizer`, or the path of a local HuggingFace
      ``tokenizer.json`` (needs the optional ``tokenizers`` package: ``pip install jaxrec[hf]``).
    bos_token, eos_token, pad_token: names of the special tokens in the file; by default the
      usual names (``<s>``, ``</s>``, ``<|endoftext|>``, ``<pad>``, ...) are looked up, and the
      pad id falls back to the eos id.

  Raises:
    FileNotFoundError: ``spec`` is neither ``"byte"`` nor an existing file.
    ImportError: the ``tokenizers`` package is not installed.
    ValueError: a bos/eos/pad token is not in the vocabulary.
  """
  if str(spec) == _BYTE_SPEC:
    return ByteTokenizer()
  path = os.fspath(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"spec: expected 'byte' or a tokenizer.json file, got {path!r}")
  try:
    import tokenizers  # optional dependency, imported only for this path
  except ImportError as e:
    raise ImportError(
      f"spec: loading {path!r} needs the 'tokenizers' package; install it with "
      "`pip install tokenizers` or `pip install jaxrec[hf]`"
    ) from e
  tok = tokenizers.Tokenizer.from_file(path)
  bos_id = _special_id(tok, "bos_token", bos_token, _BOS_NAMES, path)
  eos_id = _special_id(tok, "eos_token", eos_token, _EOS_NAMES, path)
  if pad_token is None and not any(tok.token_to_id(n) is not None for n in _PAD_NAMES):
    pad_id = eos_id
  else:
    pad_id = _special_id(tok, "pad_token", pad_token, _PAD_NAMES, path)
  return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def _special_id(tok, arg: str, name: str | None, defaults: Sequence[str], path: str) -> int:
  names = defaults if name is None else (name,)
  for n in names:
    i = tok.token_to_id(n)
    if i is not None:
      return i
  raise ValueError(
    f"{arg}: expected one of {tuple(names)} in the vocabulary of {path!r}, none found"
  )
