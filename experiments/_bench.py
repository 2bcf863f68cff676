"""What the benchmarks and experiments share: the description of the machine that a result was
measured on, a median of timed calls with its spread, the memory bandwidth that a
memory-bound step is measured against, and the bare greedy decode loop the decode benchmarks
time."""

import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


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
  """The median wall time of ``repeats`` calls of ``fn(*args)`` (``timings``)."""
  return statistics.median(timings(fn, *args, repeats=repeats))


def timings(fn, *args, repeats: int) -> list[float]:
  """Wall times of ``repeats`` calls of ``fn(*args)`` after one that compiles and warms up; every
  call is waited for (``jax.block_until_ready``)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def spread(times: list[float]) -> float:
  """``(slowest - fastest) / median``: how far one timing can be trusted on a shared machine."""
  return (max(times) - min(times)) / statistics.median(times)


def read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
  """Bytes per second that one jitted reduction reads from memory (an array of ``nbytes`` float32,
  larger than the caches), from the fastest of ``repeats`` timed calls: the bandwidth that a
  decoding step, which reads its weights and its cache once, is bounded by. The fastest, not the
  median: on shared cores a median moved by half between runs, and a bound is what the memory
  can do."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  return nbytes / min(timings(jax.jit(jnp.sum), x, repeats=repeats))


def array_bytes(tree) -> int:
  """Bytes of every array in ``tree``."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def greedy_decoder(model: nnx.Module, steps: int):
  """``(decode, state)``: ``decode(state, cache, token) -> (token, cache)`` runs ``steps`` greedy
  one-token steps of ``model`` in one jit, the cache donated (updated in place), as the decode
  benchmarks time it; ``state`` is the model's, to pass (or bind) as the first argument."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def decode(state, cache, token):
    model = nnx.merge(graphdef, state)

    def step(_, carry):
      token, cache = carry
      logits, cache = model(token[:, None], cache=cache)
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    return lax.fori_loop(0, steps, step, (token, cache))

  return decode, state
