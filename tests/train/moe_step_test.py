"""An MoE model's train step on 8 fake devices with an ``expert`` mesh axis equals the 1-device
step; the routing statistics reach the metrics and the load-balancing loss the objective."""

import jax
import numpy as np
from flax import nnx

from jaxrec.models import LM, LMConfig
from jaxrec.train import optim, sharding
from jaxrec.train import step as step_lib

B, T = 8, 8
CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=1,
  num_heads=2,
  mixer_pattern=("attention",),
  ffn="moe",
  moe_num_experts=8,
  moe_top_k=2,
  moe_router="gru",
  moe_router_dim=8,
  moe_hidden=16,
  init_std=0.2,
)


def _run(mesh):
  schedule = optim.warmup_cosine_schedule(1e-2, total_steps=4, warmup_steps=0)
  tx = optim.make_optimizer(schedule, weight_decay=0.1, eps=1e-3, clip_norm=0.5)
  make_model = lambda: LM(CFG, rngs=nnx.Rngs(0))
  graphdef, abstract = step_lib.abstract_train_state(make_model, tx, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, schedule, abstract, mesh)
  state = step_lib.init_train_state(make_model, tx, abstract)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(1):
    tokens = rng.integers(0, 32, (B, T + 1)).astype(np.int32)
    batch = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones((B, T), np.int32),
      "weights": np.ones((B, T), np.float32),
    }
    state, m = train_step(state, sharding.global_batch(batch, mesh))
    history.append(jax.tree.map(float, jax.device_get(m)))
  return abstract, jax.tree.map(np.asarray, state.params), history


def test_expert_parallel_step_equals_one_device():
  """data=2 x expert=4: experts split 4 ways, the batch 8 ways."""
  _, want_params, want = _run(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  abstract, params, got = _run(sharding.make_mesh((2, 1, 1, 4)))
  spec = abstract.params["layers"][0]["mlp"]["w_up"].get_value().sharding.spec
  assert spec[0] == "expert"  # experts split over the expert axis
  for g, w in zip(got, want, strict=True):
    for key in ("loss", "grad_norm", "moe/balance_loss", "moe/dropped", "moe/entropy"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=key)
  assert want[0]["moe/dropped"] >= 0 and 0 < want[0]["moe/entropy"] <= np.log(8)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), params, want_params
  )
