"""jaxrec.ops.segment_starts against the definition written as a loop, in both directions."""

import numpy as np
import pytest

from jaxrec.ops import segment_starts


@pytest.mark.parametrize("reverse", [False, True])
def test_segment_starts_match_a_loop(reverse):
  # Row 1 reuses ids non-adjacently (0, 1, 0): every change is a new document.
  ids = np.array([[3, 3, 3, 5, 5, 9, 9, 9], [0, 1, 1, 0, 0, 0, 1, 1]], np.int32)
  want = np.zeros(ids.shape, bool)
  for t in range(ids.shape[1]):
    neighbour = t + 1 if reverse else t - 1
    if 0 <= neighbour < ids.shape[1]:
      want[:, t] = ids[:, t] != ids[:, neighbour]
  got = segment_starts(ids, reverse=reverse)
  assert got.dtype == bool
  np.testing.assert_array_equal(got, want)
  # The first step in scan direction never starts one: the state handed in feeds it.
  assert not np.any(np.asarray(got)[:, -1 if reverse else 0])
