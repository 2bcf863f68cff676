"""Inference: generation with caches (``generate``, ``Sampler``), scoring, long-context policies
(``longctx``), JRT-Prompt, and scoring models on recall tasks."""

from jaxrec.inference.generate import Generation, generate, sample_logits
from jaxrec.inference.jrt import jrt_prompt, prefix_prompt
from jaxrec.inference.recall import (
  evaluate_recall,
  recall_dataset,
  score_batch,
  score_batches,
  state_bytes,
)
from jaxrec.inference.sampler import Sampler, SamplerOutput
from jaxrec.inference.scoring import loglikelihood

__all__ = [
  "Generation",
  "Sampler",
  "SamplerOutput",
  "evaluate_recall",
  "generate",
  "jrt_prompt",
  "loglikelihood",
  "prefix_prompt",
  "recall_dataset",
  "sample_logits",
  "score_batch",
  "score_batches",
  "state_bytes",
]
