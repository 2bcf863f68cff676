"""Argument validation shared by the ops: every error names the argument, the expectation and
what was given."""

from collections.abc import Sequence

import jax.numpy as jnp


def check_choice(name: str, value, allowed: Sequence) -> None:
  """``value`` must be one of ``allowed`` (the ``typing.get_args`` of an option's ``Literal``)."""
  if value not in allowed:
    raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def check_float(name: str, x) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")


def check_rank(name: str, x, ranks: int | Sequence[int], axes: str = "") -> None:
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  if jnp.ndim(x) not in ranks:
    want = " or ".join(str(r) for r in ranks)
    axes = f" {axes}" if axes else ""
    raise ValueError(f"{name}: expected rank {want}{axes}, got shape {jnp.shape(x)}")


def check_shape(name: str, x, expected: Sequence[int], axes: str = "") -> None:
  if tuple(jnp.shape(x)) != tuple(expected):
    axes = f" {axes}" if axes else ""
    raise ValueError(f"{name}: expected shape {tuple(expected)}{axes}, got {tuple(jnp.shape(x))}")


def check_segment_ids(segment_ids, batch_time: Sequence[int]) -> None:
  """segment_ids must be an integer [B, T] array."""
  if segment_ids is None:
    return
  check_shape("segment_ids", segment_ids, batch_time, "[B, T]")
  if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
    raise ValueError(f"segment_ids: expected an integer dtype, got {jnp.result_type(segment_ids)}")


def check_power_of_two(name: str, value) -> None:
  """``value`` must be a positive power of two (an int, not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
    raise ValueError(f"{name}: expected a positive power of two, got {value!r}")


def compute_dtype(*xs) -> jnp.dtype:
  """fp32 for half-precision inputs, the input precision otherwise (fp64 stays fp64)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)
