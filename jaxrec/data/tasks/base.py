"""What every synthetic task shares: the example record, the row layout and the grain dataset.

A task draws one ``Example`` from a numpy ``Generator``: a ``context`` (what must be remembered), a
``question`` that follows it, and for every question position the ``target`` token and its loss
``weight`` (1 on the scored positions only). The context holds no scored position, so a prompt
may show it several times (JRT-Prompt) before the question.

A **row** is the LM layout of ``jaxrec.data.make_lm_dataset`` for one example, ``seq_len`` long:
the prompt (``context + question``, or what ``prompt(context, question)`` returns, which must end
with the question) **left-padded** with the task's ``pad_id``::

  inputs       pad … pad  c_0 … c_{C-1}  q_0 … q_{Q-1}
  segment_ids  0   … 0    1   …          1
  targets      the next input, and the task's target at the question positions
  weights      0 everywhere but the question's scored positions

Padding on the left puts every answer at the end of the row whatever the prompt length, and
segment 0 keeps it out of every mixer's state (a change of ``segment_ids`` restarts recurrences and
masks attention); each document (segment 1) starts at its first real token, so a mixer's
per-document prefix (prefix linear attention's ``M``) starts there too.

**Determinism**: example ``i`` of a dataset with seed ``s`` is drawn from
``np.random.default_rng((s, i))`` alone, so the source is random access (a grain
``MapDataset``), its order can be shuffled and resumed from an index, and the same seed gives the
same examples on any machine; a mixture of tasks takes task ``i mod len(tasks)`` for example
``i``.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import grain
import numpy as np

Prompt = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Example(NamedTuple):
  """One drawn example.

  Attributes:
    context: int32 ``[C]``.
    question: int32 ``[Q]``, shown after the context.
    targets: int32 ``[Q]``, the token to predict at the scored question positions (elsewhere
      ignored: the row's target is the next input).
    weights: float32 ``[Q]``, 1 where ``targets`` is scored, else 0.
  """

  context: np.ndarray
  question: np.ndarray
  targets: np.ndarray
  weights: np.ndarray


@runtime_checkable
class Task(Protocol):
  """A synthetic task: draws examples; knows its vocabulary and its longest prompt."""

  @property
  def num_tokens(self) -> int:
    """The vocabulary a model needs: every id the task emits is below it."""

  @property
  def pad_id(self) -> int:
    """Left padding of rows (under ``segment_ids`` 0, so never read)."""

  @property
  def mask_id(self) -> int:
    """A token no example contains, for masked-LM objectives (``jrt_objective``)."""

  def example(self, rng: np.random.Generator) -> Example:
    """Draws one example."""

  def max_prompt_length(self, context_repeats: int = 1) -> int:
    """An upper bound on the prompt length with the context shown ``context_repeats`` times."""


def task_dataset(
  tasks: Task | Sequence[Task],
  *,
  num_examples: int,
  batch_size: int,
  seq_len: int,
  seed: int,
  prompt: Prompt | None = None,
  shuffle: bool = True,
  num_epochs: int | None = 1,
  drop_remainder: bool = True,
) -> grain.MapDataset:
  """Batches of rows of ``num_examples`` examples of ``tasks``.

  Args:
    tasks: a task, or several mixed (example ``i`` comes from ``tasks[i % len(tasks)]``); they
      must share ``num_tokens`` and ``pad_id``.
    num_examples: examples per epoch (a fixed set, as Zoology's).
    batch_size: rows per batch.
    seq_len: ``T``, the length of every row (``max(t.max_prompt_length(r) for t in tasks)`` fits any
      example shown with ``r`` context repeats).
    seed: seed of the examples and of the shuffle.
    prompt: ``prompt(context, question) -> tokens`` ending with the question (e.g.
      ``functools.partial(jaxrec.inference.jrt_prompt, repeats=2)``); default ``context +
      question``.
    shuffle: a new order in every epoch.
    num_epochs: passes over the examples; ``None`` repeats forever.
    drop_remainder: drop a last batch shorter than ``batch_size``.

  Returns:
    A grain ``MapDataset`` of dicts of numpy ``[B, T]`` arrays: ``inputs``, ``targets``,
    ``segment_ids`` (int32) and ``weights`` (float32), as the LM pipeline's.

  Raises:
    ValueError: naming the argument; an example longer than ``seq_len`` names ``seq_len``.
  """
  tasks = (tasks,) if isinstance(tasks, Task) else tuple(tasks)
  if not tasks or not all(isinstance(t, Task) for t in tasks):
    raise ValueError(f"tasks: expected a task or a non-empty sequence of tasks, got {tasks!r}")
  for name in ("num_tokens", "pad_id"):
    if len({getattr(t, name) for t in tasks}) > 1:
      raise ValueError(
        f"tasks: expected one {name} for all tasks, got {[getattr(t, name) for t in tasks]}"
      )
  for name, value in (
    ("num_examples", num_examples),
    ("batch_size", batch_size),
    ("seq_len", seq_len),
  ):
    check_positive_int(name, value)
  if num_epochs is not None:
    check_positive_int("num_epochs", num_epochs)
  ds = grain.MapDataset.source(_TaskSource(tasks, num_examples, seq_len, seed, prompt))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder)


def read_ahead(ds: grain.MapDataset, batches: int = 8) -> grain.IterDataset:
  """``ds`` (a ``task_dataset``) to iterate while training: one thread draws up to ``batches``
  batches ahead.

  Examples are drawn in Python, so more threads only contend for the interpreter lock with the
  train loop: iterating the dataset directly (grain's default, 16 threads reading 500 elements
  ahead) halved the train-step rate of small models on 2 CPU cores; one thread comes within ~20%
  of batches drawn beforehand.
  """
  check_positive_int("batches", batches)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=batches))


def make_row(example: Example, seq_len: int, pad_id: int, prompt: Prompt | None = None) -> dict:
  """The left-padded ``[T]`` row of one example (module docstring)."""
  question = np.asarray(example.question, np.int32)
  if prompt is None:
    tokens = np.concatenate([example.context, question]).astype(np.int32)
  else:
    tokens = np.asarray(prompt(example.context, question), np.int32)
    if (
      tokens.ndim != 1
      or len(tokens) < len(question)
      or not np.array_equal(tokens[len(tokens) - len(question) :], question)
    ):
      raise ValueError("prompt: expected 1-D tokens ending with the question")
  n, q = len(tokens), len(question)
  if n > seq_len:
    raise ValueError(f"seq_len: expected at least {n}, the length of a prompt, got {seq_len}")
  pad = seq_len - n
  inputs = np.concatenate([np.full(pad, pad_id, np.int32), tokens])
  targets = np.append(inputs[1:], pad_id).astype(np.int32)
  scored = np.asarray(example.weights) > 0
  targets[seq_len - q :] = np.where(scored, example.targets, targets[seq_len - q :])
  weights = np.zeros(seq_len, np.float32)
  weights[seq_len - q :] = example.weights
  segment_ids = (np.arange(seq_len) >= pad).astype(np.int32)
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "weights": weights}


class _TaskSource(Sequence):
  """Random-access rows: row ``i`` is example ``i`` of task ``i % len(tasks)``, drawn from
  ``default_rng((seed, i))``."""

  def __init__(self, tasks, num_examples, seq_len, seed, prompt):
    self._tasks, self._n, self._seq_len = tasks, num_examples, seq_len
    self._seed, self._prompt = seed, prompt

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if not 0 <= index < self._n:
      raise IndexError(f"index: expected a value in [0, {self._n}), got {index}")
    task = self._tasks[index % len(self._tasks)]
    example = task.example(np.random.default_rng((self._seed, index)))
    return make_row(example, self._seq_len, task.pad_id, self._prompt)


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")
