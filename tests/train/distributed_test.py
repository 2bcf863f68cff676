"""A global batch assembled from the process's rows, on 8 fake CPU devices."""

import jax
import numpy as np

from jaxrec import sharding
from jaxrec.train import distributed

P = jax.P


def test_global_batch_is_split_over_data_and_fsdp():
  mesh = sharding.make_mesh((2, 2, 2))
  local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
  batch = distributed.global_batch(local, mesh)["inputs"]
  assert batch.shape == (8, 3)
  assert batch.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch), local["inputs"])
  rows = sorted((s.index[0].start, s.index[0].stop) for s in batch.addressable_shards)
  # 4 batch shards of 2 rows, each held by the 2 devices of the tensor axis.
  assert rows == sorted([(2 * i, 2 * i + 2) for i in range(4)] * 2)


def test_one_process_loads_every_row():
  """With one process every device is local, so it loads the whole batch, in order."""
  assert distributed.process_rows(sharding.make_mesh((2, 2, 2)), 8) == list(range(8))
  assert distributed.process_rows(sharding.make_mesh((2, 1, 1, 4)), 16) == list(range(16))
