"""Inference: sampling with caches."""

from jaxrec.inference.generate import generate, sample_logits

__all__ = ["generate", "sample_logits"]
