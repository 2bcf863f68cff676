"""What the benchmarks and experiments share: the description of the machine that a result was
measured on, and a median of timed calls."""

import os
import platform
import statistics
import time

import jax


def machine() -> str:
  """The platform, CPU count, backend and device kind, JAX version and the load average (the
  machine's other work, which slows a timing on shared cores), as benchmarks print it first and
  experiments record it next to their numbers."""
  load = os.getloadavg() if hasattr(os, "getloadavg") else ()
  return (
    f"{platform.platform()}, {os.cpu_count()} CPUs, backend {jax.default_backend()} "
    f"({jax.devices()[0].device_kind}), jax {jax.__version__}, load average "
    + (", ".join(f"{x:.2f}" for x in load) or "unknown")
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
