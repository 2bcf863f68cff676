"""Rotary position embeddings, shared with the ops (``jaxrec.ops.rope``, where RAT rotates its
chunk states): plain RoPE and Llama 3's frequency scaling."""

from jaxrec.ops.rope import ROPE_SCALING_TYPES, apply_rope, check_rope_scaling, rope_frequencies

__all__ = ["ROPE_SCALING_TYPES", "apply_rope", "check_rope_scaling", "rope_frequencies"]
