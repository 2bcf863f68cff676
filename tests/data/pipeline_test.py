"""Tests for jaxrec.data.pipeline: packing (one stream per batch row), rows per process,
seeding and checkpointed resume."""

import itertools

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrec.data import ByteTokenizer, make_lm_dataset, stdlib_corpus

TOK = ByteTokenizer()
# Varied lengths (some longer than a row), non-ASCII bytes and an empty document.
DOCS = ["", *(f"doc{i}:" + "é" * (i % 3) + "xyz" * (i * 5 % 11) for i in range(29))]
# Every document is exactly one row of seq_len + 1 = 8 tokens: the packer never holds a remainder.
EXACT_DOCS = [f"abc{i:03d}" for i in range(40)]
KEYS = ("inputs", "targets", "segment_ids", "weights")


def _take(ds, n=None):
  return list(itertools.islice(iter(ds), n))


def _reference_rows(docs, seq_len):
  """Concatenates [bos, *utf8, eos] per document and cuts rows of seq_len + 1 (numpy only)."""
  tokens, owner = [], []
  for i, doc in enumerate(docs):
    ids = [TOK.bos_id, *doc.encode("utf-8"), TOK.eos_id]
    tokens += ids
    owner += [i] * len(ids)
  width = seq_len + 1
  rows = -(-len(tokens) // width)
  pad = rows * width - len(tokens)
  tokens = np.array(tokens + [TOK.pad_id] * pad).reshape(rows, width)
  owner = np.array(owner + [-1] * pad).reshape(rows, width)
  segments = np.zeros_like(owner)
  for r in range(rows):
    for t in range(width):
      if owner[r, t] >= 0:
        new = t == 0 or owner[r, t] != owner[r, t - 1]
        segments[r, t] = (segments[r, t - 1] if t else 0) + new
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segments[:, :-1],
    "weights": ((owner[:, 1:] == owner[:, :-1]) & (owner[:, 1:] >= 0)).astype(np.float32),
  }


def _documents(batches):
  """Decodes the documents, in stream order, from batches that dropped nothing."""
  rows = [
    np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
    for b in batches
    for r in range(len(b["inputs"]))
  ]
  stream = [int(t) for t in np.concatenate(rows) if t != TOK.pad_id]
  starts = [i for i, t in enumerate(stream) if t == TOK.bos_id] + [len(stream)]
  docs = []
  for a, b in itertools.pairwise(starts):
    assert stream[b - 1] == TOK.eos_id
    docs.append(TOK.decode(stream[a:b]))
  return docs


def _assert_batches_equal(expected, actual):
  assert len(expected) == len(actual)
  for e, a in zip(expected, actual):
    assert set(a) == set(KEYS)
    for k in KEYS:
      np.testing.assert_array_equal(a[k], e[k], err_msg=k)


@pytest.mark.parametrize(("seq_len", "batch_size"), [(1, 3), (7, 2), (16, 1)])
def test_packing_matches_reference(seq_len, batch_size):
  got = _take(make_lm_dataset(DOCS, TOK, seq_len, batch_size, 0, shuffle=False, num_epochs=1))
  # Row j packs documents j, j + B, ...; the stream ends with the shortest row stream.
  per_row = [_reference_rows(DOCS[j::batch_size], seq_len) for j in range(batch_size)]
  steps = min(len(r["inputs"]) for r in per_row)
  expected = [{k: np.stack([r[k][i] for r in per_row]) for k in KEYS} for i in range(steps)]
  _assert_batches_equal(expected, got)
  if batch_size == 1:  # the padded last row is kept
    assert (got[-1]["targets"] == TOK.pad_id).any()


def test_shapes_dtypes_and_row_invariants():
  docs = stdlib_corpus(max_files=4)
  batches = _take(make_lm_dataset(docs, TOK, 64, 4, seed=3), 6)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "inputs": ((4, 64), np.int32),
      "targets": ((4, 64), np.int32),
      "segment_ids": ((4, 64), np.int32),
      "weights": ((4, 64), np.float32),
    }
  packed = _take(make_lm_dataset(DOCS, TOK, 16, 1, seed=1, num_epochs=1))
  assert (packed[-1]["inputs"] == TOK.pad_id).any()
  for b in packed:
    x, y, seg, w = (b[k] for k in KEYS)
    # targets are inputs shifted by one inside every packed row
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert (seg[:, 0] == 1).all()
    step = np.diff(seg, axis=1)
    is_bos = x[:, 1:] == TOK.bos_id
    np.testing.assert_array_equal(step[is_bos], 1)
    real = seg[:, 1:] > 0
    np.testing.assert_array_equal(step[~is_bos & real], 0)
    # weights vanish exactly at padding and at eos -> bos of the next document
    crossing = (x == TOK.eos_id) & (y == TOK.bos_id)
    np.testing.assert_array_equal(w == 0, crossing | (y == TOK.pad_id))


def test_no_shuffle_keeps_order_and_shuffle_permutes_per_epoch():
  assert _documents(_take(make_lm_dataset(DOCS, TOK, 9, 1, 0, shuffle=False, num_epochs=1))) == DOCS
  two = _documents(_take(make_lm_dataset(DOCS, TOK, 9, 1, seed=0, num_epochs=2)))
  first, second = two[: len(DOCS)], two[len(DOCS) :]
  assert sorted(first) == sorted(second) == sorted(DOCS)
  assert first != DOCS
  assert first != second


def test_seeds():
  def run(seed):
    return _take(make_lm_dataset(DOCS, TOK, 10, 2, seed=seed), 5)

  _assert_batches_equal(run(7), run(7))
  different = run(8)
  assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(run(7), different))


def test_rows_of_a_process_are_those_of_the_global_batch():
  """A process loading some rows sees exactly those rows of the one-process global batch, so
  training does not depend on the number of processes; the rows' documents are disjoint."""
  full = _take(make_lm_dataset(DOCS, TOK, 11, 4, seed=5), 5)
  for rows in ([0, 1], [2, 3], [3]):
    part = _take(make_lm_dataset(DOCS, TOK, 11, 4, seed=5, rows=rows), 5)
    _assert_batches_equal([{k: b[k][rows] for k in KEYS} for b in full], part)
  seen = [
    _documents(_take(make_lm_dataset(DOCS, TOK, 11, 2, seed=5, rows=[r], num_epochs=1)))
    for r in range(2)
  ]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(DOCS)


@pytest.mark.parametrize("docs", [DOCS, EXACT_DOCS], ids=["split_docs", "exact_rows"])
def test_resume_with_get_state_set_state(docs):
  ds = make_lm_dataset(docs, TOK, 7, 2, seed=0)
  it = iter(ds)
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = iter(ds)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 6))


def test_resume_from_every_state():
  ds = make_lm_dataset(DOCS[:12], TOK, 9, 2, seed=0, num_epochs=1)
  grain.experimental.assert_equal_output_after_checkpoint(ds)


@pytest.mark.parametrize("docs", [DOCS, EXACT_DOCS], ids=["split_docs", "exact_rows"])
def test_resume_through_orbax(docs, tmp_path):
  # The JSON round trip matters: it turns the packer's tuple state into lists.
  ds = make_lm_dataset(docs, TOK, 7, 2, seed=0)
  it = iter(ds)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 6)
    resumed = iter(ds)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(expected, _take(resumed, 6))


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"seq_len": 0}, "seq_len"),
    ({"batch_size": -2}, "batch_size"),
    ({"rows": [2]}, "rows"),
    ({"rows": [-1]}, "rows"),
    ({"rows": [0, 0]}, "rows"),
    ({"rows": []}, "rows"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"docs": []}, "docs"),
    ({"docs": ["one"], "num_epochs": 1}, "docs"),
  ],
)
def test_bad_arguments(kwargs, name):
  args = {"docs": DOCS, "tokenizer": TOK, "seq_len": 8, "batch_size": 2, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=name):
    make_lm_dataset(**args)
