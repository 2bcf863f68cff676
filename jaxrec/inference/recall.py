"""Scoring any model on a synthetic recall task, with or without JRT-Prompt.

``evaluate_recall(model, task, repeats=r)`` draws a fixed set of examples of the
``jaxrec.data.tasks`` task, shows each context ``r`` times before its question (``jrt_prompt``;
``r = 1`` is the plain prompt), runs the model once over every row and compares its argmax with
the targets at the scored positions:

* ``accuracy``: the fraction of scored positions right (Zoology's MQAR metric: queries answered);
* ``exact_match``: the fraction of examples whose every scored position is right (one answer in
  set disjointness; every digit and the end of the count in counting, which is what greedy
  decoding would then write).

Teacher-forced argmax scoring equals greedy decoding for these prompts, in one parallel pass.
"""

import functools
from collections.abc import Iterable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.data import tasks as tasks_lib
from jaxrec.inference.jrt import jrt_prompt, prefix_prompt


def recall_dataset(
  tasks: tasks_lib.Task | Sequence[tasks_lib.Task],
  *,
  num_examples: int,
  batch_size: int,
  seed: int,
  repeats: int = 1,
  seq_len: int | None = None,
  prefix_len: int | None = None,
  **kwargs,
) -> grain.MapDataset:
  """``jaxrec.data.tasks.task_dataset`` with the JRT-Prompt of ``repeats`` context copies.

  Args:
    tasks: a task or several (mixed).
    num_examples: examples per epoch.
    batch_size: rows per batch.
    seed: seed of the examples (and the shuffle).
    repeats: context copies before the question (1: the plain prompt).
    seq_len: the row length; default the longest prompt any example can have.
    prefix_len: for a JRT-RNN (``pla``) model, every context left-padded to this many tokens
      (``prefix_prompt``), so that its non-causal prefix is the context whatever its length;
      only with ``repeats=1``.
    **kwargs: the other arguments of ``task_dataset`` (``shuffle``, ``num_epochs``, ...).
  """
  many = tasks if isinstance(tasks, Sequence) else (tasks,)
  if prefix_len is not None:
    if repeats != 1:
      raise ValueError(
        f"prefix_len: expected None with repeats={repeats} (the padded context is shown once), "
        f"got {prefix_len}"
      )
    pad_id = many[0].pad_id
    prompt = functools.partial(prefix_prompt, prefix_len=prefix_len, pad_id=pad_id)
    # A bound: the context padded to prefix_len tokens, then a question no longer than a prompt.
    longest = max(t.max_prompt_length(1) + prefix_len for t in many)
  else:
    prompt = None if repeats == 1 else functools.partial(jrt_prompt, repeats=repeats)
    longest = max(t.max_prompt_length(repeats) for t in many)
  if seq_len is None:
    seq_len = longest
  return tasks_lib.task_dataset(
    tasks,
    num_examples=num_examples,
    batch_size=batch_size,
    seq_len=seq_len,
    seed=seed,
    prompt=prompt,
    **kwargs,
  )


@nnx.jit
def score_batch(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums over one batch: ``correct`` and ``scored`` positions, ``exact`` and ``examples``
  (rows with a scored position)."""
  logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"])
  scored = batch["weights"] > 0
  right = (jnp.argmax(logits, axis=-1) == batch["targets"]) & scored
  has_answer = jnp.any(scored, axis=1)
  return {
    "correct": jnp.sum(right),
    "scored": jnp.sum(scored),
    "exact": jnp.sum(has_answer & (jnp.sum(right, axis=1) == jnp.sum(scored, axis=1))),
    "examples": jnp.sum(has_answer),
  }


def evaluate_recall(
  model: nnx.Module,
  tasks: tasks_lib.Task | Sequence[tasks_lib.Task],
  *,
  num_examples: int = 256,
  batch_size: int = 64,
  seed: int = 1,
  repeats: int = 1,
  seq_len: int | None = None,
) -> dict[str, float]:
  """``accuracy`` and ``exact_match`` of ``model`` on ``num_examples`` examples (module
  docstring); ``batch_size`` must divide ``num_examples`` (one compiled shape)."""
  if num_examples % batch_size:
    raise ValueError(
      f"num_examples: expected a multiple of batch_size={batch_size}, got {num_examples}"
    )
  ds = recall_dataset(
    tasks,
    num_examples=num_examples,
    batch_size=batch_size,
    seed=seed,
    repeats=repeats,
    seq_len=seq_len,
    shuffle=False,
  )
  # By index, in this thread: iterating a grain dataset starts a pool of prefetch threads, which
  # only contend for the interpreter lock over examples drawn in Python.
  return score_batches(model, (ds[i] for i in range(len(ds))))


def score_batches(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """``evaluate_recall``'s numbers over given ``batches`` of ``recall_dataset`` rows (to score
  many models on the same examples without drawing them again)."""
  sums = [jax.device_get(score_batch(model, batch)) for batch in batches]
  if not sums:
    raise ValueError("batches: expected at least one batch, got none")
  total = {k: float(np.sum([s[k] for s in sums])) for k in sums[0]}
  return {
    "accuracy": total["correct"] / max(total["scored"], 1.0),
    "exact_match": total["exact"] / max(total["examples"], 1.0),
    "examples": total["examples"],
  }


def state_bytes(model: nnx.Module, prompt_len: int) -> int:
  """Bytes of ``model``'s decoding state after a prompt of ``prompt_len`` tokens (batch 1): the
  recurrent states, or the attention KV caches at that length (a ring of the window for
  sliding-window attention). ``model`` may be abstract (``nnx.eval_shape``)."""
  cache = jax.eval_shape(lambda: model.init_cache(1, prompt_len))
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim))
