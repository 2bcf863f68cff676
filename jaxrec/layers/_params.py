"""Parameters annotated with logical axis names.

Every parameter in jaxrec carries its logical axes (``"vocab", "embed", "mlp", "heads",
"kv_heads", "head_dim", "rank", "norm", "layers"``) as NNX ``out_sharding`` metadata; the trainer
maps them onto mesh axes with one rules table (``nnx.logical_axis_rules``).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta


def logical_param(
  init: Callable[..., jax.Array],
  key: jax.Array,
  shape: Sequence[int],
  dtype: jnp.dtype,
  names: Sequence[str | None],
) -> nnx.Param:
  """``nnx.Param(init(key, shape, dtype))`` whose metadata names its axes.

  The value is sharded at creation (NNX eager sharding) only when a mesh is set
  (``jax.set_mesh``); built without one, the model lives on the default device and the names
  are metadata for ``nnx.get_partition_spec``. Under a mesh, the names must resolve through
  ``nnx.logical_axis_rules``.
  """
  if len(names) != len(shape):
    raise ValueError(
      f"names: expected {len(shape)} axis names for shape {tuple(shape)}, got {names}"
    )
  eager = nnx.using_eager_sharding() and meta.global_mesh_defined()
  return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=eager)
