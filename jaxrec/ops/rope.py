"""Rotary position embeddings (Su et al. 2021, RoFormer), "rotate half" layout, with Llama 3's
frequency scaling.

Channel pair ``(i, i + K/2)`` of a head of width ``K`` turns by ``position · f_i`` with
``f_i = theta^(-2i/K)``, the layout (and frequencies) of Hugging Face's Llama and Qwen2.

Llama 3.1 stretches the context a model was trained for by scaling the frequencies
(``rope_scaling = {"rope_type": "llama3", ...}`` in a Hugging Face config). With the wavelength
``λ_i = 2π / f_i``, the original context ``L`` (``original_max_position_embeddings``), the factor
``s`` and the thresholds ``L / high_freq_factor <= L / low_freq_factor``:

* short waves, ``λ < L / high_freq_factor``: unchanged;
* long waves, ``λ > L / low_freq_factor``: ``f / s``;
* in between: ``(1 - a) f / s + a f`` with ``a = (L / λ - low_freq_factor) / (high_freq_factor -
  low_freq_factor)``, a smooth interpolation between the two.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALING_TYPES = ("llama3",)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(rope_scaling: Mapping[str, Any] | None, name: str = "rope_scaling") -> None:
  """Raises ``ValueError`` (naming ``name``) unless ``rope_scaling`` is ``None`` or a Llama 3
  scaling with its four positive parameters and ``low_freq_factor < high_freq_factor``."""
  if rope_scaling is None:
    return
  scaling = dict(rope_scaling)
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind not in ROPE_SCALING_TYPES:
    raise ValueError(
      f"{name}: expected rope_type in {ROPE_SCALING_TYPES} (or no scaling), got {kind!r}"
    )
  for key in _LLAMA3_KEYS:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
      raise ValueError(f"{name}: expected a positive number for {key!r}, got {value!r}")
  if not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
    raise ValueError(
      f"{name}: expected low_freq_factor < high_freq_factor, got "
      f"{scaling['low_freq_factor']} and {scaling['high_freq_factor']}"
    )


def rope_frequencies(
  head_dim: int, theta: float = 10_000.0, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
  """The ``head_dim / 2`` rotation frequencies ``f_i`` (radians per position), float32.

  Args:
    head_dim: even head width ``K``.
    theta: base wavelength.
    scaling: ``None``, or a Llama 3 scaling (see the module docstring), e.g. the ``rope_scaling``
      dict of a Hugging Face config.
  """
  check_rope_scaling(scaling, "scaling")
  half = head_dim // 2
  freq = theta ** (-np.arange(half, dtype=np.float64) / half)
  if scaling is not None:
    s = dict(scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelength = 2 * np.pi / freq
    smooth = (context / wavelength - low) / (high - low)
    medium = (1 - smooth) * freq / factor + smooth * freq
    freq = np.where(
      wavelength < context / high, freq, np.where(wavelength > context / low, freq / factor, medium)
    )
  return freq.astype(np.float32)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  theta: float = 10_000.0,
  *,
  scaling: Mapping[str, Any] | None = None,
) -> jax.Array:
  """Rotates channel pairs ``(i, i + D/2)`` of ``x`` by ``position · f_i``.

  Only position differences survive in ``q·k`` after rotation, so attention scores are unchanged
  by a common offset of all positions (packed documents need not restart them).

  Args:
    x: ``[B, T, H, D]`` with even ``D``.
    positions: integer positions ``[B, T]`` or ``[T]``.
    theta: base wavelength.
    scaling: frequency scaling (``rope_frequencies``); ``None`` for plain RoPE.

  Returns:
    ``[B, T, H, D]`` in the dtype of ``x``; the rotation is computed in fp32.
  """
  half = x.shape[-1] // 2
  if 2 * half != x.shape[-1]:
    raise ValueError(f"x: expected an even head dim for RoPE, got shape {x.shape}")
  freq = rope_frequencies(x.shape[-1], theta, scaling)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * freq  # [(B,) T, D/2]
  if angle.ndim == 2:
    angle = angle[None]
  cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
