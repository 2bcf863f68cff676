"""An MoE model's train step on 8 fake devices with an ``expert`` mesh axis (expert parallelism:
``shard_map`` and ``all_to_all``) equals the 1-device step; the routing statistics reach the
metrics. No capacity limit: with one, each device's tokens are a capacity group of their own
(GShard), which one device does not reproduce."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxrec
from experiments.configs import default
from jaxrec import sharding
from jaxrec.models import LM, LMConfig
from jaxrec.train import config_checks, distributed, optim
from jaxrec.train import step as step_lib

B, T = 8, 8
CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=1,
  num_heads=2,
  mixer_pattern=("attention",),
  ffn="moe",
  moe={
    "num_experts": 8,
    "top_k": 2,
    "router": "gru",
    "router_dim": 8,
    "capacity_factor": None,
    "hidden": 16,
  },
  init_std=0.2,
)


def _run(mesh):
  schedule = optim.warmup_cosine_schedule(1e-2, total_steps=4, warmup_steps=0)
  tx = optim.make_optimizer(schedule, weight_decay=0.1, eps=1e-3, clip_norm=0.5)
  make_model = lambda: LM(CFG, rngs=nnx.Rngs(0))
  graphdef, abstract = step_lib.abstract_train_state(make_model, tx, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, schedule, abstract, mesh)
  tokens = np.random.default_rng(0).integers(0, 32, (B, T + 1)).astype(np.int32)
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": np.ones((B, T), np.int32),
    "weights": np.ones((B, T), np.float32),
  }
  with jax.set_mesh(mesh):  # as the training loop runs: the MoE layers see the expert axis
    state = step_lib.init_train_state(make_model, tx, abstract)
    batch = distributed.global_batch(batch, mesh)
    lowered = train_step.lower(state, batch).as_text()
    state, metrics = train_step(state, batch)
  metrics = jax.tree.map(float, jax.device_get(metrics))
  return lowered, jax.tree.map(np.asarray, state.params), metrics


def test_expert_parallel_step_equals_one_device():
  """data=2 x expert=4: experts split 4 ways, the batch 8 ways."""
  one_device, want_params, want = _run(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  lowered, params, got = _run(sharding.make_mesh((2, 1, 1, 4)))
  assert "all_to_all" in lowered and "all_to_all" not in one_device
  for key in ("loss", "grad_norm", "moe/balance_loss", "moe/entropy", "moe/layer_mi_bits"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  assert want["moe/dropped"] == 0 and 0 < want["moe/entropy"] <= np.log(8)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), params, want_params
  )


def test_an_expert_axis_not_dividing_the_experts_names_the_flag():
  config = default.get_config()
  config.model.preset = "tiny-moe"
  config.model.moe.num_experts = 6  # --config.model.moe.num_experts=6
  config.mesh.expert = 4
  with pytest.raises(config_checks.ConfigError, match=r"--config.mesh.expert: expected a divisor"):
    config_checks.validate_config(config, num_devices=8, num_processes=1)


def test_a_batch_that_does_not_split_over_the_mesh_still_decodes():
  """Sampling one prompt under an expert mesh (as the launcher does after training) takes the
  GSPMD path, and decodes what one device decodes."""
  model = LM(CFG, rngs=nnx.Rngs(0))
  prompt = [[1, 2, 3]]
  want = jaxrec.generate(model, prompt, max_new_tokens=4).tokens
  with jax.set_mesh(sharding.make_mesh((2, 1, 1, 4))):
    got = jaxrec.generate(model, prompt, max_new_tokens=4).tokens
  np.testing.assert_array_equal(got, want)
