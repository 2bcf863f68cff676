"""The device mesh and the one table that places parameters, optimizer state and batches on it.

Mesh axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data parallelism
with parameters and optimizer state sharded along ``embed``), ``tensor`` (model parallelism over
``mlp``, ``heads``, ``kv_heads`` and ``vocab``), ``expert`` (expert parallelism: MoE experts
split over it, and the batch too, so each device routes its own tokens; size 1 unless asked, so
three-axis shapes and older checkpoints keep working).

The mesh uses ``AxisType.Auto``: shardings are given for parameters and batches only and XLA
(GSPMD) propagates them through the model. ``AxisType.Explicit`` (the ``jax.make_mesh`` default
since JAX 0.9) types every intermediate with its sharding and refuses ops whose output sharding is
ambiguous: with jax 0.10.2 the FSDP embedding lookup ``table[tokens]`` (table ``vocab@tensor,
embed@fsdp``, tokens ``batch@(data, fsdp)``) raises ``ShardingTypeError`` unless the model passes
``out_sharding`` to the gather. The models are written without such annotations, so Auto mode is
what lets the same model code run on any mesh.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis name -> mesh axes. Every name a parameter may carry must appear here; None means
# replicated. This is the only place that decides what is sharded over what.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("vocab", "tensor"),
  ("head_dim", None),
  ("rank", None),
  ("taps", None),
  ("norm", None),
  ("layers", None),
  ("expert", "expert"),
  ("router", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def mesh_shape(
  requested: Mapping[str, int], num_devices: int, flag_prefix: str = "mesh"
) -> tuple[int, ...]:
  """Resolves ``{"data": d, "fsdp": f, "tensor": t, "expert": e}`` (one entry may be -1;
  ``expert`` may be left out, meaning 1) to a mesh shape.

  Args:
    requested: size per mesh axis; ``-1`` on at most one axis takes the remaining devices.
    num_devices: devices available.
    flag_prefix: how the sizes are spelled in errors (``--config.mesh`` in the launcher).

  Returns:
    ``(data, fsdp, tensor, expert)`` whose product divides ``num_devices``.

  Raises:
    ValueError: naming the offending axis (e.g. ``mesh.fsdp``) when a size is not a positive
      integer or -1, when more than one axis is -1, or when the sizes do not divide the devices.
  """
  sizes = {}
  given = set(requested)
  requested = {"expert": 1, **requested}
  for axis in MESH_AXES:
    value = requested[axis]
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"{flag_prefix}.{axis}: expected a positive integer or -1, got {value!r}")
    sizes[axis] = value
  auto = [a for a in MESH_AXES if sizes[a] == -1]
  if len(auto) > 1:
    names = ", ".join(f"{flag_prefix}.{a}" for a in auto)
    raise ValueError(f"{names}: at most one mesh axis may be -1, got {len(auto)}")
  for axis in MESH_AXES:
    if sizes[axis] != -1 and num_devices % sizes[axis]:
      raise ValueError(
        f"{flag_prefix}.{axis}: expected a size dividing the {num_devices} devices, "
        f"got {sizes[axis]}"
      )
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % fixed:
    names = ", ".join(
      f"{flag_prefix}.{a}={sizes[a]}" for a in MESH_AXES if sizes[a] != -1 and a in given
    )
    raise ValueError(
      f"{names}: expected sizes whose product divides the {num_devices} devices, got {fixed}"
    )
  if auto:
    sizes[auto[0]] = num_devices // fixed
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor, expert)`` mesh in Auto mode over the first ``prod(shape)`` devices;
  a shape of three (no ``expert``) gets an ``expert`` axis of size 1."""
  shape = tuple(shape) + (1,) * (len(MESH_AXES) - len(shape))
  devices = list(jax.devices() if devices is None else devices)
  size = math.prod(shape)
  if size < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", tuple(shape), size, len(devices))
  return jax.make_mesh(
    tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:size]
  )


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, what: str) -> P:
  """The ``PartitionSpec`` of an array whose axes carry logical ``names``.

  A mesh axis that does not divide its array dimension, or that an earlier dimension already
  uses, is dropped for that dimension (the dimension is replicated over it) rather than failing:
  e.g. a single KV head stays whole on a ``tensor=2`` mesh.

  Raises:
    ValueError: a name is not in ``LOGICAL_AXIS_RULES`` (``what`` says which array).
  """
  if len(names) != len(shape):
    raise ValueError(f"{what}: expected {len(shape)} logical axis names, got {tuple(names)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape, strict=True):
    if name is None:
      spec.append(None)
      continue
    if name not in _RULES:
      raise ValueError(
        f"{what}: logical axis {name!r} is not in LOGICAL_AXIS_RULES {tuple(_RULES)}"
      )
    target = _RULES[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    # An expert axis of size 1 is left out, so meshes without expert parallelism keep the
    # specs (and checkpoints) they had before the axis existed.
    axes = tuple(a for a in axes if not (a == "expert" and mesh.shape.get(a, 1) == 1))
    for axis in axes:
      if axis in used or dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def tree_shardings(tree, mesh: Mesh):
  """``NamedSharding`` for every array of ``tree`` (model state, optimizer state, ...).

  ``nnx.Variable`` leaves are placed by their ``out_sharding`` logical names (optimizer moments
  inherit them from the parameters they mirror); arrays without names (step counters) are
  replicated. The result has the structure of ``tree``, Variables included, so it serves as
  ``out_shardings`` of ``jax.jit`` and as the target shardings of a checkpoint restore.
  """

  def place(path, leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      what = jax.tree_util.keystr(path)
      spec = logical_to_mesh(names, leaf.shape, mesh, what) if names else P()
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(
    place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """``[B, ...]`` arrays split over the batch axes (``data`` and ``fsdp``)."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: ``BATCH_AXES`` less an ``expert`` axis of size 1."""
  return tuple(a for a in BATCH_AXES if not (a == "expert" and mesh.shape.get(a, 1) == 1))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's ``[B / processes, ...]`` numpy rows into global ``[B, ...]`` arrays."""
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
