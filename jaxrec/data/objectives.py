"""Training objectives expressed in the batch: ``inputs``, ``targets`` and ``weights`` rewritten so
that the plain weighted cross-entropy of ``jaxrec.train``'s step computes them.

**JRT-RNN** ("Just read twice", Arora et al. 2024, §4): prefix linear attention reads the first
``M`` tokens of a document non-causally, so next-token prediction there would see the answer. The
objective is next-token loss (NTP) after the prefix plus a masked-LM loss (MLM) on it: 15% of the
prefix tokens are replaced by a mask token and predicted at their own position::

  L = (w_ntp · L_NTP + w_mlm · L_MLM) / (w_ntp + w_mlm),    w = (1, 0.25)

the paper's normalized form (its code adds ``L_NTP + 0.25 L_MLM`` unnormalized, the same up to a
constant factor). Each ``L`` is a mean over its tokens *of one row*: a row's NTP weights are
``w_ntp / n_ntp`` and its MLM weights ``w_mlm / n_mlm``, so the step's loss
``Σ w·ce / Σ w`` is the mean over rows of the formula above, whatever rows a process or a
microbatch holds. The step's ``tokens`` metric then counts ``w_ntp + w_mlm`` per row, and bits per
byte are no longer meaningful.

Documents are the runs of ``segment_ids`` (a change of id starts one); segment 0 is padding and is
never masked. NTP keeps the batch's own weights (e.g. none across documents) outside the prefix.
"""

import grain
import numpy as np


def jrt_objective(
  batch: dict[str, np.ndarray],
  rng: np.random.Generator,
  *,
  prefix_len: int,
  mask_id: int,
  mask_rate: float = 0.15,
  ntp_weight: float = 1.0,
  mlm_weight: float = 0.25,
) -> dict[str, np.ndarray]:
  """The JRT-RNN objective on an LM batch (module docstring).

  Args:
    batch: ``inputs``, ``targets``, ``segment_ids`` (int ``[B, T]``) and ``weights``
      (``[B, T]``), as ``make_lm_dataset`` or ``task_dataset`` give; other keys pass through.
    rng: draws the masked positions.
    prefix_len: ``M``, the prefix of every document (the model's ``pla.prefix_len`` option).
    mask_id: the token that replaces masked inputs, one the data never contains.
    mask_rate: the fraction of prefix tokens masked.
    ntp_weight: ``w_ntp``.
    mlm_weight: ``w_mlm``.

  Returns:
    A new batch: masked ``inputs``, the original token as the ``targets`` of masked positions,
    and the normalized ``weights`` (float32).
  """
  _check_args(prefix_len, mask_id, mask_rate, ntp_weight, mlm_weight)
  inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
  segment_ids, weights = np.asarray(batch["segment_ids"]), np.asarray(batch["weights"], np.float32)
  in_prefix = _document_offsets(segment_ids) < prefix_len
  masked = in_prefix & (segment_ids != 0) & (rng.random(inputs.shape) < mask_rate)
  ntp = np.where(in_prefix, 0.0, weights)
  ntp = ntp_weight * ntp / np.maximum(ntp.sum(axis=1, keepdims=True), 1e-30)
  mlm = mlm_weight * masked / np.maximum(masked.sum(axis=1, keepdims=True), 1)
  return {
    **batch,
    "inputs": np.where(masked, mask_id, inputs).astype(inputs.dtype),
    "targets": np.where(masked, inputs, targets).astype(targets.dtype),
    "weights": np.where(masked, mlm, ntp).astype(np.float32),
  }


class JRTObjective(grain.transforms.RandomMap):
  """``jrt_objective`` as a grain transform of batches: ``ds.random_map(JRTObjective(...),
  seed=seed)``; the arguments are ``jrt_objective``'s."""

  def __init__(
    self,
    *,
    prefix_len: int,
    mask_id: int,
    mask_rate: float = 0.15,
    ntp_weight: float = 1.0,
    mlm_weight: float = 0.25,
  ):
    _check_args(prefix_len, mask_id, mask_rate, ntp_weight, mlm_weight)
    self._kwargs = dict(
      prefix_len=prefix_len,
      mask_id=mask_id,
      mask_rate=mask_rate,
      ntp_weight=ntp_weight,
      mlm_weight=mlm_weight,
    )

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return jrt_objective(element, rng, **self._kwargs)


def _document_offsets(segment_ids: np.ndarray) -> np.ndarray:
  """``[B, T]``: each token's position within its document (a run of equal ids)."""
  steps = np.broadcast_to(np.arange(segment_ids.shape[1]), segment_ids.shape)
  starts = np.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
  return steps - np.maximum.accumulate(np.where(starts, steps, 0), axis=1)


def _check_args(prefix_len, mask_id, mask_rate, ntp_weight, mlm_weight):
  for name, value in (("prefix_len", prefix_len), ("mask_id", mask_id)):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
      raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
  if not 0 <= mask_rate <= 1:
    raise ValueError(f"mask_rate: expected a value in [0, 1], got {mask_rate!r}")
  for name, w in (("ntp_weight", ntp_weight), ("mlm_weight", mlm_weight)):
    if not w >= 0:
      raise ValueError(f"{name}: expected a weight >= 0, got {w!r}")
