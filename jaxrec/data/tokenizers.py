"""Tokenizers: a dependency-free UTF-8 byte tokenizer and a wrapper around HuggingFace files.

Both expose the same interface (:class:`Tokenizer`): ``vocab_size``, ``bos_id``, ``eos_id``,
``pad_id``, ``encode(text) -> list[int]`` (no specials added; the pipeline adds ``bos``/``eos``)
and ``decode(ids) -> str`` (specials skipped). An ``HFTokenizer`` also renders its checkpoint's
chat template (``apply_chat_template``) and writes itself back as Hugging Face files (``save``).
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from jaxrec.data.chat_template import render_chat_template

_BYTE_SPEC = "byte"
# Names tried, in order, for a tokenizer.json with no tokenizer_config.json or
# special_tokens_map.json beside it to say which of its tokens are bos/eos/pad.
_BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 writes the template


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the samplers need from a tokenizer."""

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str: ...


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

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """The text of the byte ids; the special ids have no text and are always dropped."""
    del skip_special_tokens
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
    bos_id, eos_id, pad_id: special ids, ``None`` where the checkpoint does not say which token it
      is (listed in ``unknown_specials``; whatever needs one then raises instead of guessing).
      ``pad_id`` may equal ``eos_id`` (padding is always masked out by ``weights``, so sharing
      the id is harmless).
    unk_id: the unknown token's id, if the checkpoint names one (a byte-level BPE never emits
      it; it is kept to be written back and shown to chat templates).
    chat_template: the Jinja chat template of the checkpoint (``tokenizer_config.json``), if any.
  """

  def __init__(
    self,
    tokenizer,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    unk_id: int | None = None,
    chat_template: str | None = None,
  ):
    self._tokenizer = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.unk_id = unk_id
    self.chat_template = chat_template
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self._specials = {i for i in (bos_id, eos_id, pad_id) if i is not None}

  @property
  def unknown_specials(self) -> tuple[str, ...]:
    """The names (``"bos"``, ``"eos"``, ``"pad"``) of the special ids nobody said."""
    ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}
    return tuple(name for name, i in ids.items() if i is None)

  def encode(self, text: str) -> list[int]:
    # The pipeline adds bos/eos itself, so the file's post-processor template is not applied.
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """The text of ``ids``; with ``skip_special_tokens=False`` the special tokens are written
    out (``<|im_start|>user``...), as transformers' ``decode`` does by default."""
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._specials]
    return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

  @property
  def special_tokens(self) -> dict[str, str]:
    """``{"bos_token": "<s>", ...}``: the special tokens the checkpoint names, by text."""
    ids = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id}
    return {f"{k}_token": self._tokenizer.id_to_token(i) for k, i in ids.items() if i is not None}

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **context
  ) -> str:
    """The prompt text of ``messages`` (``[{"role": "user", "content": ...}, ...]``) under the
    checkpoint's chat template, rendered as transformers does (``render_chat_template``) with
    the special tokens in the context; ``encode`` it for the ids.

    Raises:
      ValueError: the checkpoint has no chat template, or the template refused the messages.
    """
    if self.chat_template is None:
      raise ValueError(
        f"messages: {self!r} has no chat template (its checkpoint's tokenizer_config.json names "
        "none)"
      )
    return render_chat_template(
      self.chat_template,
      messages,
      add_generation_prompt=add_generation_prompt,
      **{**self.special_tokens, **context},
    )

  def save(self, folder: str | os.PathLike, *, model_max_length: int | None = None) -> list[str]:
    """Writes ``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens and
    holding the chat template, which transformers' ``AutoTokenizer`` and ``load_tokenizer``
    read back to the same tokenizer. Returns the files written (relative to ``folder``)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    self._tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **self.special_tokens,
      # The pipeline adds bos/eos itself; transformers must not add them either.
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
      config["model_max_length"] = model_max_length
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    with open(os.path.join(folder, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
      f.write("\n")
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]

  def __repr__(self) -> str:
    unknown = f", unknown={self.unknown_specials}" if self.unknown_specials else ""
    return (
      f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
      f"pad_id={self.pad_id}{unknown})"
    )


def require_specials(tokenizer: Tokenizer, names: Sequence[str], purpose: str) -> None:
  """Raises ``ValueError`` naming the tokenizer and the fix when any of the special ids ``names``
  (``"bos"``, ``"eos"``, ``"pad"``) that ``purpose`` needs is unknown."""
  missing = [n for n in names if getattr(tokenizer, f"{n}_id", None) is None]
  if missing:
    raise ValueError(
      f"tokenizer: {purpose} needs the {'/'.join(missing)} token id(s), which {tokenizer!r} does "
      "not know; put the checkpoint's tokenizer_config.json (or special_tokens_map.json) beside "
      "its tokenizer.json, or name them with load_tokenizer(..., bos_token=, eos_token=, "
      "pad_token=)"
    )


def load_tokenizer(
  spec: str | os.PathLike,
  *,
  bos_token: str | None = None,
  eos_token: str | None = None,
  pad_token: str | None = None,
) -> Tokenizer:
  """Returns the tokenizer named by ``spec``.

  The special tokens of a ``tokenizer.json`` come from, in order: the arguments; the
  ``tokenizer_config.json`` (then ``special_tokens_map.json``) beside the file, as transformers
  reads them; for a file alone, the usual names (``<s>``, ``</s>``, ``<|endoftext|>``,
  ``<pad>``, ...). A token none of these names stays unknown (``None``, listed in
  ``tokenizer.unknown_specials``) rather than defaulting to some id; the pad id falls back to the
  eos id.

  Args:
    spec: ``"byte"`` for :class:`ByteTokenizer`, or the path of a local HuggingFace
      ``tokenizer.json`` (needs the optional ``tokenizers`` package: ``pip install jaxrec[hf]``).
    bos_token, eos_token, pad_token: names of the special tokens in the file.

  Raises:
    FileNotFoundError: ``spec`` is neither ``"byte"`` nor an existing file.
    ImportError: the ``tokenizers`` package is not installed.
    ValueError: a named bos/eos/pad token is not in the vocabulary.
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
  config, config_file = _checkpoint_config(os.path.dirname(path))
  given = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
  guesses = {"bos": _BOS_NAMES, "eos": _EOS_NAMES, "pad": _PAD_NAMES}
  ids = {}
  for name, token in given.items():
    if token is not None:
      ids[name] = _token_id(tok, f"{name}_token", token, path)
    elif config_file is not None:
      # The checkpoint says; a key it leaves out or null is unknown, not guessed.
      named = config.get(f"{name}_token")
      ids[name] = None if named is None else _token_id(tok, f"{name}_token", named, config_file)
    else:
      ids[name] = next(
        (tok.token_to_id(n) for n in guesses[name] if tok.token_to_id(n) is not None), None
      )
  if ids["pad"] is None:
    ids["pad"] = ids["eos"]
  unk = config.get("unk_token")
  return HFTokenizer(
    tok,
    bos_id=ids["bos"],
    eos_id=ids["eos"],
    pad_id=ids["pad"],
    unk_id=None if unk is None else tok.token_to_id(unk),
    chat_template=config.get("chat_template"),
  )


def _checkpoint_config(folder: str) -> tuple[dict, str | None]:
  """The special tokens and chat template that transformers would read beside a
  ``tokenizer.json``: ``tokenizer_config.json``, whose entries ``special_tokens_map.json``
  overrides (as ``PreTrainedTokenizerBase.from_pretrained`` does), and the template of
  ``chat_template.jinja`` over the config's (or the config's one named ``"default"`` when it
  lists several). Token entries are names (an ``AddedToken`` dict becomes its ``content``).
  Returns ``(config, the files read, or None)``."""
  config, read = {}, []
  for name in (TOKENIZER_CONFIG_FILE, "special_tokens_map.json"):
    file = os.path.join(folder, name)
    if os.path.isfile(file):
      with open(file, encoding="utf-8") as f:
        entries = json.load(f)
      read.append(file)
      config.update(
        (key, value.get("content") if isinstance(value, Mapping) else value)
        for key, value in entries.items()
      )
  if isinstance(config.get("chat_template"), list):
    named = {t.get("name"): t.get("template") for t in config["chat_template"]}
    config["chat_template"] = named.get("default")
  template = os.path.join(folder, CHAT_TEMPLATE_FILE)
  if os.path.isfile(template):
    with open(template, encoding="utf-8") as f:
      config["chat_template"] = f.read()
  return config, " and ".join(read) or None


def _token_id(tok, arg: str, name: str, source: str) -> int:
  i = tok.token_to_id(name)
  if i is None:
    raise ValueError(f"{arg}: expected a token of the vocabulary, got {name!r} (from {source!r})")
  return i
