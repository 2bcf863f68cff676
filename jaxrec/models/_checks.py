"""Validation of ``LMConfig`` fields and option groups: every error starts with the field it
names, then what was expected and what was given. ``LMConfig`` prefixes an option's field with its
group (``chunk_size: ...`` becomes ``gla.chunk_size: ...``), which the launchers turn into the
flag (``--config.model.gla.chunk_size``)."""

from collections.abc import Sequence


def check_positive_int(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}: expected a positive int, got {value!r}")


def check_positive_int_or_none(field: str, value) -> None:
  if value is not None:
    check_positive_int(field, value)


def check_number(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ValueError(f"{field}: expected a number, got {value!r}")


def check_positive_number(field: str, value, *, allow_none: bool = False) -> None:
  """``value > 0`` (NaN never passes); ``None`` too with ``allow_none``."""
  if allow_none and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
    want = "a positive number or None" if allow_none else "a positive number"
    raise ValueError(f"{field}: expected {want}, got {value!r}")


def check_non_negative_number(field: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
    raise ValueError(f"{field}: expected a non-negative number, got {value!r}")


def check_choice(field: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    raise ValueError(f"{field}: expected one of {tuple(allowed)}, got {value!r}")


def check_head_width(field: str, factor, d_model: int, num_heads: int) -> None:
  """``factor · d_model`` must split over ``num_heads`` heads (the mixer's query/key or value
  width as a multiple of ``d_model``)."""
  width = int(factor * d_model) if isinstance(factor, int | float) else 0
  if width < num_heads or width % num_heads:
    raise ValueError(
      f"{field}: expected {field} * d_model to be a positive multiple of num_heads={num_heads}, "
      f"got {factor!r} * {d_model} = {width}"
    )
