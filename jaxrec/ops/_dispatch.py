"""Backend-dependent choices for ``method="auto"``."""

import functools

import jax


def default_backend() -> str:
  return jax.default_backend()


@functools.cache
def pallas_interpret() -> bool:
  """Kernels called on CPU run in interpret mode."""
  return default_backend() == "cpu"
