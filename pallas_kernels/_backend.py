"""Per-backend ``pallas_call`` parameters shared by the kernels."""

import jax


def compiled_on(backend: str, interpret) -> bool:
  """True when the kernel is compiled (not interpreted) for ``backend`` ("gpu" or "tpu")."""
  return not interpret and jax.default_backend() == backend


def compiler_params(interpret, *, dimension_semantics, num_warps=4, num_stages=None):
  """Compiler parameters for the current backend; ``None`` in the interpreter.

  TPU: Mosaic with the grid's ``dimension_semantics`` (the time/chunk axis "arbitrary" so it runs
  in order and a carry can live in a resident output block). GPU: the Triton backend. JAX 0.11
  deprecates it, but in JAX 0.11.2 Mosaic GPU has no ``pallas_call`` lowering for these kernels
  (it stages whole blocks in shared memory, and a whole-sequence block does not fit), while Triton
  refs are global-memory pointers. The backend modules are imported only on their backend.
  """
  if compiled_on("tpu", interpret):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
  if compiled_on("gpu", interpret):
    from jax.experimental.pallas import triton as pltriton

    stages = {} if num_stages is None else {"num_stages": num_stages}
    return pltriton.CompilerParams(num_warps=num_warps, **stages)
  return None
