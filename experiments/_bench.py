"""What the benchmarks share: the line that names the machine, and a median of timed calls."""

import os
import platform
import statistics
import time

import jax


def machine() -> str:
  """The machine, backend and JAX version, for the line every benchmark prints first."""
  return (
    f"machine: {platform.platform()}, {platform.machine()} {platform.processor() or ''}, "
    f"{os.cpu_count()} CPUs, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"jax {jax.__version__}"
  )


def median_seconds(fn, *args, repeats: int) -> float:
  """The median wall time of ``repeats`` calls of ``fn(*args)``, after one call that compiles
  and warms up; every call is waited for (``jax.block_until_ready``)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
