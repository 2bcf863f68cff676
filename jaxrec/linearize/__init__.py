"""Linearization of pretrained transformers: Liger conversion into gated recurrent models, and
LoRA to recover their quality.

Typical use::

  teacher = jaxrec.models.load_pretrained("llama-dir")
  student = liger(teacher, variant="gla", window=64)          # shares the teacher's arrays
  apply_lora(student, rank=8, alpha=8, targets=("q_proj", "k_proj", "v_proj"))
  # fine-tune with jaxrec.train (trainable=nnx.LoRAParam), then
  jaxrec.models.save_pretrained(merge_lora(student), "liger-dir", source="llama-dir")
"""

from jaxrec.linearize.liger import liger
from jaxrec.linearize.lora import DEFAULT_TARGETS, LoRADense, apply_lora, merge_lora

__all__ = ["DEFAULT_TARGETS", "LoRADense", "apply_lora", "liger", "merge_lora"]
