"""Mixture of experts: routing, capacity and dropping, the load-balancing loss and the routers
against numpy references written here (a loop over tokens and experts, PyTorch's GRUCell form),
and the causality of the shared GRU router over layers.

Tolerances (testing_utils' error model): an output is ``Σ_k w_k e_k(x)`` over the chosen experts:
each expert a SwiGLU MLP (its factors' errors carried into the product, then the down
projection), each weight carrying the relative error of the router logits, twice a logit's error
(``_atol``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, rnn_error_bound, rounding_atol

from jaxrec import layers
from jaxrec.models import LM, LMConfig, MoEOptions

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


def _expert_magnitude(p, e, x):
  """``Σ|terms|`` of an expert's output: the gate's and up's products carried into their product
  (``|silu'| <= 1.1``), then the down projection."""
  a, b = x @ p["w_gate"][e], x @ p["w_up"][e]
  ax = np.abs(x)
  factors = 1.1 * (ax @ np.abs(p["w_gate"][e])) * np.abs(b) + np.abs(_silu(a)) * (
    ax @ np.abs(p["w_up"][e])
  )
  return factors @ np.abs(p["w_down"][e])


def _reference(p, x, logits, top_k, capacity, logit_error=None):
  """Token and expert loop: top-k of the softmax, renormalized; an assignment is served in order
  (every first choice, then every second choice, ...) while its expert has room.

  With ``logit_error`` (``[B, T]``, the absolute error of a token's logits) also returns the
  per-element ``atol`` of the output: each expert's ``D + 4 + F`` roundings against its
  magnitude, and its weight's relative error, twice the logit error and a few roundings
  (softmax, renormalization)."""
  x = np.asarray(x, np.float64).reshape(-1, D)
  probs = _softmax(np.asarray(logits, np.float64).reshape(len(x), -1))
  top = np.argsort(-probs, -1, kind="stable")[:, :top_k]
  used = np.zeros(probs.shape[1], int)
  y, atol = np.zeros_like(x), np.zeros_like(x)
  kept = 0
  for j in range(top_k):
    for n in range(len(x)):
      e = top[n, j]
      if used[e] < capacity:
        used[e] += 1
        kept += 1
        w = probs[n, e] / probs[n, top[n]].sum()
        y[n] += w * _expert(p, e, x[n])
        if logit_error is not None:
          out = w * np.abs(_expert(p, e, x[n]))
          atol[n] += rounding_atol(w * _expert_magnitude(p, e, x[n]), terms=D + 4 + F + 1)
          atol[n] += 2 * logit_error.reshape(-1)[n] * out + rounding_atol(out, terms=top_k + 4)
  load = np.bincount(top.ravel(), minlength=probs.shape[1]) / top.size
  aux = probs.shape[1] * np.sum(load * probs.mean(0))
  if logit_error is not None:
    return y.reshape(B, T, D), 1 - kept / top.size, aux, atol.reshape(B, T, D)
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
  logits, logit_error = x @ p["router_out"], _logit_error(x, p["router_out"])
  want, dropped, aux, atol = _reference(p, x, logits, 2, capacity, logit_error)
  assert state is None
  assert_close(y, want, rtol=0, atol=atol)
  assert_close(stats.dropped, dropped, rtol=1e-6)  # 1 - k/n: two roundings
  assert (float(stats.dropped) > 0) == (capacity_factor is not None)
  aux_got = layers.load_balancing_loss(stats.load[None], stats.prob[None])
  # Positive terms: the probabilities' relative error (twice the largest logit error, and the
  # softmax's few roundings), a mean over B·T tokens and a sum over E experts.
  atol = 2 * np.max(logit_error) * aux + rounding_atol(aux, terms=4 + B * T + E)
  assert_close(aux_got, aux, rtol=0, atol=atol)


@pytest.mark.parametrize("grouped_matmul", ["tiles", "ragged_dot"])
def test_sorted_dispatch_equals_the_loop_and_its_expert_gradients(grouped_matmul):
  """Dropless by sorting (``dispatch="sorted"``): the loop's output with nothing dropped, whichever
  grouped matmul runs the experts; and the gradients of the expert weights against the loop's
  analytic ones in float64 (each a sum over the tokens that chose the expert)."""
  moe = _moe(capacity_factor=0.5, dispatch="sorted", grouped_matmul=grouped_matmul)
  x = _x(2)
  y, _, stats = _call(moe, x)
  p = _params(moe)
  logits, logit_error = x @ p["router_out"], _logit_error(x, p["router_out"])
  want, dropped, _, atol = _reference(p, x, logits, 2, B * T, logit_error)
  assert_close(y, want, rtol=0, atol=atol)
  assert float(stats.dropped) == dropped == 0.0  # capacity_factor is the capacity path's only

  cot = np.random.default_rng(3).standard_normal((B, T, D)).astype(np.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] * cot))(moe)
  x64, c64 = np.asarray(x, np.float64).reshape(-1, D), cot.astype(np.float64).reshape(-1, D)
  probs = _softmax(np.asarray(logits, np.float64).reshape(len(x64), -1))
  top = np.argsort(-probs, -1, kind="stable")[:, :2]
  g = {k: np.zeros_like(p[k]) for k in ("w_gate", "w_up", "w_down")}
  mag = {k: np.zeros_like(p[k]) for k in g}
  for n in range(len(x64)):
    for e in top[n]:
      w = probs[n, e] / probs[n, top[n]].sum()
      a, b = x64[n] @ p["w_gate"][e], x64[n] @ p["w_up"][e]
      sig = 1 / (1 + np.exp(-a))
      dh = w * (p["w_down"][e] @ c64[n])  # the cotangent of silu(a) * b
      dsilu = sig * (1 + a * (1 - sig))
      g["w_down"][e] += w * np.outer(_silu(a) * b, c64[n])
      g["w_up"][e] += np.outer(x64[n], dh * _silu(a))
      g["w_gate"][e] += np.outer(x64[n], dh * b * dsilu)
      dh_mag = abs(w) * (np.abs(p["w_down"][e]) @ np.abs(c64[n]))
      mag["w_down"][e] += abs(w) * np.outer(np.abs(_silu(a) * b), np.abs(c64[n]))
      mag["w_up"][e] += np.outer(np.abs(x64[n]), dh_mag * np.abs(_silu(a)))
      mag["w_gate"][e] += np.outer(np.abs(x64[n]), dh_mag * np.abs(b) * 1.1)
  for k in g:
    # Each element: a sum over the B·T·k assignments of products formed through D and F sums,
    # plus the routing weight's relative error (twice the largest logit error).
    tol = rounding_atol(mag[k], terms=B * T * 2 + D + F + 8) + 2 * np.max(logit_error) * mag[k]
    assert_close(getattr(grads, k)[...], g[k], rtol=0, atol=tol, err_msg=k)


def test_sorted_dispatch_under_an_expert_mesh_drops_nothing():
  """Expert-parallel (``shard_map`` over 2 expert devices): the sorted dispatch sends every token
  and equals the single-group sorted dispatch."""
  mesh = jax.make_mesh((2, 1, 1, 2), ("data", "fsdp", "tensor", "expert"))
  moe = _moe(dispatch="sorted", grouped_matmul="tiles")
  x = _x(4)
  want, _, _ = _call(moe, x)
  with jax.set_mesh(mesh):
    got, _, stats = _call(moe, x)
  assert float(stats.dropped) == 0.0
  p = _params(moe)
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  mag = sum(_expert_magnitude(p, e, x64) for e in range(E)).reshape(B, T, D)  # weights <= 1
  # The same assignments summed in another order: two outputs' roundings.
  assert_close(got, want, rtol=0, atol=2 * rounding_atol(mag, terms=D + F + 8))


def test_one_expert_top_one_is_the_dense_swiglu():
  moe = _moe(num_experts=1, top_k=1, capacity_factor=1.0)
  x = _x(1)
  y, _, stats = _call(moe, x)
  p = _params(moe)
  x64 = np.asarray(x, np.float64)
  # One expert, weight 1 exactly: the expert's own roundings.
  atol = rounding_atol(_expert_magnitude(p, 0, x64), terms=D + 4 + F + 1)
  assert_close(y, _expert(p, 0, x64), rtol=0, atol=atol)
  assert float(stats.dropped) == 0.0


def _logit_error(x, router):
  """A token's largest logit error, ``[B, T]``: a ``len(x)``-long product, relative to its terms."""
  return np.max(rounding_atol(np.abs(x) @ np.abs(router), terms=x.shape[-1] + 1), -1)


def _gru_cell_jax(c, x, h):
  """``_gru_cell_numpy`` in jnp, for its Jacobian and rounding bound."""
  gi, gh = x @ c["w_ih"] + c["b_ih"], h @ c["w_hh"] + c["b_hh"]
  (ir, iz, i_n), (hr, hz, hn) = jnp.split(gi, 3, -1), jnp.split(gh, 3, -1)
  r, z = jax.nn.sigmoid(ir + hr), jax.nn.sigmoid(iz + hz)
  return (1 - z) * jnp.tanh(i_n + r * hn) + z * h


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
  # The two layers' cells as a recurrence over layers (tokens as the batch): each cell's rounding
  # on an input that a D-long product rounded, carried through the next cell's Jacobian.
  us = [x @ _params(moe)["router_proj"] for moe, x in zip(moes, xs, strict=True)]
  hs = [_gru_cell_numpy(c, us[0], np.zeros((B, T, 5)))]
  hs.append(_gru_cell_numpy(c, us[1], hs[0]))
  tokens = lambda arrays: np.stack([a.reshape(B * T, 5) for a in arrays], 1)
  h_atol = rnn_error_bound(
    lambda c, h, u: _gru_cell_jax(c, u, h),
    c,
    jnp.asarray(tokens(us), jnp.float32),
    jnp.zeros((B * T, 5)),
    jnp.asarray(tokens(hs), jnp.float32),
    terms=5 + 5 + 6 + D,
  )
  for layer, (moe, x, (y, h_got)) in enumerate(zip(moes, xs, got, strict=True)):
    p, h, h_error = _params(moe), hs[layer], h_atol[:, layer].reshape(B, T, 5)
    assert_close(h_got, h, rtol=0, atol=h_error)
    logit_error = _logit_error(h, p["router_out"]) + np.max(h_error @ np.abs(p["router_out"]), -1)
    want, _, _, atol = _reference(p, x, h @ p["router_out"], 2, B * T, logit_error)
    assert_close(y, want, rtol=0, atol=atol)


CFG = LMConfig(
  vocab_size=16,
  d_model=D,
  num_layers=3,
  num_heads=2,
  mixer_pattern=("attention",),
  ffn="moe",
  moe=MoEOptions(num_experts=E, router="gru", router_dim=6, hidden=F),
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
  assert_close(aux_loss, CFG.moe.aux_weight * metrics["moe/balance_loss"], rtol=1e-7)
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
    (dict(moe={"top_k": 5}), r"moe\.top_k: expected at most num_experts=4, got 5"),
    (dict(moe={"router": "xmoe"}), r"moe\.router: expected one of"),
    (dict(moe={"capacity_factor": 0.0}), r"moe\.capacity_factor: expected a positive number"),
    (dict(moe={"experts": 2}), r"moe\.experts: unknown option; moe has options \('num_experts'"),
    (dict(scan_layers=True), "scan_layers: not supported with ffn='moe'"),
    (dict(ffn="glu"), r"ffn: expected one of \('mlp', 'moe', 'none'\)"),
  ],
)
def test_bad_config_names_the_field(kw, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**kw)
