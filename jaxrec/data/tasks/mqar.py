"""Multi-query associative recall (MQAR), with the semantics of Zoology's ``multiquery_ar``
(Arora, Eyuboglu et al. 2023, "Zoology").

An example of ``seq_len`` tokens over the ids ``0 .. vocab_size - 1``::

  k_1 v_1 k_2 v_2 … k_D v_D | x k_σ1 x x … k_σ2 …          (the | is not a token)
  └── context: D pairs ───┘  └── question: seq_len - 2D tokens ──┘

* keys are ``D = num_pairs`` distinct ids of ``[1, vocab_size // 2)``, values ``D`` distinct ids of
  ``[vocab_size // 2, vocab_size)`` (each a draw without replacement);
* every key is queried exactly once, at question position ``2·gap``, with the ``D`` gaps drawn
  without replacement from ``{0, …, (seq_len - 2D) // 2 - 1}`` with probability
  ``∝ (gap + 1)^(a - 1)`` (a power law, ``a = power_a = 0.01``: most queries come soon after the
  context, as repeated bigrams do in text);
* the target at a query is its key's value; no other position is scored;
* the other question positions (``x``) are random ids of the whole vocabulary with
  ``random_fill`` (Zoology's ``random_non_queries``), else 0.

The id ``vocab_size`` (outside the task's vocabulary) pads rows and masks tokens, so a model needs
``num_tokens = vocab_size + 1`` embeddings.
"""

import dataclasses

import numpy as np

from jaxrec.data.tasks.base import Example, check_positive_int


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Multi-query associative recall (module docstring).

  Attributes:
    vocab_size: ``V``: keys come from ``[1, V/2)``, values from ``[V/2, V)``.
    seq_len: the example's length; the question fills ``seq_len - 2 · num_pairs`` tokens.
    num_pairs: ``D`` key-value pairs, each queried once.
    power_a: ``a`` of the power law of the query gaps, in ``(0, 1]`` (1 is uniform).
    random_fill: fill the non-query question positions with random ids (else 0).
  """

  vocab_size: int = 8192
  seq_len: int = 64
  num_pairs: int = 4
  power_a: float = 0.01
  random_fill: bool = True

  def __post_init__(self):
    for field in ("vocab_size", "seq_len", "num_pairs"):
      check_positive_int(field, getattr(self, field))
    keys, values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
    if self.num_pairs > min(keys, values):
      raise ValueError(
        f"num_pairs: expected at most {min(keys, values)} distinct keys and values (keys in "
        f"[1, vocab_size // 2), values in [vocab_size // 2, vocab_size), vocab_size="
        f"{self.vocab_size}), got {self.num_pairs}"
      )
    if self.seq_len < 4 * self.num_pairs:
      raise ValueError(
        f"seq_len: expected at least 4 * num_pairs = {4 * self.num_pairs} (the context's "
        f"{2 * self.num_pairs} tokens and a query slot per pair), got {self.seq_len}"
      )
    if not 0 < self.power_a <= 1:
      raise ValueError(f"power_a: expected a value in (0, 1], got {self.power_a!r}")

  @property
  def num_tokens(self) -> int:
    return self.vocab_size + 1

  @property
  def pad_id(self) -> int:
    return self.vocab_size

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  def max_prompt_length(self, context_repeats: int = 1) -> int:
    return self.seq_len + (context_repeats - 1) * 2 * self.num_pairs

  def example(self, rng: np.random.Generator) -> Example:
    d, half = self.num_pairs, self.vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=d, replace=False)
    values = rng.choice(np.arange(half, self.vocab_size), size=d, replace=False)
    context = np.stack([keys, values], axis=1).reshape(-1)
    length = self.seq_len - 2 * d
    space = length // 2
    p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
    gaps = rng.choice(space, size=d, replace=False, p=p / p.sum())
    if self.random_fill:
      question = rng.integers(0, self.vocab_size, size=length)
    else:
      question = np.zeros(length, np.int64)
    question[2 * gaps] = keys
    targets = np.zeros(length, np.int32)
    targets[2 * gaps] = values
    weights = np.zeros(length, np.float32)
    weights[2 * gaps] = 1.0
    return Example(context.astype(np.int32), question.astype(np.int32), targets, weights)
