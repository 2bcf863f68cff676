"""Inference: sampling with caches, scoring, and long-context policies (``longctx``)."""

from jaxrec.inference.generate import generate, sample_logits
from jaxrec.inference.scoring import loglikelihood

__all__ = ["generate", "loglikelihood", "sample_logits"]
