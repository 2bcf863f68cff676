"""Counting a letter in a random string, in the four formats of Zhang, Cao & You (2024), "Counting
ability of large language models and impact of tokenization".

A string of ``min_length .. max_length`` letters drawn uniformly from ``alphabet`` is written in a
``format``:

* ``"plain"``: ``abbab`` (a BPE tokenizer merges letters into multi-letter tokens);
* ``"space"``: ``a b b a b``;
* ``"comma"``: ``a, b, b, a, b``;
* ``"items"``: the plain string tokenized one letter at a time (the paper's "precise-item"
  tokens: one token per letter whatever the tokenizer's merges).

The prompt is ``<string>\\n<letter>:`` and the answer is the count in decimal digits followed by
the tokenizer's ``eos``, every answer token scored: an example is right when all are, which is
exactly when greedy decoding writes the count and stops. The text is tokenized with any
``jaxrec.data.Tokenizer``: the byte tokenizer (one token per character, so ``plain`` and
``items`` coincide) or a BPE ``tokenizer.json``, where the formats differ.
"""

import dataclasses
from typing import Literal, get_args

import numpy as np

from jaxrec.data.tasks.base import Example, check_positive_int
from jaxrec.data.tokenizers import Tokenizer

CountingFormat = Literal["plain", "space", "comma", "items"]
FORMATS = get_args(CountingFormat)
_DELIMITERS = {"plain": "", "space": " ", "comma": ", ", "items": ""}


def format_string(letters: str, format: CountingFormat) -> str:
  """The text of ``letters`` in ``format`` (``"items"`` is the plain text, tokenized per letter)."""
  if format not in FORMATS:
    raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
  return _DELIMITERS[format].join(letters)


@dataclasses.dataclass(frozen=True)
class Counting:
  """How many times ``letter`` occurs in a random string (module docstring).

  Attributes:
    tokenizer: a ``jaxrec.data.Tokenizer`` (its ``pad_id`` pads and masks, ``eos_id`` ends the
      answer).
    format: ``"plain" | "space" | "comma" | "items"``.
    alphabet: the letters strings are drawn from, distinct characters.
    letter: the letter to count, one of ``alphabet``.
    min_length: the shortest string.
    max_length: the longest string.
  """

  tokenizer: Tokenizer
  format: CountingFormat = "plain"
  alphabet: str = "ab"
  letter: str = "a"
  min_length: int = 10
  max_length: int = 20

  def __post_init__(self):
    if not isinstance(self.tokenizer, Tokenizer):
      raise ValueError(f"tokenizer: expected a jaxrec.data.Tokenizer, got {self.tokenizer!r}")
    if self.format not in FORMATS:
      raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
    if not self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
      raise ValueError(f"alphabet: expected distinct characters, got {self.alphabet!r}")
    if len(self.letter) != 1 or self.letter not in self.alphabet:
      raise ValueError(
        f"letter: expected one character of alphabet {self.alphabet!r}, got {self.letter!r}"
      )
    for field in ("min_length", "max_length"):
      check_positive_int(field, getattr(self, field))
    if self.max_length < self.min_length:
      raise ValueError(
        f"max_length: expected at least min_length={self.min_length}, got {self.max_length}"
      )
    for char in self.alphabet:
      if not self.tokenizer.encode(char):
        raise ValueError(f"tokenizer: encodes the letter {char!r} of alphabet to no token")

  @property
  def num_tokens(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  @property
  def mask_id(self) -> int:
    return self.tokenizer.pad_id

  def max_prompt_length(self, context_repeats: int = 1) -> int:
    if self.format == "items":
      context = self.max_length * max(len(self.tokenizer.encode(c)) for c in self.alphabet)
    else:
      # A token covers at least one byte of the text; one more for a word-start marker.
      text = format_string(self.alphabet[0] * self.max_length, self.format)
      context = len(text.encode()) + 1
    answers = max(len(self.tokenizer.encode(str(n))) for n in range(self.max_length + 1))
    question = len(self.tokenizer.encode(self._question_text())) + answers + 1
    return context_repeats * context + question

  def encode_string(self, letters: str) -> np.ndarray:
    """The context tokens of ``letters`` in this task's format."""
    if self.format == "items":
      ids = [i for char in letters for i in self.tokenizer.encode(char)]
    else:
      ids = self.tokenizer.encode(format_string(letters, self.format))
    return np.asarray(ids, np.int32)

  def example(self, rng: np.random.Generator) -> Example:
    length = rng.integers(self.min_length, self.max_length + 1)
    letters = "".join(rng.choice(list(self.alphabet), size=length))
    prompt = self.tokenizer.encode(self._question_text())
    answer = [*self.tokenizer.encode(str(letters.count(self.letter))), self.tokenizer.eos_id]
    tokens = np.asarray(prompt + answer, np.int32)
    weights = np.zeros(len(tokens) - 1, np.float32)
    weights[len(prompt) - 1 :] = 1.0
    return Example(self.encode_string(letters), tokens[:-1], tokens[1:], weights)

  def _question_text(self) -> str:
    return f"\n{self.letter}:"
