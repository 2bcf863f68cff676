"""Set disjointness ("Just read twice", Arora et al. 2024, Algorithm 1; JRT's ``disjoint_sets``).

An example is ``[1] A [2] B [3]`` and the answer is the one element of ``A ∩ B``, predicted at the
``[3]`` token. Ids ``0 .. 3`` are special (0 pads and masks, 1 opens the first set, 2 separates
the sets, 3 asks for the answer); set elements are ids ``4 .. vocab_size - 1``.

Sampling: permute the elements and split them into two halves; draw ``A`` (``first_size``) from
the first half and ``B`` (``second_size``) from the second, each without replacement, so neither
repeats an element and they are disjoint; then overwrite one random element of ``B`` with a random
element ``t`` of ``A``: ``|A ∩ B| = 1`` and ``t`` is the answer.

The claim the task tests: a causal recurrent model must hold the *first* set in its state until it
meets the second, so it needs more state when the larger set comes first (``first_size >
second_size``); showing the context twice (JRT-Prompt) or reading it non-causally (prefix linear
attention) lets it keep only what the second read asks for.
"""

import dataclasses

import numpy as np

from jaxrec.data.tasks.base import Example, check_positive_int

PAD, FIRST, SEPARATOR, ANSWER = 0, 1, 2, 3
_SPECIALS = 4


@dataclasses.dataclass(frozen=True)
class SetDisjointness:
  """``[1] A [2] B [3]`` -> the element shared by ``A`` and ``B`` (module docstring).

  Attributes:
    vocab_size: ids in all; elements are ``4 .. vocab_size - 1``.
    first_size: ``|A|``, the set shown first.
    second_size: ``|B|``.
  """

  vocab_size: int = 2048
  first_size: int = 4
  second_size: int = 16

  def __post_init__(self):
    for field in ("vocab_size", "first_size", "second_size"):
      check_positive_int(field, getattr(self, field))
    elements = self.vocab_size - _SPECIALS
    halves = (("first_size", elements // 2), ("second_size", elements - elements // 2))
    for field, room in halves:
      if getattr(self, field) > room:
        raise ValueError(
          f"{field}: expected at most {room} (each set draws from its half of the "
          f"vocab_size - 4 = {elements} elements), got {getattr(self, field)}"
        )

  @property
  def num_tokens(self) -> int:
    return self.vocab_size

  @property
  def pad_id(self) -> int:
    return PAD

  @property
  def mask_id(self) -> int:
    return PAD

  def max_prompt_length(self, context_repeats: int = 1) -> int:
    return context_repeats * (self.first_size + self.second_size + 2) + 1

  def example(self, rng: np.random.Generator) -> Example:
    elements = rng.permutation(np.arange(_SPECIALS, self.vocab_size))
    half = len(elements) // 2
    first = rng.choice(elements[:half], size=self.first_size, replace=False)
    second = rng.choice(elements[half:], size=self.second_size, replace=False)
    shared = first[rng.integers(self.first_size)]
    second[rng.integers(self.second_size)] = shared
    context = np.concatenate([[FIRST], first, [SEPARATOR], second]).astype(np.int32)
    return Example(
      context,
      np.array([ANSWER], np.int32),
      np.array([shared], np.int32),
      np.ones(1, np.float32),
    )
