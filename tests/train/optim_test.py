"""Learning-rate schedules against closed forms; the weight-decay mask on a real model."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrec.models import LM, get_preset
from jaxrec.train import optim


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_warmup_cosine_shape():
  peak, end, total, warmup = 1e-3, 1e-4, 100, 10
  schedule = optim.warmup_cosine_schedule(peak, total, warmup, end)
  steps = np.arange(total + 5)
  expected = np.where(
    steps < warmup,
    peak * steps / warmup,
    end
    + (peak - end) * 0.5 * (1 + np.cos(np.pi * np.clip((steps - warmup) / (total - warmup), 0, 1))),
  )
  np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-5, atol=1e-12)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(total)), end, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(total + 50)), end, rtol=1e-5)


@pytest.mark.parametrize(
  "shape, remaining",
  [
    ("linear", lambda p: 1 - p),
    ("cosine", lambda p: 0.5 * (1 + np.cos(np.pi * p))),
    ("1-sqrt", lambda p: 1 - np.sqrt(p)),
  ],
)
def test_wsd_rewarms_holds_and_cools_down(shape, remaining):
  peak, init, end, total, warmup, decay = 1e-3, 2e-4, 1e-5, 100, 10, 20
  schedule = optim.wsd_schedule(
    peak, total, warmup, decay, init_lr=init, end_lr=end, decay_shape=shape
  )
  steps = np.arange(total + 5)
  progress = np.clip((steps - (total - decay)) / decay, 0, 1)
  expected = np.where(
    steps < warmup,
    init + (peak - init) * steps / warmup,
    np.where(steps < total - decay, peak, end + (peak - end) * remaining(progress)),
  )
  np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-5, atol=1e-12)
  # Re-warming starts from the previous run's learning rate, not from zero.
  np.testing.assert_allclose(float(schedule(0)), init, rtol=1e-6)
  np.testing.assert_allclose(_values(schedule, range(warmup, total - decay)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(total)), end, rtol=1e-5)


def test_schedule_arguments_are_checked():
  with pytest.raises(
    ValueError, match="warmup_steps \\+ decay_steps: expected at most total_steps=10"
  ):
    optim.wsd_schedule(1.0, 10, 6, 5)
  with pytest.raises(ValueError, match="decay_shape: expected one of"):
    optim.wsd_schedule(1.0, 10, 1, 1, decay_shape="step")
  with pytest.raises(ValueError, match="total_steps: expected a positive integer, got 0"):
    optim.warmup_cosine_schedule(1.0, 0, 0)
  with pytest.raises(ValueError, match="clip_norm"):
    optim.make_optimizer(optim.warmup_cosine_schedule(1.0, 10, 1), clip_norm=0.0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_covers_kernels_only(scan_layers):
  cfg = get_preset(
    "tiny",
    d_model=32,
    num_layers=2,
    num_heads=2,
    mixer_pattern=("gla", "attention"),
    scan_layers=scan_layers,
  )
  model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  mask = optim.weight_decay_mask(params)
  is_var = lambda x: isinstance(x, nnx.Variable)
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_var)
  ]
  decayed = dict(zip(paths, jax.tree.leaves(mask), strict=True))
  # Dense kernels (2-D or more) decay; embedding, norm scales and biases do not.
  for path, flag in decayed.items():
    assert flag == path.endswith("['kernel']"), path
  assert any(path.endswith("['bias']") for path in decayed)  # GLA's decay projection has one
  assert math.fsum(decayed.values()) > 0
