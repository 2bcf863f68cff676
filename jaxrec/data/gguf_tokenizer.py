"""The tokenizer a GGUF file describes, as a ``tokenizers.Tokenizer`` inside ``HFTokenizer``.

A GGUF (llama.cpp's file format) has no ``tokenizer.json``: its metadata lists the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges (``tokenizer.ggml.merges``), each token's type
(``tokenizer.ggml.token_type``: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte), the special ids, the chat template, and the name of the pre-tokenizer
(``tokenizer.ggml.pre``), which llama.cpp maps to its own regular expressions. This module
rebuilds the byte-level BPE (``tokenizer.ggml.model == "gpt2"``, the GPT-2 / Llama 3 / Qwen2 /
SmolLM family) from those:

* the merges and vocabulary, each token spelled in GPT-2's byte alphabet (a token written with
  other characters, as control tokens sometimes are, is re-spelled byte by byte);
* control tokens (type 3) as special added tokens and user-defined ones (type 4) as plain added
  tokens, so that chat markup such as ``<|im_start|>`` in a text encodes as its one id, never
  cut by the regex or the merges, and ``decode`` skips the control ones;
* the pre-tokenizer of ``tokenizer.ggml.pre`` (``PRE_TOKENIZERS``), the same splits as
  llama.cpp's ``llama-vocab.cpp``. For ``"smollm"`` (and StarCoder's family) llama.cpp splits
  every digit off first (``\\p{N}``) and then applies GPT-2's expression; that is exactly the
  ``Digits(individual_digits=True)`` then ``ByteLevel`` of SmolLM2's original
  ``tokenizer.json``, so numbers tokenize as the model was trained. (transformers' GGUF loader
  knows no ``"smollm"`` split and falls back to GPT-2's, which groups a run of whitespace with
  the digits after it differently.)
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrec.data.tokenizers import HFTokenizer

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's split expressions (llama-vocab.cpp), by family.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
  """How a family of ``tokenizer.ggml.pre`` names splits text before the merges.

  Attributes:
    split: a regular expression whose matches (and the text between them) are the pieces;
      ``None`` is GPT-2's expression (``ByteLevel(use_regex=True)``).
    digits: split every digit off first, as llama.cpp's ``\\p{N}`` pass.
    ignore_merges: a piece that is a whole token of the vocabulary is that token (Llama 3).
  """

  split: str | None = None
  digits: bool = False
  ignore_merges: bool = False


_GPT2 = PreTokenizer()
_DIGITS_THEN_GPT2 = PreTokenizer(digits=True)
_LLAMA3 = PreTokenizer(split=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = PreTokenizer(split=_QWEN2_SPLIT)
PRE_TOKENIZERS = {
  **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), _GPT2),
  **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _DIGITS_THEN_GPT2),
  **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3"), _LLAMA3),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2),
}


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> HFTokenizer:
  """The ``HFTokenizer`` of a GGUF file's ``tokenizer.*`` metadata.

  Args:
    metadata: the file's key-value metadata as plain Python values (strings, ints, lists).

  Returns:
    An ``HFTokenizer`` with the file's bos/eos/pad/unk ids (pad falls back to eos) and chat
    template.

  Raises:
    ImportError: the ``tokenizers`` package is not installed.
    ValueError: naming the metadata key: a tokenizer other than byte-level BPE, an unknown
      pre-tokenizer, missing tokens or merges, a special id outside the vocabulary.
  """
  try:
    import tokenizers  # optional dependency, imported only for this path
  except ImportError as e:
    raise ImportError(
      "metadata: building a GGUF file's tokenizer needs the 'tokenizers' package; install it "
      'with `pip install "jaxrec[real]"`'
    ) from e
  from tokenizers import decoders, pre_tokenizers

  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
      f"metadata: tokenizer.ggml.model: expected 'gpt2' (byte-level BPE), got {kind!r}"
    )
  pre_name = metadata.get("tokenizer.ggml.pre", "default")
  if pre_name not in PRE_TOKENIZERS:
    raise ValueError(
      f"metadata: tokenizer.ggml.pre: expected one of {sorted(PRE_TOKENIZERS)}, got {pre_name!r}"
    )
  pre = PRE_TOKENIZERS[pre_name]
  tokens = _required(metadata, "tokenizer.ggml.tokens")
  merges = _required(metadata, "tokenizer.ggml.merges")
  types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if len(types) != len(tokens):
    raise ValueError(
      f"metadata: tokenizer.ggml.token_type: expected {len(tokens)} types (one per token), got "
      f"{len(types)}"
    )
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  spelled = [_byte_spelling(t, alphabet) for t in tokens]
  tok = tokenizers.Tokenizer(
    tokenizers.models.BPE(
      vocab={t: i for i, t in enumerate(spelled)},
      merges=[tuple(m.split(" ")) for m in merges],
      ignore_merges=pre.ignore_merges,
    )
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.split is None)
  steps = [pre_tokenizers.Digits(individual_digits=True)] if pre.digits else []
  if pre.split is not None:
    steps.append(pre_tokenizers.Split(tokenizers.Regex(pre.split), behavior="isolated"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
  tok.decoder = decoders.ByteLevel()
  # Only tokens spelled as they are matched in text (the added token takes the vocabulary's id).
  added = [
    tokenizers.AddedToken(t, special=token_type == CONTROL, normalized=False)
    for t, s, token_type in zip(tokens, spelled, types, strict=True)
    if token_type in (CONTROL, USER_DEFINED) and t == s
  ]
  tok.add_special_tokens([a for a in added if a.special])
  tok.add_tokens([a for a in added if not a.special])
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(
      f"metadata: tokenizer.ggml.tokens: {len(tokens)} tokens built a vocabulary of "
      f"{tok.get_vocab_size(with_added_tokens=True)} (duplicated tokens?)"
    )
  ids = {
    name: _special_id(metadata, f"tokenizer.ggml.{key}", len(tokens))
    for name, key in (
      ("bos", "bos_token_id"),
      ("eos", "eos_token_id"),
      ("pad", "padding_token_id"),
      ("unk", "unknown_token_id"),
    )
  }
  return HFTokenizer(
    tok,
    bos_id=ids["bos"],
    eos_id=ids["eos"],
    pad_id=ids["eos"] if ids["pad"] is None else ids["pad"],
    unk_id=ids["unk"],
    chat_template=metadata.get("tokenizer.chat_template"),
  )


def _byte_spelling(token: str, alphabet: set[str]) -> str:
  """``token`` in GPT-2's byte alphabet: as it is when it already is, else byte by byte."""
  if set(token) <= alphabet:
    return token
  from tokenizers import pre_tokenizers

  spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  return "".join(piece for piece, _ in spell.pre_tokenize_str(token))


def _required(metadata: Mapping[str, Any], key: str) -> Sequence:
  value = metadata.get(key)
  if not value:
    raise ValueError(f"metadata: {key}: expected a non-empty list, got {value!r}")
  return value


def _special_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
  value = metadata.get(key)
  if value is None:
    return None
  if not 0 <= int(value) < vocab_size:
    raise ValueError(f"metadata: {key}: expected an id in [0, {vocab_size}), got {value}")
  return int(value)
