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


def prefix_prompt(context, question, prefix_len: int, pad_id: int):
  """The context left-padded with ``pad_id`` to ``prefix_len`` tokens, then the question.

  A JRT-RNN model reads the first ``prefix_len`` (``M``) tokens of a document non-causally (prefix
  linear attention, ``jaxrec.models.mixers`` ``pla``). JRT pads prompts on the left to ``M`` so
  that the encoder's prefix is the context and nothing after it; with contexts of several lengths
  (a mix of MQAR settings) a prefix longer than the context would otherwise read the question and
  its answers::

    prefix_prompt([1, A], [1, 0], prefix_len=4, pad_id=0) == [0, 0, 1, A, 1, 0]

  Args:
    context: int tokens ``[C]`` (a list or numpy array), ``C <= prefix_len``.
    question: int tokens ``[Q]``.
    prefix_len: ``M``, the length of the padded context.
    pad_id: the id the context is padded with.

  Returns:
    numpy ``[M + Q]``.
  """
  context, question = np.asarray(context), np.asarray(question)
  for name, x in (("context", context), ("question", question)):
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name}: expected int tokens [T], got {x.dtype} {x.shape}")
  if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < len(context):
    raise ValueError(
      f"prefix_len: expected an int >= the context's {len(context)} tokens, got {prefix_len!r}"
    )
  pad = np.full(prefix_len - len(context), pad_id, context.dtype)
  return np.concatenate([pad, context, question.astype(context.dtype)])
