"""Parameters annotated with logical axis names, and with whether weight decay applies.

Every parameter in jaxrec carries its logical axes (``"vocab", "embed", "mlp", "heads",
"kv_heads", "head_dim", "rank", "norm", "layers", "expert", "router"``) as NNX ``out_sharding``
metadata; ``jaxrec.sharding.tree_shardings`` maps them onto mesh axes with one rules table
(``LOGICAL_AXIS_RULES``).

A parameter that must never be weight-decayed whatever its shape (a recurrent gate's diagonal, a
peephole, a gate bias that sets a memory's time scale) says so with ``weight_decay=False``
metadata; ``jaxrec.train.optim.weight_decay_mask`` reads it before its shape rules.
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
  *,
  weight_decay: bool | None = None,
) -> nnx.Param:
  """``nnx.Param(init(key, shape, dtype))`` whose metadata names its axes.

  The value is sharded at creation (NNX eager sharding) only when a mesh is set
  (``jax.set_mesh``); built without one, the model lives on the default device and the names
  are metadata for ``nnx.get_partition_spec``. Under a mesh, the names must resolve through
  ``nnx.logical_axis_rules``.

  Args:
    init: ``init(key, shape, dtype)`` draws the value.
    key: its random key.
    shape: the parameter's shape.
    dtype: its storage dtype.
    names: one logical axis name (or ``None``) per axis.
    weight_decay: ``False`` keeps the parameter out of weight decay, ``True`` decays it; ``None``
      (no metadata) leaves the choice to the optimizer's shape rules.
  """
  if len(names) != len(shape):
    raise ValueError(
      f"names: expected {len(shape)} axis names for shape {tuple(shape)}, got {names}"
    )
  if weight_decay is not None and not isinstance(weight_decay, bool):
    raise ValueError(f"weight_decay: expected True, False or None, got {weight_decay!r}")
  eager = nnx.using_eager_sharding() and meta.global_mesh_defined()
  metadata = {} if weight_decay is None else {"weight_decay": weight_decay}
  return nnx.Param(
    init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=eager, **metadata
  )
