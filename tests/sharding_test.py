"""Mesh shapes, the logical-axis rules and the batch axes, on 8 fake CPU devices."""

import jax
import pytest

from jaxrec import sharding

P = jax.P


def test_mesh_shape_fills_the_auto_axis():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1, "expert": -1}, 8) == (1, 1, 1, 8)
  assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 8) == (1, 1, 1, 1)


@pytest.mark.parametrize(
  "requested, message",
  [
    (
      {"data": -1, "fsdp": 3, "tensor": 1},
      "mesh.fsdp: expected a size dividing the 8 devices, got 3",
    ),
    (
      {"data": -1, "fsdp": -1, "tensor": 1},
      "mesh.data, mesh.fsdp: at most one mesh axis may be -1",
    ),
    ({"data": 2, "fsdp": 2, "tensor": 4}, "mesh.data=2, mesh.fsdp=2, mesh.tensor=4: .* got 16"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "mesh.data: expected a positive integer or -1, got 0"),
  ],
)
def test_mesh_shape_errors_name_the_axis(requested, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(requested, 8)


def test_rules_cover_the_logical_vocabulary():
  names = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
  vocabulary = {
    "batch",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "rank",
    "taps",
    "norm",
    "layers",
    "expert",
    "router",
  }
  assert names == vocabulary
  assert len(names) == len(sharding.LOGICAL_AXIS_RULES)  # one rule per name


def test_logical_to_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  to_mesh = lambda names, shape: sharding.logical_to_mesh(names, shape, mesh, "w")
  assert to_mesh(("embed", "mlp"), (8, 16)) == P("fsdp", "tensor")
  assert to_mesh(("vocab", "embed"), (260, 8)) == P("tensor", "fsdp")
  assert to_mesh(("layers", "embed", "heads", "head_dim"), (3, 8, 4, 16)) == P(
    None, "fsdp", "tensor", None
  )
  assert to_mesh(("batch", None), (8, 5)) == P(("data", "fsdp"), None)
  assert to_mesh(("norm",), (8,)) == P(None)
  # A mesh axis that does not divide the dimension is dropped: 259 is odd, 2 rows split over data.
  assert to_mesh(("vocab", "embed"), (259, 8)) == P(None, "fsdp")
  assert to_mesh(("batch",), (2,)) == P("data")
  assert to_mesh(("kv_heads", "head_dim"), (1, 16)) == P(None, None)
  # A mesh axis is used once per array: the second tensor-mapped dimension stays whole.
  assert to_mesh(("heads", "mlp"), (4, 8)) == P("tensor", None)
  with pytest.raises(ValueError, match="w: logical axis 'conv' is not in LOGICAL_AXIS_RULES"):
    to_mesh(("conv", "embed"), (4, 8))


def test_batch_axes_are_those_the_mesh_has():
  """The batch splits over data and fsdp, and over expert only where it is larger than 1; a mesh
  made outside ``make_mesh`` (or the empty abstract mesh a layer sees without one) names only
  the axes it has."""
  assert sharding.batch_axes(sharding.make_mesh((2, 2, 2))) == ("data", "fsdp")
  assert sharding.batch_axes(sharding.make_mesh((2, 1, 1, 4))) == ("data", "fsdp", "expert")
  assert sharding.batch_axes(jax.make_mesh((2, 4), ("expert", "tensor"))) == ("expert",)
  assert sharding.batch_axes(jax.make_mesh((8,), ("tensor",))) == ()
  assert sharding.batch_axes(jax.sharding.get_abstract_mesh()) == ()
  with jax.set_mesh(sharding.make_mesh((2, 1, 1, 4))):
    assert sharding.batch_axes(jax.sharding.get_abstract_mesh()) == ("data", "fsdp", "expert")
  assert sharding.batch_sharding(sharding.make_mesh((2, 1, 1, 4))).spec == P(
    ("data", "fsdp", "expert")
  )
