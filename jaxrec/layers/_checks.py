"""Constructor-argument validation shared by the layers: every error names the argument, what was
expected and what was given."""

import numbers

import jax.numpy as jnp


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  """``value`` must be a real number ``> 0`` (``>= 0`` with ``allow_zero``); NaN never passes."""
  real = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not real or not (value >= 0 if allow_zero else value > 0):
    want = "a non-negative" if allow_zero else "a positive"
    raise ValueError(f"{name}: expected {want} number, got {value!r}")


def check_float_dtype(name: str, value) -> jnp.dtype:
  """``value`` as a floating ``jnp.dtype`` (names such as ``"bfloat16"`` are accepted)."""
  try:
    # jnp.dtype(None) is float64: None is refused, not read as a default.
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {value!r}")
  return dtype


def check_mixer_args(
  d_model, num_heads, init_std, num_layers, dtype, param_dtype
) -> tuple[jnp.dtype, jnp.dtype]:
  """Checks the arguments every token mixer takes; returns ``(dtype, param_dtype)`` as dtypes."""
  check_positive_int("d_model", d_model)
  check_positive_int("num_heads", num_heads)
  check_positive("init_std", init_std, allow_zero=True)
  check_positive_int("num_layers", num_layers)
  return check_float_dtype("dtype", dtype), check_float_dtype("param_dtype", param_dtype)


def head_width(name: str, factor, d_model: int, num_heads: int) -> int:
  """The width per head of ``factor · d_model`` split over ``num_heads`` heads; ``factor`` must
  make it a positive multiple of ``num_heads``."""
  check_positive(name, factor)
  width = int(factor * d_model)
  if width < num_heads or width % num_heads:
    raise ValueError(
      f"{name}: expected {name} * d_model to be a positive multiple of num_heads={num_heads}, "
      f"got {factor} * {d_model} = {width}"
    )
  return width // num_heads
