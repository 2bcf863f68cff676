"""Rotary position embeddings, shared with the ops (``jaxrec.ops.rope``, where RAT rotates its
chunk states)."""

from jaxrec.ops.rope import apply_rope

__all__ = ["apply_rope"]
