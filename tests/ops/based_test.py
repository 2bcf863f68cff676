"""jaxrec.ops.based against independent references: the Taylor identity as a formula, a float64
numpy loop over explicit attention weights (testing_utils.numpy_prefix_attention) for values, and
jax.grad of a quadratic masked-attention form written here for gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import (
  assert_close,
  numpy_prefix_attention,
  numpy_taylor_features,
  rounding_atol,
)

from jaxrec import ops

B, T, H, F, V = 2, 13, 2, 3, 4
FW = 1 + F + F * F
M = 4
# Roundings on the longest chain of one output: the feature map (a product and a scale), a sum
# over at most T tokens of width-FW dot products (in either order: state then readout, or scores
# then values), and the normalizer's division.
TERMS = 2 + T + FW + 1


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, k_enc = (rng.standard_normal((B, T, H, F), np.float32) for _ in range(3))
  v, v_enc = (rng.standard_normal((B, T, H, V), np.float32) for _ in range(2))
  seg = np.cumsum(rng.random((B, T)) < 0.25, axis=1).astype(np.int32)
  return q, k, v, k_enc, v_enc, _reachable_state(seed), seg


def _reachable_state(seed, tokens=6):
  """``Σ φ(k) [v, 1]ᵀ`` over a few earlier tokens: a state the recurrence reaches, so its
  normalizer ``φ(q)·Σ φ(k) >= tokens / 2`` (an arbitrary positive matrix can make it cancel to
  zero, and the output as ill-conditioned as it likes)."""
  rng = np.random.default_rng(seed + 100)
  k, v = rng.standard_normal((B, tokens, H, F)), rng.standard_normal((B, tokens, H, V))
  v1 = np.concatenate([v, np.ones((B, tokens, H, 1))], -1)
  return np.einsum("bnhf,bnhv->bhfv", numpy_taylor_features(k), v1).astype(np.float32)


def _state_magnitude(k, v):
  """``Σ |φ(k)| [|v|, 1]ᵀ`` over time, ``[B, H, FW, V + 1]``: the magnitude of the Based state."""
  v1 = np.concatenate([np.abs(v), np.ones((*v.shape[:-1], 1))], -1)
  return np.einsum("bthf,bthv->bhfv", numpy_taylor_features(np.abs(k)), v1)


def test_taylor_feature_map_is_the_second_order_exp_series():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 7, 5)).astype(np.float32)
  dot = np.sum(q.astype(np.float64) * k, axis=-1)
  want = 1 + dot / np.sqrt(5) + dot**2 / (2 * 5)
  got = jnp.sum(ops.taylor_feature_map(q) * ops.taylor_feature_map(k), axis=-1)
  # A width-31 dot product of features that each took two roundings (a product, a scale).
  magnitude = np.sum(numpy_taylor_features(np.abs(q)) * numpy_taylor_features(np.abs(k)), -1)
  assert_close(got, want, rtol=0, atol=rounding_atol(magnitude, terms=31 + 2))
  # Each feature: a product, the scale (itself rounded to fp32) and the multiply by it.
  want = numpy_taylor_features(q)
  assert_close(ops.taylor_feature_map(q), want, rtol=0, atol=rounding_atol(np.abs(want), terms=3))
  assert ops.taylor_feature_map(q).shape == (7, 1 + 5 + 25)


@functools.cache
def _based(method):
  return jax.jit(
    functools.partial(ops.based_attention, method=method, chunk_size=4, output_final_state=True)
  )


@pytest.mark.parametrize("method", ["sequential", "chunk"])
def test_based_attention_matches_explicit_weights(method):
  q, k, v, _, _, h0, seg = _inputs()
  for kw, ref in (
    (dict(initial_state=h0), dict(h0=h0)),
    (dict(initial_state=h0, segment_ids=seg), dict(h0=h0, segment_ids=seg)),
  ):
    y, _ = _based(method)(q, k, v, **kw)
    want, magnitude = numpy_prefix_attention(q, k, v, **ref, with_magnitude=True)
    atol = rounding_atol(magnitude, terms=TERMS)
    assert_close(y, want, rtol=0, atol=atol, err_msg=f"{method} {list(kw)}")


@functools.partial(jax.jit, static_argnums=0)
def _steps(step, state, *xs):
  """``step(*x_t, state) -> (y_t, state)`` over the time axis of ``xs [B, T, ...]``."""

  def body(state, x_t):
    y, state = step(*x_t, state)
    return state, y

  state, ys = jax.lax.scan(body, state, tuple(jnp.swapaxes(x, 0, 1) for x in xs))
  return jnp.swapaxes(ys, 0, 1), state


def test_based_state_hand_over_and_decoding_steps():
  q, k, v, *_ = _inputs(1)
  full, state = _based("chunk")(q, k, v)
  # Two fp32 computations: their errors add. The state is a sum over T tokens of features (two
  # roundings each) times values.
  _, magnitude = numpy_prefix_attention(q, k, v, with_magnitude=True)
  y_atol = rounding_atol(magnitude, terms=2 * TERMS)
  state_atol = rounding_atol(_state_magnitude(k, v), terms=2 * (2 + T + 1))
  # Split in two with the state handed over equals one pass.
  first, mid = _based("chunk")(q[:, :7], k[:, :7], v[:, :7])
  second, end = _based("chunk")(q[:, 7:], k[:, 7:], v[:, 7:], initial_state=mid)
  assert_close(jnp.concatenate([first, second], 1), full, rtol=0, atol=y_atol)
  assert_close(end, state, rtol=0, atol=state_atol)
  # One token at a time.
  ys, s = _steps(ops.based_attention_step, jnp.zeros_like(state), q, k, v)
  assert_close(ys, full, rtol=0, atol=y_atol)
  assert_close(s, state, rtol=0, atol=state_atol)


@functools.cache
def _pla(segments):
  def f(q, k, v, k_enc, v_enc, seg):
    return ops.prefix_linear_attention(
      q,
      k,
      v,
      k_enc,
      v_enc,
      prefix_len=M,
      segment_ids=seg if segments else None,
      chunk_size=4,
      output_final_state=True,
    )

  return jax.jit(f)


@pytest.mark.parametrize("segments", [False, True])
def test_prefix_linear_attention_matches_explicit_weights(segments):
  q, k, v, k_enc, v_enc, _, seg = _inputs(2)
  y, _ = _pla(segments)(q, k, v, k_enc, v_enc, seg)
  want, magnitude = numpy_prefix_attention(
    q, k, v, k_enc, v_enc, M, seg if segments else None, with_magnitude=True
  )
  # The decoder sum, plus the encoder's (with segments a forward and a reversed sum).
  assert_close(y, want, rtol=0, atol=rounding_atol(magnitude, terms=2 * TERMS))
  # Without the encoder it is Based.
  assert np.abs(want - numpy_prefix_attention(q, k, v, segment_ids=seg)).max() > 1e-2


def _quadratic(q, k, v, k_enc, v_enc, seg):
  """The prefix attention as a masked [T, T] weight matrix (segments, per-document prefix)."""
  num, den = _quadratic_parts(q, k, v, k_enc, v_enc, seg)
  return num / den


def _quadratic_parts(q, k, v, k_enc, v_enc, seg):
  """``_quadratic``'s numerator ``[B, T, H, V]`` and normalizer ``[B, T, H, 1]``."""
  phi = ops.taylor_feature_map
  same = seg[:, :, None] == seg[:, None, :]  # ids here never repeat non-adjacently
  t = jnp.arange(T)
  first = jnp.argmax(same, axis=-1)  # the first position of each token's document
  offset = t - first
  causal = same & (t[:, None] >= t[None, :])
  enc = same & (offset[:, None, :] < M)
  w_dec = jnp.einsum("bihf,bjhf->bhij", phi(q), phi(k)) * causal[:, None]
  w_enc = jnp.einsum("bihf,bjhf->bhij", phi(q), phi(k_enc)) * enc[:, None]
  num = jnp.einsum("bhij,bjhv->bihv", w_dec, v) + jnp.einsum("bhij,bjhv->bihv", w_enc, v_enc)
  den = jnp.sum(w_dec, -1) + jnp.sum(w_enc, -1)
  return num, jnp.moveaxis(den, 1, 2)[..., None]


def _gradient_magnitude(xs, w, seg):
  """Per input element, the magnitude of the gradient of ``Σ w·num/den``: the cotangents
  ``w/den`` and ``Σ w·y/den`` of the two parts, taken absolute, pulled back through the parts at
  ``|inputs|`` (every term of the pull-back of a polynomial then counts positively)."""
  num, den = _quadratic_parts(*xs, seg)
  d_num = np.abs(w / den)
  d_den = np.abs(np.sum(w * num / den**2, -1, keepdims=True))

  def pulled_back(*xs):
    num, den = _quadratic_parts(*xs, seg)
    return jnp.sum(d_num * num) + jnp.sum(d_den * den)

  return jax.grad(pulled_back, argnums=(0, 1, 2, 3, 4))(*(np.abs(x) for x in xs))


def test_prefix_linear_attention_gradients_match_the_quadratic_form():
  q, k, v, k_enc, v_enc, _, seg = _inputs(3)
  w = np.random.default_rng(4).standard_normal((B, T, H, V)).astype(np.float32)

  def grads(f):
    return jax.jit(jax.grad(lambda *xs: jnp.sum(w * f(*xs, seg)), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, k_enc, v_enc
    )

  got = grads(lambda *xs: _pla(True)(*xs)[0])
  want = grads(_quadratic)
  magnitudes = _gradient_magnitude((q, k, v, k_enc, v_enc), w, seg)
  for name, g, r, m in zip(("q", "k", "v", "k_enc", "v_enc"), got, want, magnitudes, strict=True):
    # Two fp32 computations, each a forward and a backward chain of about TERMS roundings.
    assert_close(g, r, rtol=0, atol=rounding_atol(m, terms=4 * TERMS), err_msg=name)


def test_prefix_state_hand_over_and_decoding_from_the_prefix():
  q, k, v, k_enc, v_enc, *_ = _inputs(5)
  full, _ = _pla(False)(q, k, v, k_enc, v_enc, None)
  # Two fp32 computations, each a decoder and an encoder sum.
  _, magnitude = numpy_prefix_attention(q, k, v, k_enc, v_enc, M, with_magnitude=True)
  atol = rounding_atol(magnitude, terms=4 * TERMS)
  # A prefill that holds the prefix, then the rest continuing from its state.
  pre, state = _pla(False)(*(x[:, :6] for x in (q, k, v, k_enc, v_enc)), None)
  rest, _ = jax.jit(functools.partial(ops.prefix_linear_attention, prefix_len=M, continues=True))(
    *(x[:, 6:] for x in (q, k, v, k_enc, v_enc)), initial_state=state
  )
  assert_close(jnp.concatenate([pre, rest], 1), full, rtol=0, atol=atol)
  step = functools.partial(ops.prefix_linear_attention_step, in_prefix=False)
  ys, _ = _steps(step, state, *(x[:, 6:] for x in (q, k, v, k_enc, v_enc)))
  assert_close(ys, full[:, 6:], rtol=0, atol=atol[:, 6:])
  # A prefill shorter than the prefix is all prefix: the prefix length of the parallel form.
  short = [x[:, :3] for x in (q, k, v, k_enc, v_enc)]
  got, _ = _pla(False)(*short, None)
  want, magnitude = numpy_prefix_attention(*short, 3, with_magnitude=True)
  assert_close(got, want, rtol=0, atol=rounding_atol(magnitude, terms=2 * TERMS))


def test_prefix_mask_is_per_document():
  seg = jnp.array([[5, 5, 5, 5, 5, 2, 2, 9, 9, 9]])
  want = [[1, 1, 1, 0, 0, 1, 1, 1, 1, 1]]
  assert (ops.prefix_mask((1, 10), 3, segment_ids=seg) == np.array(want, bool)).all()
  want = [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]  # the first document began in an earlier call
  assert (
    ops.prefix_mask((1, 10), 3, segment_ids=seg, continues=True) == np.array(want, bool)
  ).all()
  assert not ops.prefix_mask((1, 4), 3, continues=True).any()
  assert (ops.prefix_mask((2, 4), 0) == 0).all()


def test_bad_arguments_name_the_argument():
  q, k, v, k_enc, v_enc, h0, _ = _inputs()
  with pytest.raises(ValueError, match=r"k: expected shape \(2, 13, 2, 3\)"):
    ops.based_attention(q, k[:, :5], v)
  with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 2, 13, 5\)"):
    ops.based_attention(q, k, v, initial_state=h0[..., :4])
  with pytest.raises(ValueError, match=r"v_enc: expected shape \(2, 13, 2, 4\)"):
    ops.prefix_linear_attention(q, k, v, k_enc, v_enc[..., :2], prefix_len=M)
  with pytest.raises(ValueError, match="method: expected one of"):
    ops.based_attention(q, k, v, method="fast")
  with pytest.raises(ValueError, match="segment_ids: expected an integer dtype"):
    ops.based_attention(q, k, v, segment_ids=np.zeros((B, T), np.float32))
