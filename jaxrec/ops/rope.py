"""Rotary position embeddings (Su et al. 2021, RoFormer), "rotate half" layout."""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
  """Rotates channel pairs ``(i, i + D/2)`` of ``x`` by ``position · theta^(-2i/D)``.

  Only position differences survive in ``q·k`` after rotation, so attention scores are unchanged
  by a common offset of all positions (packed documents need not restart them).

  Args:
    x: ``[B, T, H, D]`` with even ``D``.
    positions: integer positions ``[B, T]`` or ``[T]``.
    theta: base wavelength.

  Returns:
    ``[B, T, H, D]`` in the dtype of ``x``; the rotation is computed in fp32.
  """
  half = x.shape[-1] // 2
  if 2 * half != x.shape[-1]:
    raise ValueError(f"x: expected an even head dim for RoPE, got shape {x.shape}")
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * freq  # [(B,) T, D/2]
  if angle.ndim == 2:
    angle = angle[None]
  cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
