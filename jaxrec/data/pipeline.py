"""Language-modelling input pipeline on grain: shuffle, tokenize, pack, batch; one stream per row.

Axes: ``B`` global batch, ``T`` time (``seq_len``).

Every document becomes ``[bos, *tokens, eos]``. **Each row of the global batch is its own packing
stream**: row ``j`` takes documents ``j, j + B, j + 2B, …`` of the shuffled (and repeated)
document order, concatenates them and cuts them into rows of ``seq_len + 1`` tokens with
``grain.experimental.ConcatThenSplitIterDataset``; a document that does not fit continues at the
start of the same row of the next batch, and only the last row of a finite stream is padded. A
row ``r`` gives ``inputs = r[:-1]`` and ``targets = r[1:]``.

A process loads only the rows its devices hold (``rows``), so it tokenizes only its share of the
documents, and the global batch at every step — hence the whole training run — is the same for
any number of processes: a run on 2 hosts of 4 devices equals one on 1 host of 8.

``segment_ids`` number the documents inside a row from 1 (0 is padding), so the model's recurrence
and attention reset wherever the id changes; a document continued from the previous row restarts
from an empty state. ``weights`` are 1 where the target is the next token of the *same* document
as the input: the prediction ``bos -> first token`` counts (the ``bos`` input already belongs to
the new document), while ``eos -> next document's bos`` is masked, because nothing before a reset
can inform it; padding is masked too.

The returned dataset is a grain ``IterDataset``; its iterator has ``get_state``/``set_state`` and
works with ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` inside an orbax
``CheckpointManager``. Its state is a few integers, and restoring yields exactly the batches that
followed the save.
"""

from collections.abc import Sequence

import grain
import numpy as np

from jaxrec.data.tokenizers import Tokenizer, require_specials

_TOKENS = "tokens"


def make_lm_dataset(
  docs: Sequence[str],
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  rows: Sequence[int] | None = None,
  num_epochs: int | None = None,
) -> grain.IterDataset:
  """Builds the packed token stream of the rows ``rows`` of the global batch.

  Args:
    docs: documents, a random-access sequence of ``str`` (e.g. a ``DocumentCorpus``).
    tokenizer: a :class:`~jaxrec.data.tokenizers.Tokenizer`.
    seq_len: ``T``, tokens per row.
    batch_size: ``B``, rows of the *global* batch (over all processes).
    seed: seed of the document shuffle; every process must pass the same seed.
    shuffle: shuffle the documents, with a different order in every epoch.
    rows: the global rows this process loads, in the order it hands them to
      ``jax.make_array_from_process_local_data`` (``jaxrec.train.distributed.process_rows``);
      default all ``B`` rows (one process).
    num_epochs: passes over ``docs``; ``None`` repeats forever. A finite stream ends with the
      first row stream that runs out.

  Returns:
    A grain ``IterDataset`` of dicts of numpy arrays, each ``[len(rows), T]``: ``inputs`` int32,
    ``targets`` int32, ``segment_ids`` int32 (document number within the row, 0 at padding) and
    ``weights`` float32 (1 where ``targets`` is a real next token of the input's document).
  """
  _check_positive_int("seq_len", seq_len)
  _check_positive_int("batch_size", batch_size)
  require_specials(tokenizer, ("bos", "eos", "pad"), "the LM pipeline (documents are bos ... eos)")
  rows = list(range(batch_size)) if rows is None else list(rows)
  if (
    not rows
    or len(set(rows)) != len(rows)
    or not all(isinstance(r, int | np.integer) and 0 <= r < batch_size for r in rows)
  ):
    raise ValueError(
      f"rows: expected distinct integers in [0, batch_size={batch_size}), got {rows[:16]}"
    )
  if num_epochs is not None:
    _check_positive_int("num_epochs", num_epochs)
  if len(docs) == 0:
    raise ValueError("docs: expected a non-empty corpus, got 0 documents")
  if num_epochs is not None and len(docs) * num_epochs < batch_size:
    raise ValueError(
      f"docs: expected at least batch_size={batch_size} documents over {num_epochs} epoch(s), "
      f"one per row stream, got {len(docs)}"
    )

  ds = grain.MapDataset.source(docs)
  if shuffle:
    # Shuffling before repeating draws a new permutation per epoch (grain seeds it with the epoch).
    ds = ds.shuffle(seed=seed)
  # Same seed on every process => same global order, whatever the number of processes.
  ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer))
  # Row streams read synchronously: grain's default read-ahead (16 threads, 500 documents) per
  # row would start B thread pools and tokenize 500·B documents before the first batch. A batch
  # of B rows costs one document's tokenization per row now and then.
  sync = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  streams = [
    _TupleSlicesOnRestore(
      grain.experimental.ConcatThenSplitIterDataset(
        ds[row::batch_size].to_iter_dataset(sync), length_struct={_TOKENS: seq_len + 1}
      )
    )
    for row in rows
  ]
  batches = grain.experimental.ZipIterDataset(streams, strict=False).map(_StackRows())
  return batches.map(_ShiftRows(tokenizer.pad_id))


class _Tokenize(grain.transforms.Map):
  """``str -> {"tokens": [bos, *ids, eos]}`` (a class, so it pickles into grain workers)."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def map(self, element: str) -> dict[str, np.ndarray]:
    tok = self._tokenizer
    return {_TOKENS: np.array([tok.bos_id, *tok.encode(element), tok.eos_id], np.int32)}


class _StackRows(grain.transforms.Map):
  """A tuple of packed rows (one per row stream) -> one dict of ``[rows, T + 1]`` arrays."""

  def map(self, element: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {k: np.stack([row[k] for row in element]) for k in element[0]}


class _ShiftRows(grain.transforms.Map):
  """Packed ``[B, T + 1]`` rows -> ``inputs``/``targets``/``segment_ids``/``weights`` ``[B, T]``."""

  def __init__(self, pad_id: int):
    self._pad_id = pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = element[f"{_TOKENS}_segment_ids"].astype(np.int32)
    # ConcatThenSplit pads with zeros, which is a real token id; write the pad id instead.
    tokens = np.where(segments > 0, element[_TOKENS], self._pad_id).astype(np.int32)
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return {
      "inputs": np.ascontiguousarray(tokens[:, :-1]),
      "targets": np.ascontiguousarray(tokens[:, 1:]),
      "segment_ids": np.ascontiguousarray(segments[:, :-1]),
      "weights": same_doc.astype(np.float32),
    }


class _TupleSlicesOnRestore(grain.IterDataset):
  """Passes elements through; hands ``ConcatThenSplit`` its slices as tuples on ``set_state``.

  grain 0.2.18's ``ConcatThenSplit`` marks "no remainder" with the tuple ``(-1, -1)`` and tests it
  with ``!=``. ``CheckpointSave`` writes the state as JSON, which turns the tuple into a list, so a
  restored ``[-1, -1]`` would count as a remainder and shift every following row.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _TupleSlicesOnRestoreIterator(self._parent.__iter__())


class _TupleSlicesOnRestoreIterator(grain.DatasetIterator):
  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
    raise ValueError(f"{name}: expected a positive integer, got {value!r}")
