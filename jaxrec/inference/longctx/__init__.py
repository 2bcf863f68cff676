"""Long-context inference policies for ``jaxrec.layers.Attention`` (see ``policy``'s docstring).

Each method is a static config object with its paper's defaults, applied to a model by module
substitution (``substitution``'s docstring): ``apply(model, policy)`` returns a plain ``LM`` whose
attention layers read their keys through the policy, for ``model(...)``, ``jaxrec.generate``,
``Sampler`` and ``loglikelihood`` as they are::

  long_model = longctx.apply(model, longctx.lm_infinite(10, 4096, 4096))
  jaxrec.generate(long_model, prompt, 64)

The methods:

* ``lm_infinite(global_tokens, window, distance_cap)``: Λ-shaped mask with a distance cap;
* ``longheads(chunk_size, chunks_per_head)``: each head attends to its own top chunks;
* ``recycled(k, stride)`` (``dynamic=True``: query-similarity schedule): a small recycled cache
  refreshed by periodic full steps;
* ``set_based(prefix, options, suffix)``: order-invariant options (2-D mask and positions);
  ``set_based_rows()`` the same with each row's layout written into the cache at run time
  (``write_layout``), so prompts of different layouts share one batch and one program;
* ``think(channel_ratio, eviction=SnapKV(...))``: pruned key channels, optional token eviction.
"""

from jaxrec.inference.longctx.lm_infinite import LMInfinite, LMInfiniteCache
from jaxrec.inference.longctx.longheads import LongHeads, LongHeadsCache, LongHeadsEmpty
from jaxrec.inference.longctx.policy import Policy, cache_bytes, check_policy
from jaxrec.inference.longctx.recycled import Recycled, RecycledCache
from jaxrec.inference.longctx.set_based import (
  SetBased,
  SetBasedCache,
  SetBasedRows,
  SetBasedRowsCache,
  write_layout,
)
from jaxrec.inference.longctx.substitution import PolicyAttention, apply, chunked, policy_of
from jaxrec.inference.longctx.think import SnapKV, ThinK, ThinKCache, ThinKEmpty, ThinKFilling

lm_infinite = LMInfinite
longheads = LongHeads
recycled = Recycled
set_based = SetBased
set_based_rows = SetBasedRows
think = ThinK

__all__ = [
  "LMInfinite",
  "LMInfiniteCache",
  "LongHeads",
  "LongHeadsCache",
  "LongHeadsEmpty",
  "Policy",
  "PolicyAttention",
  "Recycled",
  "RecycledCache",
  "SetBased",
  "SetBasedCache",
  "SetBasedRows",
  "SetBasedRowsCache",
  "SnapKV",
  "ThinK",
  "ThinKCache",
  "ThinKEmpty",
  "ThinKFilling",
  "apply",
  "cache_bytes",
  "check_policy",
  "chunked",
  "lm_infinite",
  "longheads",
  "policy_of",
  "recycled",
  "set_based",
  "set_based_rows",
  "think",
  "write_layout",
]
