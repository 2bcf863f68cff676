"""JRT-Prompt against the repetition written as a list, and the recall scoring path against the
model's own logits scored here with numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec import inference
from jaxrec.data import tasks
from jaxrec.models import LM, LMConfig


def test_jrt_prompt_repeats_the_context_before_the_question():
  context, question = [1, 7, 2, 9, 8], [3]
  for repeats in (1, 2, 3):
    got = inference.jrt_prompt(np.array(context), np.array(question), repeats=repeats)
    assert isinstance(got, np.ndarray) and got.tolist() == context * repeats + question
  rng = np.random.default_rng(0)
  c, q = rng.integers(0, 50, (3, 6)), rng.integers(0, 50, (3, 2))
  got = inference.jrt_prompt(jnp.asarray(c), jnp.asarray(q))
  assert isinstance(got, jax.Array)
  for b in range(3):
    assert got[b].tolist() == c[b].tolist() * 2 + q[b].tolist()


@pytest.mark.parametrize(
  ("args", "match"),
  [
    (([1, 2], [3], 0), "repeats: expected a positive int"),
    (([[1, 2]], [3], 2), r"question: expected the batch shape of context \(1,\)"),
    (([1.5], [3], 2), "context: expected int tokens"),
  ],
)
def test_jrt_prompt_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    inference.jrt_prompt(np.array(args[0]), np.array(args[1]), repeats=args[2])


def test_prefix_prompt_ends_every_context_where_the_prefix_ends():
  """A mix of MQAR settings for a JRT-RNN model of prefix M: every padded context fills exactly
  the first M tokens of its document, so the non-causal prefix never reaches a question."""
  assert inference.prefix_prompt([1, 9], [1, 0], prefix_len=4, pad_id=7).tolist() == [
    7,
    7,
    1,
    9,
    1,
    0,
  ]
  mix = [tasks.MQAR(vocab_size=32, seq_len=s, num_pairs=d) for s, d in ((16, 2), (24, 6))]
  m = 12
  ds = inference.recall_dataset(mix, num_examples=8, batch_size=8, seed=0, prefix_len=m)
  batch = ds[0]
  for row, segment in zip(batch["inputs"], batch["segment_ids"], strict=True):
    doc = row[segment > 0]
    pads = int(np.sum(doc[:m] == mix[0].pad_id))
    assert pads in (0, 12 - 4)  # 6 pairs fill M; 2 pairs leave 8 pads
    keys, values = doc[pads:m:2], doc[pads + 1 : m : 2]
    assert np.all((keys >= 1) & (keys < 16)) and np.all(values >= 16)  # the context, whole
    assert not np.any(doc[m:] == mix[0].pad_id)  # no padding after the prefix
  with pytest.raises(ValueError, match="prefix_len: expected an int >= the context's 4 tokens"):
    inference.prefix_prompt([1, 2, 3, 4], [5], prefix_len=3, pad_id=0)
  with pytest.raises(ValueError, match="prefix_len: expected None with repeats=2"):
    inference.recall_dataset(mix, num_examples=8, batch_size=8, seed=0, prefix_len=m, repeats=2)


def test_evaluate_recall_scores_the_answers_with_and_without_jrt_prompt():
  task = tasks.MQAR(vocab_size=16, seq_len=16, num_pairs=3)
  row = task.max_prompt_length(2)
  cfg = LMConfig(
    vocab_size=task.num_tokens,
    d_model=16,
    num_layers=1,
    mixer_pattern=("attention",),  # the scoring path does not depend on the mixer: the cheapest
    num_heads=2,
    max_seq_len=row,
    init_std=0.5,
  )
  model = LM(cfg, rngs=nnx.Rngs(0))
  for repeats in (1, 2):
    got = inference.evaluate_recall(
      model, task, num_examples=8, batch_size=4, seed=5, repeats=repeats, seq_len=row
    )
    ds = inference.recall_dataset(
      task, num_examples=8, batch_size=8, seed=5, repeats=repeats, seq_len=row, shuffle=False
    )
    batch = ds[0]
    # The JRT rows hold the context twice before the question.
    pad = (batch["segment_ids"] == 0).sum(axis=1)
    assert np.all(pad == row - task.max_prompt_length(repeats))
    logits = nnx.jit(lambda m, x, s: m(x, segment_ids=s)[0])(
      model, batch["inputs"], batch["segment_ids"]
    )
    right = np.asarray(logits).argmax(-1) == batch["targets"]
    scored = batch["weights"] > 0
    np.testing.assert_allclose(got["accuracy"], right[scored].mean(), rtol=1e-6)
    exact = np.mean([right[b][scored[b]].all() for b in range(8)])
    np.testing.assert_allclose(got["exact_match"], exact, rtol=1e-6)
    # The same numbers from batches drawn beforehand (how a sweep scores many models).
    given = inference.score_batches(model, [batch])
    np.testing.assert_allclose(given["accuracy"], right[scored].mean(), rtol=1e-6)
    np.testing.assert_allclose(given["exact_match"], exact, rtol=1e-6)
  with pytest.raises(ValueError, match="batches: expected at least one batch"):
    inference.score_batches(model, [])
  with pytest.raises(ValueError, match="num_examples: expected a multiple of batch_size=4"):
    inference.evaluate_recall(model, task, num_examples=6, batch_size=4)
