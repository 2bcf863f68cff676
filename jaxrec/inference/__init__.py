"""Inference: sampling with caches, scoring, long-context policies (``longctx``), JRT-Prompt, and
scoring models on recall tasks."""

from jaxrec.inference.generate import generate, sample_logits
from jaxrec.inference.jrt import jrt_prompt
from jaxrec.inference.recall import (
  evaluate_recall,
  recall_dataset,
  score_batch,
  score_batches,
  state_bytes,
)
from jaxrec.inference.scoring import loglikelihood

__all__ = [
  "evaluate_recall",
  "generate",
  "jrt_prompt",
  "loglikelihood",
  "recall_dataset",
  "sample_logits",
  "score_batch",
  "score_batches",
  "state_bytes",
]
