"""Mixture of experts: routing, capacity and dropping, the load-balancing loss and the routers
against numpy references written here (a loop over tokens and experts, PyTorch's GRUCell form),
and the causality of the shared GRU router over layers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close

from jaxrec import layers
from jaxrec.models import LM, LMConfig

B, T, D, F, E = 2, 6, 8, 12, 4


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)


def _params(moe):
  """The layer's own parameters (a GRU router's shared cell apart)."""
  state = nnx.to_pure_dict(nnx.state(moe))
  return {k: np.asarray(v, np.float64) for k, v in state.items() if k != "router_cell"}


def _silu(a):
  return a / (1 + np.exp(-a))


def _expert(p, e, x):
  return (_silu(x @ p["w_gate"][e]) * (x @ p["w_up"][e])) @ p["w_down"][e]


def _softmax(a):
  a = np.exp(a - a.max(-1, keepdims=True))
  return a / a.sum(-1, keepdims=True)


def _reference(p, x, logits, top_k, capacity):
  """Token and expert loop: top-k of the softmax, renormalized; an assignment is served in order
  (every first choice, then every second choice, ...) while its expert has room."""
  x = np.asarray(x, np.float64).reshape(-1, D)
  probs = _softmax(np.asarray(logits, np.float64).reshape(len(x), -1))
  top = np.argsort(-probs, -1, kind="stable")[:, :top_k]
  used = np.zeros(probs.shape[1], int)
  y = np.zeros_like(x)
  kept = 0
  for j in range(top_k):
    for n in range(len(x)):
      e = top[n, j]
      if used[e] < capacity:
        used[e] += 1
        kept += 1
        w = probs[n, e] / probs[n, top[n]].sum()
        y[n] += w * _expert(p, e, x[n])
  load = np.bincount(top.ravel(), minlength=probs.shape[1]) / top.size
  aux = probs.shape[1] * np.sum(load * probs.mean(0))
  return y.reshape(B, T, D), 1 - kept / top.size, aux


def _moe(**kw):
  kw = dict(top_k=2, init_std=0.5, rngs=nnx.Rngs(0)) | kw
  return layers.MoE(D, F, kw.pop("num_experts", E), **kw)


@nnx.jit
def _call(moe, x, h=None):
  """``(y, router_state, the RoutingStats the layer sowed)``."""
  (y, h), sown = nnx.capture(lambda moe: moe(x, h), nnx.Intermediate)(moe)
  (stats,) = sown[layers.moe.ROUTING].get_value()
  return y, h, stats


@pytest.mark.parametrize("capacity_factor, capacity", [(None, B * T), (0.5, 3)])
def test_linear_routing_capacity_drops_and_aux_loss_equal_the_loop(capacity_factor, capacity):
  moe = _moe(capacity_factor=capacity_factor)
  x = _x()
  y, state, stats = _call(moe, x)
  p = _params(moe)
  want, dropped, aux = _reference(p, x, x @ p["router_out"], 2, capacity)
  assert state is None
  assert_close(y, want, rtol=1e-5, atol=1e-6)
  assert_close(stats.dropped, dropped, rtol=1e-6)
  assert (float(stats.dropped) > 0) == (capacity_factor is not None)
  aux_got = layers.load_balancing_loss(stats.load[None], stats.prob[None])
  assert_close(aux_got, aux, rtol=1e-5)


def test_one_expert_top_one_is_the_dense_swiglu():
  moe = _moe(num_experts=1, top_k=1, capacity_factor=1.0)
  x = _x(1)
  y, _, stats = _call(moe, x)
  p = _params(moe)
  assert_close(y, _expert(p, 0, np.asarray(x, np.float64)), rtol=1e-5, atol=1e-6)
  assert float(stats.dropped) == 0.0


def _gru_cell_numpy(c, x, h):
  """PyTorch GRUCell: gates r, z, n stacked in that order along the output axis."""
  gi, gh = x @ c["w_ih"] + c["b_ih"], h @ c["w_hh"] + c["b_hh"]
  (ir, iz, i_n), (hr, hz, hn) = np.split(gi, 3, -1), np.split(gh, 3, -1)
  sig = lambda a: 1 / (1 + np.exp(-a))
  r, z = sig(ir + hr), sig(iz + hz)
  n = np.tanh(i_n + r * hn)
  return (1 - z) * n + z * h


def test_gru_router_chain_equals_the_numpy_gru_cell():
  cell = layers.GRURouterCell(5, rngs=nnx.Rngs(1))
  moes = [
    _moe(router="gru", router_dim=5, router_cell=cell, capacity_factor=None, rngs=nnx.Rngs(i))
    for i in (2, 3)
  ]
  xs = [_x(2), _x(3)]

  @nnx.jit
  def chain(moes, xs):
    h, outs = None, []
    for moe, x in zip(moes, xs, strict=True):
      y, h = moe(x, h)
      outs.append((y, h))
    return outs

  got = chain(moes, xs)
  c = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(cell)).items()}
  h = np.zeros((B, T, 5))
  for moe, x, (y, h_got) in zip(moes, xs, got, strict=True):
    p = _params(moe)
    h = _gru_cell_numpy(c, x @ p["router_proj"], h)
    assert_close(h_got, h, rtol=1e-5, atol=1e-6)
    want, _, _ = _reference(p, x, h @ p["router_out"], 2, B * T)
    assert_close(y, want, rtol=1e-5, atol=1e-6)


CFG = LMConfig(
  vocab_size=16,
  d_model=D,
  num_layers=3,
  num_heads=2,
  mixer_pattern=("attention",),
  ffn="moe",
  moe_num_experts=E,
  moe_router="gru",
  moe_router_dim=6,
  moe_hidden=F,
  init_std=0.5,
)


def test_gru_router_state_at_a_layer_depends_only_on_layers_up_to_it():
  model = LM(CFG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (B, T)), jnp.int32)

  @nnx.jit
  def states(model):
    """Router states after each block, by the LM's own blocks and shared cell."""
    carry, out = (model.embedding[...][tokens], None), []
    for block in model.layers:
      carry, _ = block(carry)
      out.append(carry[1])
    return out

  before = states(model)
  # Perturb the last layer (its mixer and its router): earlier states must not move.
  last = model.layers[2]
  last.mlp.router_proj[...] = last.mlp.router_proj[...] + 1.0
  last.mixer.q_proj.kernel[...] = last.mixer.q_proj.kernel[...] + 1.0
  after = states(model)
  for i in (0, 1):
    np.testing.assert_array_equal(after[i], before[i])
  assert float(jnp.max(jnp.abs(after[2] - before[2]))) > 1e-3
  # Perturbing the first layer moves every later state: the state is passed on.
  first = model.layers[0]
  first.mlp.router_proj[...] = first.mlp.router_proj[...] + 1.0
  moved = states(model)
  assert all(float(jnp.max(jnp.abs(moved[i] - after[i]))) > 1e-3 for i in range(3))


def test_ablation_routers_pass_or_block_the_state():
  x = _x(4)
  cell = layers.GRURouterCell(6, rngs=nnx.Rngs(1))
  h_prev = np.random.default_rng(5).standard_normal((B, T, 6)).astype(np.float32)
  grad_h = {}
  for router in ("gru", "gru_detached", "gru_no_recurrence", "mlp"):
    given = cell if router in layers.moe.GRU_ROUTERS else None
    moe = _moe(router=router, router_dim=6, router_cell=given, capacity_factor=None)
    loss = lambda moe, h: jnp.sum(moe(x, h)[0] ** 2)
    grad_h[router] = float(jnp.max(jnp.abs(nnx.jit(jax.grad(loss, argnums=1))(moe, h_prev))))
  assert grad_h["gru"] > 0 and grad_h["mlp"] > 0
  assert grad_h["gru_detached"] == 0.0 and grad_h["gru_no_recurrence"] == 0.0


def _sown(model, tokens):
  return nnx.capture(lambda m: m(tokens), nnx.Intermediate)(model)[1]


def test_lm_reports_routing_statistics_and_keeps_the_dense_lm():
  model = LM(CFG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (B, T)), jnp.int32)
  sown = nnx.jit(_sown)(model, tokens)
  (aux_loss,) = sown["aux_loss"].get_value()
  (metrics,) = sown["metrics"].get_value()
  assert set(metrics) >= {"moe/entropy", "moe/dropped", "moe/layer_mi_bits"}
  assert 0 < float(metrics["moe/entropy"]) <= np.log(E) + 1e-6
  assert_close(aux_loss, CFG.moe_aux_weight * metrics["moe/balance_loss"], rtol=1e-7)
  # One cell, held by every MoE layer.
  assert all(block.mlp.router_cell is model.layers[0].mlp.router_cell for block in model.layers)
  dense = LM(LMConfig(vocab_size=16, d_model=D, num_layers=1, num_heads=2), rngs=nnx.Rngs(0))
  assert len(nnx.eval_shape(_sown, dense, tokens)) == 0


@pytest.mark.parametrize(
  "kw, message",
  [
    (dict(top_k=5), "top_k: expected at most num_experts=4, got 5"),
    (dict(router="xmoe"), "router: expected one of"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(router="gru"), "router_cell: router='gru' needs the shared GRURouterCell, got None"),
    (
      dict(router="gru", router_dim=6, router_cell=layers.GRURouterCell(5, rngs=nnx.Rngs(0))),
      "router_cell: expected a cell of width router_dim=6, got width 5",
    ),
  ],
)
def test_bad_layer_arguments_name_the_argument(kw, message):
  with pytest.raises(ValueError, match=message):
    _moe(**kw)


@pytest.mark.parametrize(
  "kw, message",
  [
    (dict(moe_top_k=5), "moe_top_k: expected at most moe_num_experts=4, got 5"),
    (dict(moe_router="xmoe"), "moe_router: expected one of"),
    (dict(scan_layers=True), "scan_layers: not supported with ffn='moe'"),
    (dict(ffn="glu"), "ffn: expected 'mlp' or 'moe'"),
  ],
)
def test_bad_config_names_the_field(kw, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(CFG, **kw)
