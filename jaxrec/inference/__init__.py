"""Inference: sampling with caches, JRT-Prompt, and scoring models on recall tasks."""

from jaxrec.inference.generate import generate, sample_logits
from jaxrec.inference.jrt import jrt_prompt
from jaxrec.inference.recall import evaluate_recall, recall_dataset, score_batch

__all__ = [
  "evaluate_recall",
  "generate",
  "jrt_prompt",
  "recall_dataset",
  "sample_logits",
  "score_batch",
]
