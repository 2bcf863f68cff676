"""jaxrec.data.tasks: the generators' invariants checked on the drawn tokens with numpy and
``str.count``, determinism by seed, the row layout and the config errors."""

import numpy as np
import pytest

from jaxrec import data
from jaxrec.data import tasks

N = 20


def _examples(task, n=N):
  return [task.example(np.random.default_rng((7, i))) for i in range(n)]


def test_mqar_keys_values_and_queries():
  task = tasks.MQAR(vocab_size=64, seq_len=48, num_pairs=6)
  half = 32
  for ex in _examples(task):
    keys, values = ex.context[0::2], ex.context[1::2]
    assert len(ex.context) == 12 and len(ex.context) + len(ex.question) == 48
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 64)).all()
    assert len(set(keys)) == 6 and len(set(values)) == 6
    scored = np.flatnonzero(ex.weights)
    # Each key queried exactly once, at an even question offset, answered by its own value.
    assert sorted(ex.question[scored]) == sorted(keys) and (scored % 2 == 0).all()
    want = dict(zip(keys, values, strict=True))
    assert [want[k] for k in ex.question[scored]] == list(ex.targets[scored])
    assert set(np.unique(ex.weights)) <= {0.0, 1.0}


def test_mqar_gaps_follow_the_power_law():
  # With a = 0.01 nearly all probability sits on the first gaps: most queries come right after
  # the context; with a = 1 (uniform) they spread over the question.
  def mean_offset(a):
    task = tasks.MQAR(vocab_size=64, seq_len=200, num_pairs=2, power_a=a)
    return np.mean([np.flatnonzero(ex.weights).mean() for ex in _examples(task, 200)])

  assert mean_offset(0.01) < 0.5 * mean_offset(1.0)


def test_set_disjointness_one_shared_element_either_order():
  for first, second in ((3, 9), (9, 3)):
    task = tasks.SetDisjointness(vocab_size=64, first_size=first, second_size=second)
    for ex in _examples(task):
      c = ex.context
      assert c[0] == 1 and c[first + 1] == 2 and list(ex.question) == [3]
      a, b = c[1 : first + 1], c[first + 2 :]
      assert len(a) == first and len(b) == second and (c[1:] >= 4).sum() == first + second
      assert len(set(a)) == first and len(set(b)) == second  # no repeats inside a set
      shared = set(a) & set(b)
      assert len(shared) == 1 and list(ex.targets) == list(shared) and list(ex.weights) == [1]


def _bpe_tokenizer(path):
  hf = pytest.importorskip("tokenizers")
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(["abbab aab baba abab bbaa", "a, b, a", "a b b"] * 20, trainer)
  tok.save(str(path))
  return data.load_tokenizer(str(path))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return _bpe_tokenizer(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.mark.parametrize("fmt", tasks.FORMATS)
def test_counting_answer_and_formats(fmt, bpe):
  for tok in (data.ByteTokenizer(), bpe):
    task = tasks.Counting(tok, format=fmt, alphabet="ab", letter="b", min_length=5, max_length=12)
    for ex in _examples(task, 8):
      text = tok.decode(ex.context)
      letters = text.replace(", ", "").replace(" ", "")
      assert text == {"plain": letters, "items": letters}.get(fmt, text)
      assert text == tasks.format_string(letters, fmt) and set(letters) <= {"a", "b"}
      # Scored: the count's digits then eos, predicted after "\nb:".
      scored = np.flatnonzero(ex.weights)
      answer = ex.targets[scored]
      assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == str(letters.count("b"))
      assert tok.decode(ex.question[: scored[0] + 1]) == "\nb:"
      assert scored[-1] == len(ex.question) - 1 and np.array_equal(
        scored, np.arange(scored[0], len(ex.question))
      )
      row = tasks.make_row(ex, task.max_prompt_length(), task.pad_id)
      assert row["inputs"].shape == (task.max_prompt_length(),)
  # BPE merges letters in the plain string; "items" keeps one token per letter.
  plain = tasks.Counting(bpe, format="plain", min_length=12, max_length=12)
  items = tasks.Counting(bpe, format="items", min_length=12, max_length=12)
  ex_p, ex_i = (t.example(np.random.default_rng(0)) for t in (plain, items))
  assert len(ex_i.context) == 12 and len(ex_p.context) < 12


def test_rows_score_only_the_answers_and_are_deterministic():
  mqar = tasks.MQAR(vocab_size=32, seq_len=24, num_pairs=3)
  ds = tasks.task_dataset(
    [mqar, tasks.MQAR(vocab_size=32, seq_len=20, num_pairs=2)],
    num_examples=8,
    batch_size=4,
    seq_len=26,
    seed=3,
  )
  b = ds[0]
  assert set(b) == {"inputs", "targets", "segment_ids", "weights"}
  assert b["inputs"].shape == (4, 26) and b["inputs"].dtype == np.int32
  for row in range(4):
    pad = int((b["segment_ids"][row] == 0).sum())
    assert (b["inputs"][row, :pad] == mqar.pad_id).all() and (
      b["segment_ids"][row, pad:] == 1
    ).all()
    scored = b["weights"][row] > 0
    # Only query positions are scored, and each target is the value that followed the key.
    keys = b["inputs"][row][scored]
    ctx = b["inputs"][row, pad:]
    lookup = {ctx[i]: ctx[i + 1] for i in range(0, 2 * scored.sum(), 2)}
    assert [lookup[k] for k in keys] == list(b["targets"][row][scored])
    unscored = ~scored
    assert np.array_equal(
      b["targets"][row, :-1][unscored[:-1]], b["inputs"][row, 1:][unscored[:-1]]
    )
  same = tasks.task_dataset(mqar, num_examples=8, batch_size=4, seq_len=24, seed=3)
  other = tasks.task_dataset(mqar, num_examples=8, batch_size=4, seq_len=24, seed=4)
  assert all(
    np.array_equal(
      same[0][k], tasks.task_dataset(mqar, num_examples=8, batch_size=4, seq_len=24, seed=3)[0][k]
    )
    for k in same[0]
  )
  assert not np.array_equal(same[0]["inputs"], other[0]["inputs"])
  # Random access: example i does not depend on the others or the batch size.
  one = tasks.task_dataset(mqar, num_examples=8, batch_size=1, seq_len=24, seed=3, shuffle=False)
  four = tasks.task_dataset(mqar, num_examples=8, batch_size=4, seq_len=24, seed=3, shuffle=False)
  assert np.array_equal(one[5]["inputs"][0], four[1]["inputs"][1])


def test_read_ahead_yields_the_datasets_batches_in_order():
  ds = tasks.task_dataset(tasks.MQAR(), num_examples=12, batch_size=2, seq_len=64, seed=1)
  got = list(tasks.read_ahead(ds, batches=3))
  assert len(got) == len(ds) == 6
  for i, batch in enumerate(got):
    assert all(np.array_equal(batch[k], ds[i][k]) for k in ds[i])
  with pytest.raises(ValueError, match=r"^batches: expected a positive int"):
    tasks.read_ahead(ds, batches=0)


@pytest.mark.parametrize(
  ("make", "field"),
  [
    (lambda: tasks.MQAR(vocab_size=16, seq_len=64, num_pairs=8), "num_pairs"),
    (lambda: tasks.MQAR(vocab_size=64, seq_len=15, num_pairs=4), "seq_len"),
    (lambda: tasks.MQAR(power_a=0.0), "power_a"),
    (lambda: tasks.SetDisjointness(vocab_size=20, first_size=9), "first_size"),
    (lambda: tasks.SetDisjointness(vocab_size=20, first_size=2, second_size=9), "second_size"),
    (lambda: tasks.Counting(data.ByteTokenizer(), alphabet="ab", letter="c"), "letter"),
    (lambda: tasks.Counting(data.ByteTokenizer(), alphabet="aa"), "alphabet"),
    (lambda: tasks.Counting(data.ByteTokenizer(), format="csv"), "format"),
    (lambda: tasks.Counting(data.ByteTokenizer(), min_length=5, max_length=4), "max_length"),
    (
      lambda: tasks.task_dataset(tasks.MQAR(), num_examples=4, batch_size=2, seq_len=8, seed=0)[0],
      "seq_len",
    ),
  ],
)
def test_unsatisfiable_configs_name_the_field(make, field):
  with pytest.raises(ValueError, match=rf"^{field}: expected"):
    make()
