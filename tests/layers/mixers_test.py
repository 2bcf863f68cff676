"""Token mixers, built from plain constructor arguments: forward and gradients against references
written here, cached decoding against the full forward, packed documents against separate runs,
and the validation of their arguments.

Tolerances (testing_utils' error model): a whole layer has no reference on absolute values, so
its magnitude is ``sensitivity_magnitude`` of the reference (every parameter and input perturbed
by a relative 1), per element of the output and per tensor of the gradients, with ``_terms``
roundings."""

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
  scan_gla,
  scan_mlstm,
  sensitivity_magnitude,
)
from testing_utils import decode_token_by_token as _decode

from jaxrec import layers

B, T, D = 2, 10, 16
SPLIT = 6  # packed tests: document 0 is x[:, :SPLIT], document 1 the rest
SCALING = {
  "rope_type": "llama3",
  "factor": 4.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}

# (module, constructor arguments besides d_model=D and rngs)
CASES = {
  "attention": (layers.Attention, dict(num_heads=2)),
  "attention-gqa-window": (layers.Attention, dict(num_heads=4, num_kv_heads=2, window=3)),
  "gla": (layers.GatedLinearAttention, dict(num_heads=2, chunk_size=16)),
  # The window is shorter than the prefills below, so the ring buffer wraps.
  "liger-gla": (
    layers.LigerAttention,
    dict(num_heads=4, num_kv_heads=2, window=3, qkv_bias=True, chunk_size=4, rope_scaling=SCALING),
  ),
  "liger-hgrn2-projection-gate": (
    layers.LigerAttention,
    dict(num_heads=2, variant="hgrn2", window=None, gate_source="projection", chunk_size=4),
  ),
  "based": (layers.BasedLinearAttention, dict(num_heads=2, feature_dim=4, chunk_size=4)),
  "baseconv": (layers.BaseConv, dict(kernel_size=3)),
  # Each document's prefix (2 tokens) lies inside the prefills of _cached_runs, so decoding
  # continues from the prefix state.
  "pla": (layers.PrefixLinearAttention, dict(num_heads=2, feature_dim=4, prefix_len=2)),
  "mlstm": (layers.MLSTM, dict(num_heads=2, chunk_size=4, gate_soft_cap=5.0)),
}


def _terms(case, computations=2):
  """Roundings on a mixer's longest chain, for ``computations`` fp32 runs compared: the input
  projection (D), the op's sums over T steps (three a step for a recurrence), its head-wide dot
  products (K <= D: the scores or readout, and the output norm), the output projection (D) and a
  few elementwise ops; and what the recurrences' exponents add (testing_utils): the mLSTM's
  capped gates (|log f|, |ĩ|, |m| <= 5) over its sequential reference (2·T·20) and chunks of 4
  (2·4·20 in a chunk, 2·3·35 carried); the GLA decays' ``2·C·L`` (``|log α| <= 1/4`` a step)."""
  chain = D + 3 * T + 2 * D + D + 10
  exponents = {"mlstm": 2 * T * 20 + 2 * 4 * 20 + 2 * 3 * 35, "gla": 2 * T * T / 4}
  exponents.update({name: exponents["gla"] for name in CASES if name.startswith("liger")})
  return computations * (chain + exponents.get(case, 0))


def _mixer(case):
  module, kw = CASES[case]
  # A large init_std keeps activations O(1), so the fp32 tolerances below are meaningful.
  mixer = module(D, init_std=0.5, **kw, rngs=nnx.Rngs(0))
  if case == "mlstm":
    # The published initialization zeroes the gate projections: make the gates depend on x,
    # and the input-gate bias not close the memory.
    rng = np.random.default_rng(3)
    for gate in (mixer.i_gate, mixer.f_gate, mixer.o_gate):
      gate.kernel[...] = rng.standard_normal(gate.kernel.shape, np.float32)
    mixer.i_bias[...] = np.zeros(mixer.i_bias.shape, np.float32)
  return kw, mixer


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((B, T, D), np.float32)


# ----------------------------------------------------------------------------------------------
# Independent references: plain jnp with the module's parameters as a dict.


def _llama3_frequencies(half, theta, s):
  """Llama 3.1's frequency scaling, as Meta's reference code writes it (a loop over them)."""
  out = []
  for f in theta ** (-np.arange(half) / half):
    wavelength = 2 * np.pi / f
    low, high = s["original_max_position_embeddings"] / np.array(
      [s["low_freq_factor"], s["high_freq_factor"]]
    )
    if wavelength < high:
      out.append(f)
    elif wavelength > low:
      out.append(f / s["factor"])
    else:
      smooth = (s["original_max_position_embeddings"] / wavelength - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
      )
      out.append((1 - smooth) * f / s["factor"] + smooth * f)
  return np.array(out)


def _rope(x, theta, scaling=None):
  """RoPE as a complex rotation of the channel pairs (i, i + D/2)."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  freq = theta ** (-np.arange(half) / half)
  if scaling is not None:
    freq = _llama3_frequencies(half, theta, scaling)
  z = z * jnp.exp(1j * np.arange(x.shape[1])[:, None, None] * freq)
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(x.dtype)


def _projections(p, x):
  return tuple(
    jnp.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + (p[n].get("bias", 0.0))
    for n in ("q_proj", "k_proj", "v_proj")
  )


def _softmax_attention(q, k, v, window):
  """Causal (sliding-window) softmax attention over RoPE'd ``q [B, T, H, K]``, ``k``, ``v`` with
  their key/value heads repeated."""
  logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  t = np.arange(q.shape[1])
  visible = t[:, None] >= t[None, :]
  if window is not None:
    visible &= t[:, None] - t[None, :] < window
  probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshk->bthk", probs, v)


def _attention_reference(p, x, num_heads, num_kv_heads=None, window=None, theta=10_000.0):
  q, k, v = _projections(p, x)
  q, k = _rope(q, theta), _rope(k, theta)
  group = num_heads // (num_kv_heads or num_heads)
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  o = _softmax_attention(q, k, v, window)
  return jnp.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


def _liger_reference(p, x, num_heads, num_kv_heads=None, variant="gla", window=64, **kw):
  """Liger attention from its equations: feature maps and gate from the un-rotated projections,
  the recurrence as ``testing_utils.scan_gla`` (scale 1), plus half RoPE'd window attention."""
  q, k, v = _projections(p, x)
  gate = jnp.einsum("btd,dhk->bthk", x, p["g_proj"]["kernel"]) if "g_proj" in p else k
  group = num_heads // (num_kv_heads or num_heads)
  if variant == "gla":
    phi_k, log_decay = jax.nn.softmax(k, axis=-1), jax.nn.log_sigmoid(gate) / 16
  else:
    phi_k, log_decay = 1 - jax.nn.sigmoid(gate), jax.nn.log_sigmoid(gate)
  phi_k, v_rep, log_decay = (jnp.repeat(a, group, axis=2) for a in (phi_k, v, log_decay))
  h0 = jnp.zeros((x.shape[0], num_heads, q.shape[-1], v.shape[-1]))
  o, _ = scan_gla(jax.nn.softmax(q, axis=-1), phi_k, v_rep, log_decay, h0, scale=1.0)
  if window is not None:
    scaling = kw.get("rope_scaling")
    q, k = _rope(q, 10_000.0, scaling), _rope(k, 10_000.0, scaling)
    o = 0.5 * o + 0.5 * _softmax_attention(q, jnp.repeat(k, group, axis=2), v_rep, window)
  return jnp.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


def _gla_reference(p, x, gate_normalizer=16.0, eps=1e-6):
  q = jnp.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  k = jnp.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"])
  v = jnp.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  low = jnp.einsum("btd,dr->btr", x, p["decay_down"]["kernel"])
  gate_logits = jnp.einsum("btr,rhk->bthk", low, p["decay_up"]["kernel"]) + p["decay_up"]["bias"]
  alpha = jax.nn.sigmoid(gate_logits) ** (1 / gate_normalizer)

  def step(state, inputs):
    q_t, k_t, v_t, a_t = inputs
    state = a_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state) / np.sqrt(q_t.shape[-1])

  state0 = jnp.zeros((x.shape[0], q.shape[2], q.shape[3], v.shape[3]))
  _, o = jax.lax.scan(step, state0, tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v, alpha)))
  o = jnp.swapaxes(o, 0, 1)
  o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + eps) * p["out_norm"]["scale"]
  o = o * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, p["g_proj"]["kernel"]))
  return jnp.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


def _based_reference(p, x, prefix_len=0):
  """Normalized attention with the weights ``1 + s/√F + s²/2F`` (``s = q·k``) as a ``[T, T]``
  matrix: causal decoder weights, plus encoder weights on the first ``prefix_len`` keys."""
  q = jnp.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  f = q.shape[-1]

  def weights(k_name, visible):
    s = jnp.einsum("bihf,bjhf->bhij", q, jnp.einsum("btd,dhk->bthk", x, p[k_name]["kernel"]))
    return (1 + s / np.sqrt(f) + s**2 / (2 * f)) * visible

  def values(v_name):
    return jnp.einsum("btd,dhk->bthk", x, p[v_name]["kernel"])

  t = np.arange(x.shape[1])
  w = weights("k_proj", t[:, None] >= t[None, :])
  num = jnp.einsum("bhij,bjhv->bihv", w, values("v_proj"))
  den = jnp.sum(w, -1)
  if prefix_len:
    w_enc = weights("k_enc_proj", np.broadcast_to(t[None, :] < prefix_len, (len(t), len(t))))
    num = num + jnp.einsum("bhij,bjhv->bihv", w_enc, values("v_enc_proj"))
    den = den + jnp.sum(w_enc, -1)
  o = num / jnp.moveaxis(den, 1, 2)[..., None]
  return jnp.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


def _baseconv_reference(p, x):
  kernel, t = p["conv_kernel"], x.shape[1]
  conv = p["conv_bias"] + sum(
    kernel[j] * jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :t] for j in range(kernel.shape[0])
  )
  return conv * (x @ p["gate"]["kernel"] + p["gate"]["bias"])


def _mlstm_reference(p, x, cap=5.0, eps=1e-6):
  q = jnp.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  k = jnp.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"])
  v = jnp.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  i_gate = cap * jnp.tanh((jnp.einsum("btd,dh->bth", x, p["i_gate"]["kernel"]) + p["i_bias"]) / cap)
  f_gate = cap * jnp.tanh((jnp.einsum("btd,dh->bth", x, p["f_gate"]["kernel"]) + p["f_bias"]) / cap)
  b, _, h, key_dim = q.shape
  state = (jnp.zeros((b, h, key_dim, v.shape[-1])), jnp.zeros((b, h, key_dim)), jnp.zeros((b, h)))
  o, _ = scan_mlstm(q, k, v, i_gate, f_gate, state)
  o = o - jnp.mean(o, axis=-1, keepdims=True)
  o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + eps) * p["out_norm"]["scale"]
  o = o * jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x, p["o_gate"]["kernel"]))
  return jnp.einsum("bthk,hkd->btd", o, p["out_proj"]["kernel"])


@functools.cache
def _reference(case):
  """The reference for a case; the layers' defaults (RoPE theta, GLA's τ, eps) are the
  references' defaults. Cached: one object per case, whose sensitivities compile once."""
  kw = CASES[case][1]
  if case == "mlstm":
    return _mlstm_reference
  if case == "gla":
    return _gla_reference
  if case.startswith("liger"):
    return lambda p, x: _liger_reference(p, x, **kw)
  if case in ("based", "pla"):
    return lambda p, x: _based_reference(p, x, kw.get("prefix_len", 0))
  if case == "baseconv":
    return _baseconv_reference
  heads = {k: kw[k] for k in ("num_heads", "num_kv_heads", "window") if k in kw}
  return lambda p, x: _attention_reference(p, x, **heads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case):
  _, mixer = _mixer(case)
  x = _x()
  w = np.random.default_rng(1).standard_normal(x.shape, np.float32)
  reference = _reference(case)
  (got, got_grads), (want, want_grads) = mixer_outputs_and_grads(mixer, reference, x, w)
  params = nnx.to_pure_dict(nnx.split(mixer)[1])
  magnitude = sensitivity_magnitude(reference, params, x)
  assert_close(got, want, rtol=0, atol=rounding_atol(magnitude, terms=_terms(case)))
  # Each computation a forward and a backward chain.
  loss = jax.grad(lambda p, x: jnp.sum(reference(p, x) * w), argnums=(0, 1))
  magnitudes = sensitivity_magnitude(loss, params, x)
  jax.tree.map(
    lambda g, r, m: assert_close(
      g, r, rtol=0, atol=rounding_atol(max_abs(m), terms=_terms(case, computations=4))
    ),
    got_grads,
    want_grads,
    magnitudes,
  )


@jax.jit
def _cached_runs(mixer, x):
  """Outputs of the same tokens computed with the cache in three ways, and the packed runs."""
  empty = mixer.init_cache(B, T, jnp.float32)
  full, no_cache = mixer(x)
  steps, _ = _decode(mixer, x, empty)
  prefill, cache = mixer(x[:, :SPLIT], cache=empty)
  decoded, _ = _decode(mixer, x[:, SPLIT:], cache)
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
    packed=packed,
    separate=jnp.concatenate(docs, 1),
    packed_cache_tail=tail,
  )


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decoding_and_packing_match_full_forward(case):
  _, mixer = _mixer(case)
  x = _x(2)
  out = _cached_runs(mixer, x)
  assert out["no_cache"] is None
  # Magnitudes of one pass and of the two documents run separately (two computations each).
  reference, params = _reference(case), nnx.to_pure_dict(nnx.split(mixer)[1])
  full = rounding_atol(sensitivity_magnitude(reference, params, x), terms=_terms(case))
  separate = [sensitivity_magnitude(reference, params, x) for x in (x[:, :SPLIT], x[:, SPLIT:])]
  separate = rounding_atol(np.concatenate(separate, 1), terms=_terms(case))
  if case == "pla":
    # Token by token from position 0 no token sees a later prefix token: not the parallel form.
    assert np.abs(out["steps"] - out["full"]).max() > 1e-3
  else:
    assert_close(out["steps"], out["full"], rtol=0, atol=full)
  assert_close(out["prefill_decode"], out["full"], rtol=0, atol=full)
  assert_close(out["packed"], out["separate"], rtol=0, atol=separate)
  assert_close(out["packed_cache_tail"], out["separate"][:, -2:], rtol=0, atol=separate[:, -2:])
  # The packed run must differ from the unpacked one, or the check above proves nothing.
  assert np.abs(out["packed"][:, SPLIT:] - out["full"][:, SPLIT:]).max() > 1e-3


def test_gla_cache_is_constant_size_and_attention_cache_grows():
  _, gla = _mixer("gla")
  _, attention = _mixer("attention")
  assert (
    gla.init_cache(B, 10, jnp.float32).state.shape
    == gla.init_cache(B, 1000, jnp.float32).state.shape
  )
  _, mlstm = _mixer("mlstm")
  shapes = [tuple(x.shape for x in mlstm.init_cache(B, n, jnp.bfloat16)) for n in (10, 1000)]
  assert shapes[0] == shapes[1] == ((B, 2, 4, 8), (B, 2, 4), (B, 2))
  assert attention.init_cache(B, 1000, jnp.bfloat16).k.shape == (B, 2, 1000, 8)
  assert attention.init_cache(B, 1000, jnp.bfloat16).k.dtype == jnp.bfloat16
  # Sliding-window attention keeps a ring of its window: one size past the window.
  _, windowed = _mixer("attention-gqa-window")
  assert windowed.init_cache(B, 2, jnp.float32).k.shape == (B, 2, 2, 4)
  for n in (10, 1000):
    assert windowed.init_cache(B, n, jnp.float32).k.shape == (B, 2, 3, 4)


@pytest.mark.parametrize(
  "module,kw,match",
  [
    (layers.Attention, dict(num_heads=0), "num_heads: expected a positive int, got 0"),
    (layers.Attention, dict(num_heads=4, num_kv_heads=3), "num_kv_heads: expected a divisor of"),
    (layers.Attention, dict(num_heads=2, head_dim=5), "head_dim: expected an even head width"),
    (layers.Attention, dict(num_heads=16), "head_dim: expected an even head width .* got 1"),
    (layers.Attention, dict(num_heads=2, window=0), "window: expected a positive int"),
    (layers.Attention, dict(num_heads=2, dtype="int8"), "dtype: expected a floating dtype"),
    (layers.GatedLinearAttention, dict(num_heads=3), "expand_k: expected expand_k \\* d_model"),
    (layers.GatedLinearAttention, dict(num_heads=2, gate_rank=0), "gate_rank: expected"),
    (layers.GatedLinearAttention, dict(num_heads=2, chunk_size=1.5), "chunk_size: expected"),
    (layers.GatedLinearAttention, dict(num_heads=2, gate_normalizer=0.0), "gate_normalizer"),
    (layers.MLSTM, dict(num_heads=3), "qk_dim_factor: expected qk_dim_factor \\* d_model"),
    (layers.MLSTM, dict(num_heads=2, v_dim_factor=0.1), "v_dim_factor: expected"),
    (layers.MLSTM, dict(num_heads=2, gate_soft_cap=0.0), "gate_soft_cap: expected a positive"),
    (layers.ParaGRU, dict(num_heads=3), "num_heads: expected a divisor of d_model=16, got 3"),
    (layers.ParaLSTM, dict(num_heads=2, max_iters=0), "max_iters: expected a positive int"),
    (layers.ParaLSTM, dict(num_heads=2, init_std=-1.0), "init_std: expected a non-negative"),
    (layers.ParaGRU, dict(num_heads=2, param_dtype=None), "param_dtype: expected a floating"),
    (layers.BasedLinearAttention, dict(num_heads=3), "num_heads: expected a divisor of d_model"),
    (layers.BasedLinearAttention, dict(num_heads=2, feature_dim=0), "feature_dim: expected"),
    (layers.PrefixLinearAttention, dict(num_heads=2, prefix_len=-1), "prefix_len: expected"),
    (layers.BaseConv, dict(kernel_size=0), "kernel_size: expected a positive int"),
  ],
)
def test_constructor_arguments_are_validated(module, kw, match):
  with pytest.raises(ValueError, match=match):
    module(D, **kw, rngs=nnx.Rngs(0))
