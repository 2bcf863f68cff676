"""Backend-dependent choices for ``method="auto"``."""

import functools

import jax


def default_backend() -> str:
  return jax.default_backend()


def pallas_available() -> bool:
  """Compiled Pallas kernels run on GPU and TPU; the CPU only has the (slow) interpreter."""
  return default_backend() in ("gpu", "tpu")


@functools.cache
def pallas_interpret() -> bool:
  """Kernels called on CPU run in interpret mode."""
  return default_backend() == "cpu"
