"""jaxrec.ops.based against independent references: the Taylor identity as a formula, a float64
numpy loop over explicit attention weights (testing_utils.numpy_prefix_attention) for values, and
jax.grad of a quadratic masked-attention form written here for gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, max_abs, numpy_prefix_attention, numpy_taylor_features

from jaxrec import ops

B, T, H, F, V = 2, 13, 2, 3, 4
FW = 1 + F + F * F
M = 4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, k_enc = (rng.standard_normal((B, T, H, F), np.float32) for _ in range(3))
  v, v_enc = (rng.standard_normal((B, T, H, V), np.float32) for _ in range(2))
  h0 = np.abs(rng.standard_normal((B, H, FW, V + 1), np.float32))  # a reachable state: den > 0
  seg = np.cumsum(rng.random((B, T)) < 0.25, axis=1).astype(np.int32)
  return q, k, v, k_enc, v_enc, h0, seg


def test_taylor_feature_map_is_the_second_order_exp_series():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 7, 5)).astype(np.float32)
  dot = np.sum(q.astype(np.float64) * k, axis=-1)
  want = 1 + dot / np.sqrt(5) + dot**2 / (2 * 5)
  got = jnp.sum(ops.taylor_feature_map(q) * ops.taylor_feature_map(k), axis=-1)
  assert_close(got, want, rtol=1e-5, atol=1e-6)
  assert_close(ops.taylor_feature_map(q), numpy_taylor_features(q), rtol=1e-6)
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
    want = numpy_prefix_attention(q, k, v, **ref)
    assert_close(y, want, rtol=0, atol=1e-5 * max_abs(want), err_msg=f"{method} {list(kw)}")


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
  # Split in two with the state handed over equals one pass.
  first, mid = _based("chunk")(q[:, :7], k[:, :7], v[:, :7])
  second, end = _based("chunk")(q[:, 7:], k[:, 7:], v[:, 7:], initial_state=mid)
  assert_close(jnp.concatenate([first, second], 1), full, rtol=1e-5, atol=1e-6)
  assert_close(end, state, rtol=1e-5, atol=1e-5)
  # One token at a time.
  ys, s = _steps(ops.based_attention_step, jnp.zeros_like(state), q, k, v)
  assert_close(ys, full, rtol=1e-5, atol=1e-6)
  assert_close(s, state, rtol=1e-5, atol=1e-5)


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
  want = numpy_prefix_attention(q, k, v, k_enc, v_enc, M, seg if segments else None)
  assert_close(y, want, rtol=0, atol=1e-5 * max_abs(want))
  # Without the encoder it is Based.
  assert np.abs(want - numpy_prefix_attention(q, k, v, segment_ids=seg)).max() > 1e-2


def _quadratic(q, k, v, k_enc, v_enc, seg):
  """The prefix attention as a masked [T, T] weight matrix (segments, per-document prefix)."""
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
  return num / jnp.moveaxis(den, 1, 2)[..., None]


def test_prefix_linear_attention_gradients_match_the_quadratic_form():
  q, k, v, k_enc, v_enc, _, seg = _inputs(3)
  w = np.random.default_rng(4).standard_normal((B, T, H, V)).astype(np.float32)

  def grads(f):
    return jax.jit(jax.grad(lambda *xs: jnp.sum(w * f(*xs, seg)), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, k_enc, v_enc
    )

  got = grads(lambda *xs: _pla(True)(*xs)[0])
  want = grads(_quadratic)
  for name, g, r in zip(("q", "k", "v", "k_enc", "v_enc"), got, want, strict=True):
    assert_close(g, r, rtol=0, atol=1e-4 * max_abs(r), err_msg=name)


def test_prefix_state_hand_over_and_decoding_from_the_prefix():
  q, k, v, k_enc, v_enc, *_ = _inputs(5)
  full, _ = _pla(False)(q, k, v, k_enc, v_enc, None)
  # A prefill that holds the prefix, then the rest continuing from its state.
  pre, state = _pla(False)(*(x[:, :6] for x in (q, k, v, k_enc, v_enc)), None)
  rest, _ = jax.jit(functools.partial(ops.prefix_linear_attention, prefix_len=M, continues=True))(
    *(x[:, 6:] for x in (q, k, v, k_enc, v_enc)), initial_state=state
  )
  assert_close(jnp.concatenate([pre, rest], 1), full, rtol=1e-5, atol=1e-5)
  step = functools.partial(ops.prefix_linear_attention_step, in_prefix=False)
  ys, _ = _steps(step, state, *(x[:, 6:] for x in (q, k, v, k_enc, v_enc)))
  assert_close(ys, full[:, 6:], rtol=1e-5, atol=1e-5)
  # A prefill shorter than the prefix is all prefix: the prefix length of the parallel form.
  short = [x[:, :3] for x in (q, k, v, k_enc, v_enc)]
  got, _ = _pla(False)(*short, None)
  assert_close(got, numpy_prefix_attention(*short, 3), rtol=1e-5, atol=1e-5)


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
