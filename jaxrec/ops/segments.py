"""Packed sequences: where a new document starts.

Several documents share a row of a batch, labelled by integer ``segment_ids [B, T]`` (any ids;
a change of id between neighbouring steps is a boundary, so ids may repeat non-adjacently). Every
op and layer that packs sequences derives its resets from ``segment_starts``.
"""

import jax.numpy as jnp

from jaxrec.typing import SegmentIds, SegmentStarts


def segment_starts(segment_ids: SegmentIds, *, reverse: bool = False) -> SegmentStarts:
  """``[B, T]`` bool: true where step ``t`` starts a new document.

  Step ``t`` starts one when its id differs from that of the step before it; the first step is
  always false, because the state handed in (``initial_state``, a cache) feeds the first
  document of the row. With ``reverse`` the direction is that of a reverse recurrence: true where
  the id differs from the next step's, and the last step is always false.

  Args:
    segment_ids: integer ``[B, T]``.
    reverse: starts for a recurrence run from ``t = T-1`` down to 0.

  Returns:
    bool ``[B, T]``.
  """
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.pad(change, ((0, 0), (0, 1) if reverse else (1, 0)))
