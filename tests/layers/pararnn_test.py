"""ParaGRU / ParaLSTM mixers: forward and gradients against a sequential ``lax.scan`` written here,
cached decoding against the full forward, packed documents against separate runs, the input
projections kept out of the Newton loop, and an LM decoding through ``jaxrec.generate``.

Tolerances (testing_utils' error model): the layer's magnitude is ``sensitivity_magnitude`` of
the reference, with ``_terms`` roundings, which include the Newton solve's residual tolerance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import (
  assert_close,
  max_abs,
  mixer_outputs_and_grads,
  rounding_atol,
  sensitivity_magnitude,
  unit_roundoff,
)
from testing_utils import decode_token_by_token as _decode

import jaxrec
from jaxrec import layers
from jaxrec.models import LM, LMConfig

B, T, D, HEADS = 2, 11, 16, 2
SPLIT = 6  # packed tests: document 0 is x[:, :SPLIT], document 1 the rest
MODULES = {"paragru": layers.ParaGRU, "paralstm": layers.ParaLSTM}
KINDS = tuple(MODULES)


def _mixer(kind, **kw):
  # A large init_std keeps activations O(1), so the fp32 tolerances below are meaningful.
  mixer = MODULES[kind](D, HEADS, init_std=0.5, **kw, rngs=nnx.Rngs(0))
  # Recurrent diagonals beyond the 0.5 bound, so the norm clipping is exercised.
  mixer.recurrent[...] = 4.0 * mixer.recurrent[...]
  if kind == "paralstm":
    mixer.peephole[...] = 3.0 * mixer.peephole[...]
  return mixer


def _terms(computations=2):
  """Roundings on the layer's longest chain, for ``computations`` fp32 runs compared: the input
  projection (D), the cell projection (D/H), the recurrence's cell (a few a step over T steps),
  the output norm (D), the gate and output projections (D), and the Newton solve's residual
  tolerance (1e-6 of the state a step, ``newton_core.default_tol``) over at most T steps."""
  chain = D + D // HEADS + 6 * T + D + 2 * D + 10
  return computations * chain + T * 1e-6 / unit_roundoff()


def _x(seed=0, t=T):
  return np.random.default_rng(seed).standard_normal((B, t, D), np.float32)


# ----------------------------------------------------------------------------------------------
# Independent reference: the block's equations in plain jnp, the recurrence as a lax.scan.


def _clip(a):
  """Rescales each gate's row of recurrent weights to max |a| <= 0.5."""
  return a * jnp.minimum(1.0, 0.5 / jnp.max(jnp.abs(a), axis=-1, keepdims=True))


def _gru_step(a, h, u):
  z = jax.nn.sigmoid(a[0] * h + u[:, 0])
  r = jax.nn.sigmoid(a[1] * h + u[:, 1])
  cand = jnp.tanh(a[2] * (r * h) + u[:, 2])
  h = (1 - z) * h + z * cand
  return h, h


def _lstm_step(a, p, carry, u):
  c, h = carry
  f = jax.nn.sigmoid(a[0] * h + p[0] * c + u[:, 0])
  c = f * c + (1 - f) * jnp.tanh(a[2] * h + u[:, 2])
  o = jax.nn.sigmoid(a[1] * h + p[1] * c + u[:, 1])
  h = o * jnp.tanh(c)
  return (c, h), h


@functools.cache
def _reference_fn(kind):
  """One reference object per kind: its sensitivities compile once."""
  return lambda p, x: _reference(kind, p, x)


def _params(mixer):
  return nnx.to_pure_dict(nnx.split(mixer)[1])


def _reference(kind, p, x, eps=1e-6):
  b, t, d = x.shape
  xh = jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, p["in_proj"]["kernel"]))
  u = jnp.einsum("bthi,higj->btghj", xh, p["cell_proj"]["kernel"]) + p["cell_proj"]["bias"]
  u = jnp.swapaxes(u.reshape(b, t, 3, d), 0, 1)
  a = _clip(p["recurrent"].reshape(3, d))
  zeros = jnp.zeros((b, d))
  if kind == "paragru":
    _, h = jax.lax.scan(lambda h, u_t: _gru_step(a, h, u_t), zeros, u)
  else:
    peep = _clip(p["peephole"].reshape(2, d))
    _, h = jax.lax.scan(lambda s, u_t: _lstm_step(a, peep, s, u_t), (zeros, zeros), u)
  h = jnp.swapaxes(h, 0, 1)
  h = h / jnp.sqrt(jnp.mean(h**2, axis=-1, keepdims=True) + eps) * p["out_norm"]["scale"]
  g = jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, p["gate_proj"]["kernel"]))
  o = h.reshape(b, t, HEADS, -1) * g
  return jnp.einsum("bthk,hkd->btd", o, p["out_proj"]["kernel"])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients_match_sequential_scan(kind):
  x = _x()
  w = np.random.default_rng(1).standard_normal(x.shape, np.float32)
  reference, mixer = _reference_fn(kind), _mixer(kind)
  (got, got_grads), (want, want_grads) = mixer_outputs_and_grads(mixer, reference, x, w)
  magnitude = sensitivity_magnitude(reference, _params(mixer), x)
  assert_close(got, want, rtol=0, atol=rounding_atol(magnitude, terms=_terms()))
  # Per tensor; each computation a forward and a backward chain.
  loss = jax.grad(lambda p, x: jnp.sum(reference(p, x) * w), argnums=(0, 1))
  magnitudes = sensitivity_magnitude(loss, _params(mixer), x)
  atols = jax.tree.map(lambda m: rounding_atol(max_abs(m), terms=_terms(4)), magnitudes)
  jax.tree.map(lambda g, r, a: assert_close(g, r, rtol=0, atol=a), got_grads, want_grads, atols)
  # The clipped diagonals still get a gradient for every entry.
  assert np.all(np.abs(got_grads[0]["recurrent"]) > 0)


@jax.jit
def _cached_runs(mixer, x):
  empty = mixer.init_cache(B, T, jnp.float32)
  full, no_cache = mixer(x)
  steps, step_cache = _decode(mixer, x, empty)
  prefill, cache = mixer(x[:, :SPLIT], cache=empty)
  decoded, _ = _decode(mixer, x[:, SPLIT:], cache)
  _, full_cache = mixer(x, cache=empty)
  # Two packed documents, without and with a cache (the decode continues document 1).
  seg = jnp.broadcast_to(jnp.where(jnp.arange(T) < SPLIT, 3, 7), (B, T)).astype(jnp.int32)
  packed = mixer(x, segment_ids=seg)[0]
  docs = (mixer(x[:, :SPLIT])[0], mixer(x[:, SPLIT:])[0])
  _, cache = mixer(x[:, : T - 2], segment_ids=seg[:, : T - 2], cache=empty)
  tail, _ = _decode(mixer, x[:, T - 2 :], cache)
  return dict(
    no_cache=no_cache,
    full=full,
    steps=steps,
    prefill_decode=jnp.concatenate([prefill, decoded], 1),
    step_state=step_cache.state,
    full_state=full_cache.state,
    packed=packed,
    separate=jnp.concatenate(docs, 1),
    packed_cache_tail=tail,
  )


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_and_packing_match_full_forward(kind):
  mixer = _mixer(kind)
  x = _x(2)
  out = _cached_runs(mixer, x)
  assert out["no_cache"] is None
  assert out["full_state"].shape == (B, (2 if kind == "paralstm" else 1) * D)
  assert out["full_state"].dtype == jnp.float32
  reference, params = _reference_fn(kind), _params(mixer)
  full = rounding_atol(sensitivity_magnitude(reference, params, x), terms=_terms())
  separate = [sensitivity_magnitude(reference, params, x) for x in (x[:, :SPLIT], x[:, SPLIT:])]
  separate = rounding_atol(np.concatenate(separate, 1), terms=_terms())
  assert_close(out["steps"], out["full"], rtol=0, atol=full)
  assert_close(out["prefill_decode"], out["full"], rtol=0, atol=full)
  # The state: the recurrence's chain and the Newton residual against its own scale, at least 1
  # (it is what the solve's tolerance is relative to).
  state = max(max_abs(out["full_state"]), 1.0)
  assert_close(
    out["step_state"], out["full_state"], rtol=0, atol=rounding_atol(state, terms=_terms())
  )
  assert_close(out["packed"], out["separate"], rtol=0, atol=separate)
  assert_close(out["packed_cache_tail"], out["separate"][:, -2:], rtol=0, atol=separate[:, -2:])
  # The packed run must differ from the unpacked one, or the check above proves nothing.
  assert np.abs(out["packed"][:, SPLIT:] - out["full"][:, SPLIT:]).max() > 1e-3


def _matmuls(jaxpr, inside_while=False, found=None):
  """``{(inside a while loop, contracted size)}`` of every ``dot_general`` in a jaxpr and all its
  sub-jaxprs."""
  found = set() if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      shape = eqn.invars[0].aval.shape
      found.add((inside_while, int(np.prod([shape[i] for i in contract]))))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _matmuls(sub, inside_while or eqn.primitive.name == "while", found)
  return found


@pytest.mark.parametrize("kind", KINDS)
def test_projections_stay_outside_the_newton_loop_and_it_converges(kind):
  mixer = _mixer(kind)
  x = _x(3)
  matmuls = _matmuls(jax.make_jaxpr(lambda x: mixer(x)[0])(x).jaxpr)
  # The projections contract over D or D/H outside the loop; inside it only the 2×2 Jacobian
  # block products of ParaLSTM's linear solve may appear.
  assert {(False, D), (False, D // HEADS)} <= matmuls
  assert all(size <= 2 for inside, size in matmuls if inside), matmuls
  _, info = mixer.recurrence(x)
  assert np.all(info.converged) and not np.any(info.fallback)
  assert np.all(info.iterations <= 6), info.iterations


def test_a_solve_sows_its_newton_metrics_and_a_decoding_step_none():
  mixer = _mixer("paralstm")
  x = _x(5)
  _, info = mixer.recurrence(x)
  _, sown = nnx.capture(lambda m: m(x), nnx.Intermediate)(mixer)
  (metrics,) = sown["metrics"].get_value()
  assert float(metrics["newton/iterations"]) == np.mean(np.asarray(info.iterations, np.float32))
  assert float(metrics["newton/fallback"]) == np.mean(np.asarray(info.fallback, np.float32))
  cache = mixer.init_cache(B, T, jnp.float32)
  _, sown = nnx.capture(lambda m: m(x[:, :1], cache=cache), nnx.Intermediate)(mixer)
  assert not nnx.to_flat_state(sown)
  # Outside a capture nothing is kept: the mixer is the same module after a call.
  before = nnx.graphdef(mixer)
  mixer(x)
  assert nnx.graphdef(mixer) == before


def test_bf16_compute_keeps_fp32_state():
  mixer = _mixer("paragru")
  bf16 = _mixer("paragru", dtype=jnp.bfloat16)
  x = _x(4)
  y, cache = bf16(x, cache=bf16.init_cache(B, T, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and cache.state.dtype == jnp.float32
  want = mixer(x)[0]
  # Every parameter, input and activation rounded once to bf16 (the sensitivity counts each
  # factor of each term; a few intermediate activations more), plus the fp32 runs' own error.
  magnitude = sensitivity_magnitude(_reference_fn("paragru"), _params(mixer), x)
  atol = rounding_atol(magnitude, terms=1 + 5, dtype=jnp.bfloat16)
  atol = atol + rounding_atol(magnitude, terms=_terms())
  assert_close(y.astype(np.float32), want, rtol=0.0, atol=atol)


def test_lm_greedy_generation_equals_argmax_of_full_forwards():
  cfg = LMConfig(
    vocab_size=32,
    d_model=D,
    num_layers=2,
    num_heads=HEADS,
    mixer_pattern=("paragru", "paralstm"),
    init_std=0.3,
  )
  model = LM(cfg, rngs=nnx.Rngs(0))
  prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
  new = 5
  got = jaxrec.generate(model, prompt, new).tokens
  forward = jax.jit(lambda m, tokens: m(tokens)[0])
  buf = np.zeros((B, prompt.shape[1] + new), np.int32)
  buf[:, : prompt.shape[1]] = prompt
  for t in range(prompt.shape[1], buf.shape[1]):
    logits = forward(model, buf)
    buf[:, t] = np.argmax(logits[:, t - 1], axis=-1)
  assert logits.shape == (B, buf.shape[1], cfg.vocab_size) and np.isfinite(logits).all()
  np.testing.assert_array_equal(got, buf[:, prompt.shape[1] :])
