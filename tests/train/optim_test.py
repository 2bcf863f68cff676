"""Learning-rate schedules against closed forms; the weight-decay mask on a real model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# Every parameter that decays in an LM with every mixer, per block (the mixer, then its MLP);
# everything else -- the embedding, norm scales, biases, ParaRNN's recurrent diagonals and
# peepholes -- must not.
_MLP = ("mlp.gate.kernel", "mlp.up.kernel", "mlp.down.kernel")
DECAYED_PER_BLOCK = {
  "gla": (
    "mixer.q_proj.kernel",
    "mixer.k_proj.kernel",
    "mixer.v_proj.kernel",
    "mixer.g_proj.kernel",
    "mixer.decay_down.kernel",
    "mixer.decay_up.kernel",
    "mixer.o_proj.kernel",
    *_MLP,
  ),
  "attention": (
    "mixer.q_proj.kernel",
    "mixer.k_proj.kernel",
    "mixer.v_proj.kernel",
    "mixer.o_proj.kernel",
    *_MLP,
  ),
  "paragru": (
    "mixer.in_proj.kernel",
    "mixer.gate_proj.kernel",
    "mixer.cell_proj.kernel",
    "mixer.out_proj.kernel",
    *_MLP,
  ),
}
DECAYED_PER_BLOCK["paralstm"] = DECAYED_PER_BLOCK["paragru"]
PATTERN = ("gla", "attention", "paragru", "paralstm")


def _every_mixer_lm(scan_layers):
  """The abstract parameters of a small LM with every mixer and an untied head."""
  cfg = get_preset(
    "tiny",
    vocab_size=32,
    d_model=16,
    num_layers=4 * (1 + scan_layers),
    num_heads=2,
    mixer_pattern=PATTERN,
    scan_layers=scan_layers,
    tie_embeddings=False,
  )
  return nnx.state(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _paths(tree):
  """``{"layers.0.mixer.q_proj.kernel": leaf}`` of a tree of ``nnx.Variable`` or arrays."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  return {
    ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_var)
  }


def _expected_decayed(scan_layers):
  prefix = "layers.blocks.{}" if scan_layers else "layers.{}"
  return {"head.kernel"} | {
    f"{prefix.format(i)}.{leaf}"
    for i, name in enumerate(PATTERN)
    for leaf in DECAYED_PER_BLOCK[name]
  }


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_mask_names_exactly_the_decayed_parameters(scan_layers):
  params = _every_mixer_lm(scan_layers)
  mask = _paths(optim.weight_decay_mask(params))
  decayed = {path for path, flag in mask.items() if flag}
  assert decayed == _expected_decayed(scan_layers)
  # The list is not vacuous: the recurrent gates are there, and left alone.
  assert {"recurrent", "peephole"} <= {path.rsplit(".", 1)[-1] for path in mask}


def test_adamw_decays_only_the_masked_parameters():
  """Through the optimizer: with zero gradients an AdamW step moves exactly the decayed
  parameters, each by ``-lr · weight_decay · p``."""
  # Distinct values per parameter (numpy, so no per-shape eager compilation).
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda v: v.replace(rng.standard_normal(v.shape).astype(v.dtype)),
    _every_mixer_lm(scan_layers=False),
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  lr, wd = 0.1, 0.5
  tx = optim.make_optimizer(optax.constant_schedule(lr), weight_decay=wd, clip_norm=None)
  zero_grad_update = lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]
  updates = jax.jit(zero_grad_update)(params)
  want = _expected_decayed(scan_layers=False)
  values = _paths(params)
  for path, update in _paths(updates).items():
    expected = -lr * wd * np.asarray(values[path][...]) if path in want else 0.0
    np.testing.assert_allclose(update[...], expected, rtol=1e-6, atol=0, err_msg=path)
