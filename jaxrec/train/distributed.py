"""Processes and their input: joining a multi-process job, the rows of the global batch each
process loads, and assembling those rows into global arrays on the mesh.

The mesh and the placement rules themselves are ``jaxrec.sharding``; this module is what a
training loop needs on top of them when the mesh spans several processes.
"""

from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jaxrec.sharding import batch_sharding


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's ``[B / processes, ...]`` numpy rows into global ``[B, ...]`` arrays
  split over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local.items():
    global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def process_rows(mesh: Mesh, batch_size: int) -> list[int]:
  """The rows of a global ``[B, ...]`` batch held by this process's devices, in the order
  ``jax.make_array_from_process_local_data`` reads them from the process's local rows (sorted).

  With one process, all ``B`` rows; on several, each process's data pipeline loads only these.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  return sorted({row for index in indices.values() for row in range(*index[0].indices(batch_size))})


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins a multi-process job with ``jax.distributed.initialize``.

  On TPU pods, SLURM and GCE every argument is detected and may stay ``None``; elsewhere give
  all three (the same address and count on every process, ``process_id`` from 0). CPU processes
  exchange collectives over gloo, JAX's default CPU implementation.
  """
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info("process %d of %d", jax.process_index(), jax.process_count())
