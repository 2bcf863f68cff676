"""JRT-Prompt ("Just read twice", Arora et al. 2024, §3): show the context again before the
question, so that a recurrent model reads it a second time knowing what the first read contained.

On token arrays the prompt is ``context`` repeated ``repeats`` times, then ``question``::

  jrt_prompt([1, A, 2, B], [3]) == [1, A, 2, B, 1, A, 2, B, 3]

the set-disjointness prompt of the paper (and Zoology's MQAR with ``num_passes``). The paper's
document QA templates also lead with the question ("{question} {doc}.\\n{doc}. {cloze}"): put it
at the start of ``context`` for that.
"""

import jax
import jax.numpy as jnp
import numpy as np


def jrt_prompt(context, question, repeats: int = 2):
  """The context shown ``repeats`` times, then the question, along the last axis.

  Args:
    context: int tokens ``[C]`` or ``[B, C]`` (a list, numpy or jax array).
    question: int tokens ``[Q]`` or ``[B, Q]``, the same rank as ``context``.
    repeats: how many times the context is shown; 1 is the plain prompt.

  Returns:
    ``[repeats · C + Q]`` or ``[B, repeats · C + Q]``: a jax array if either input is one, else
    numpy.
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats: expected a positive int, got {repeats!r}")
  xp = jnp if isinstance(context, jax.Array) or isinstance(question, jax.Array) else np
  context, question = xp.asarray(context), xp.asarray(question)
  for name, x in (("context", context), ("question", question)):
    if x.ndim not in (1, 2) or not xp.issubdtype(x.dtype, xp.integer):
      raise ValueError(f"{name}: expected int tokens [T] or [B, T], got {x.dtype} {x.shape}")
  if context.ndim != question.ndim or context.shape[:-1] != question.shape[:-1]:
    raise ValueError(
      f"question: expected the batch shape of context {context.shape[:-1]}, got shape "
      f"{question.shape}"
    )
  return xp.concatenate([context] * repeats + [question.astype(context.dtype)], axis=-1)
