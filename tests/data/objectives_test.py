"""jaxrec.data.jrt_objective: masked positions, targets and weights against the formula of the
JRT-RNN loss computed here per row."""

import numpy as np
import pytest

from jaxrec import data

M, MASK = 5, 99


def _batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 50, (3, 16)).astype(np.int32)
  segment_ids = np.array([[0] * 4 + [1] * 12, [1] * 8 + [2] * 8, [1] * 16], np.int32)
  weights = (segment_ids > 0).astype(np.float32)
  targets = np.roll(inputs, -1, axis=1)
  return dict(inputs=inputs, targets=targets, segment_ids=segment_ids, weights=weights)


def test_jrt_objective_is_ntp_after_the_prefix_plus_weighted_mlm_on_it():
  batch = _batch()
  out = data.jrt_objective(
    batch, np.random.default_rng(1), prefix_len=M, mask_id=MASK, mask_rate=0.5, mlm_weight=0.25
  )
  in_prefix = np.zeros((3, 16), bool)
  in_prefix[0, 4:9] = in_prefix[1, 0:5] = in_prefix[1, 8:13] = in_prefix[2, 0:5] = True
  masked = out["inputs"] == MASK
  assert masked.any() and not (masked & ~in_prefix).any()
  assert np.array_equal(out["inputs"][~masked], batch["inputs"][~masked])
  assert np.array_equal(out["targets"][masked], batch["inputs"][masked])
  assert np.array_equal(out["targets"][~masked], batch["targets"][~masked])
  # The step's Σ w·ce / Σ w is then the mean over rows of (L_ntp + 0.25 L_mlm) / 1.25.
  ce = np.random.default_rng(2).random((3, 16))
  got = np.sum(out["weights"] * ce) / np.sum(out["weights"])
  ntp = batch["weights"] * ~in_prefix
  want = np.mean(
    [
      ((ce[r] * ntp[r]).sum() / ntp[r].sum() + 0.25 * ce[r][masked[r]].mean()) / 1.25
      for r in range(3)
    ]
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # As a grain transform: deterministic by seed.
  ds = data.tasks.task_dataset(
    data.tasks.MQAR(vocab_size=16, seq_len=16, num_pairs=2),
    num_examples=4,
    batch_size=2,
    seq_len=16,
    seed=0,
  )
  t = data.JRTObjective(prefix_len=4, mask_id=16)
  a, b = (ds.random_map(t, seed=3)[0]["inputs"] for _ in range(2))
  assert np.array_equal(a, b)


def test_jrt_objective_bad_arguments():
  with pytest.raises(ValueError, match="mask_rate: expected"):
    data.jrt_objective(_batch(), np.random.default_rng(0), prefix_len=M, mask_id=1, mask_rate=2)
  with pytest.raises(ValueError, match="prefix_len: expected"):
    data.JRTObjective(prefix_len=-1, mask_id=1)
