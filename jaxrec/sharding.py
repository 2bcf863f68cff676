"""The device mesh and the one table that places parameters, optimizer state and batches on it.

This module sits at the bottom of the project, beside ``jaxrec.ops``: it imports nothing of
``jaxrec``, so layers (MoE's expert parallelism), models (checkpoint loaders placing each
parameter in its sharding) and training all read the same axis names and rules. What is about
processes and input (``global_batch``, ``process_rows``, ``initialize_distributed``) lives in
``jaxrec.train.distributed``.

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
from absl import logging
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
EXPERT_AXIS = "expert"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS, EXPERT_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS, EXPERT_AXIS)

# Logical axis name -> mesh axes. Every name a parameter may carry must appear here; None means
# replicated. This is the only place that decides what is sharded over what.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("embed", FSDP_AXIS),
  ("mlp", TENSOR_AXIS),
  ("heads", TENSOR_AXIS),
  ("kv_heads", TENSOR_AXIS),
  ("vocab", TENSOR_AXIS),
  ("head_dim", None),
  ("rank", None),
  ("taps", None),
  ("norm", None),
  ("layers", None),
  ("expert", EXPERT_AXIS),
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
  requested = {EXPERT_AXIS: 1, **requested}
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
    axes = tuple(a for a in axes if not (a == EXPERT_AXIS and mesh.shape.get(a, 1) == 1))
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
  """``[B, ...]`` arrays split over the batch axes (``batch_axes``)."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: those of ``BATCH_AXES`` that ``mesh`` has, less an
  ``expert`` axis of size 1 (so a mesh without expert parallelism splits the batch as before
  the axis existed).

  ``mesh`` may be abstract (``jax.sharding.get_abstract_mesh()`` inside a traced layer, empty
  when no mesh is set: then the batch is not split).
  """
  return tuple(
    a for a in BATCH_AXES if a in mesh.shape and not (a == EXPERT_AXIS and mesh.shape[a] == 1)
  )
