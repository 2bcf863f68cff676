"""Liger attention beyond the shared mixer checks of ``mixers_test``: its sliding-window branch
against full attention, the size of its decoding state, and its arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, max_abs, module_sensitivity, rounding_atol

from jaxrec import layers

B, T, D = 2, 12, 16
ARGS = dict(num_heads=4, num_kv_heads=2, init_std=0.5)


def _pair(window):
  """A Liger layer with ``window`` and one without, holding the same parameters."""
  with_window = layers.LigerAttention(D, window=window, **ARGS, rngs=nnx.Rngs(0))
  recurrent = layers.LigerAttention(D, window=None, **ARGS, rngs=nnx.Rngs(1))
  nnx.update(recurrent, nnx.state(with_window))
  return with_window, recurrent


def test_window_covering_the_sequence_is_full_attention():
  """``o_proj`` is linear without bias, so ``y(window=T) - ½ y(no window)`` is ``½`` of the
  output of ``Attention`` (full causal) with the same weights."""
  liger, recurrent = _pair(window=T)
  attention = layers.Attention(D, **ARGS, rngs=nnx.Rngs(2))
  nnx.update(attention, nnx.state(liger))
  x = np.random.default_rng(0).standard_normal((B, T, D), np.float32)
  f = jax.jit(lambda m, x: m(x)[0])
  full = f(attention, x)
  # Three fp32 layers, each a chain of its projections (D), a sum over T steps (three a step for
  # the recurrence), head-wide products and its output projection (D), against its sensitivity.
  chain = D + 3 * T + 2 * D + D + 10
  magnitude = sum(
    w * module_sensitivity(m, x) for w, m in ((1.0, liger), (0.5, recurrent), (0.5, attention))
  )
  atol = rounding_atol(magnitude, terms=chain)
  assert_close(f(liger, x) - 0.5 * f(recurrent, x), 0.5 * full, rtol=0, atol=atol)
  # A shorter window is another function: the check above can fail.
  short, _ = _pair(window=T // 2)
  nnx.update(short, nnx.state(liger))
  assert max_abs(f(short, x) - 0.5 * f(recurrent, x) - 0.5 * full) > 1e-3


def _nbytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def test_decoding_state_has_one_size_at_every_context_length():
  liger, recurrent = _pair(window=4)
  step = jax.jit(lambda m, x, c: m(x, cache=c)[1])
  x = jnp.ones((B, 1, D))
  # Keys and values of 4 tokens, [B, 4, G=2, K=4] fp32 each; the state [B, H=4, K, K] fp32.
  for layer, window_bytes in ((liger, 2 * B * 4 * 2 * 4 * 4), (recurrent, 0)):
    cache = layer.init_cache(B, 16, jnp.float32)
    size = _nbytes(cache)
    assert size == _nbytes(layer.init_cache(B, 100_000, jnp.float32))
    ring = (cache.window.k, cache.window.v) if cache.window is not None else ()
    assert cache.state.shape == (B, 4, 4, 4) and _nbytes(ring) == window_bytes
    sizes = set()
    for _ in range(10):  # past the window: the ring wraps, nothing grows
      cache = step(layer, x, cache)
      sizes.add(_nbytes(cache))
    assert int(cache.index) == 10 and sizes == {size}


def test_without_the_recurrence_it_is_sliding_window_attention():
  """``recurrence=False`` is ``Attention`` with the same window and weights (no half weight, no
  recurrent state), in the parallel form and decoding token by token."""
  window = 4
  swa = layers.LigerAttention(D, window=window, recurrence=False, **ARGS, rngs=nnx.Rngs(0))
  attention = layers.Attention(D, window=window, **ARGS, rngs=nnx.Rngs(2))
  nnx.update(attention, nnx.state(swa))
  x = np.random.default_rng(0).standard_normal((B, T, D), np.float32)
  want = jax.jit(lambda m, x: m(x)[0])(attention, x)
  # Two fp32 layers: projections (D), a softmax over the window, the output projection (D).
  magnitude = module_sensitivity(swa, x) + module_sensitivity(attention, x)
  atol = rounding_atol(magnitude, terms=2 * D + window + 10)
  assert_close(jax.jit(lambda m, x: m(x)[0])(swa, x), want, rtol=0, atol=atol)

  step = jax.jit(lambda m, x, c: m(x, cache=c))
  cache = swa.init_cache(B, T, jnp.float32)
  assert cache.state is None and _nbytes(cache.window.k) == B * window * 2 * 4 * 4
  outs = []
  for t in range(T):
    y, cache = step(swa, x[:, t : t + 1], cache)
    outs.append(y)
  assert_close(jnp.concatenate(outs, axis=1), want, rtol=0, atol=atol)
  # Liger with both branches is another function: the checks above can fail.
  both = layers.LigerAttention(D, window=window, **ARGS, rngs=nnx.Rngs(3))
  nnx.update(both, nnx.state(swa))
  assert max_abs(jax.jit(lambda m, x: m(x)[0])(both, x) - want) > 1e-3


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(variant="rwkv"), r"variant: expected one of \('gla', 'hgrn2'\)"),
    (dict(gate_source="query"), "gate_source: expected one of"),
    (dict(window=0), "window: expected a positive int"),
    (dict(chunk_size=0), "chunk_size: expected a positive int"),
    (dict(window=None, recurrence=False), "recurrence: expected True, or False with a window"),
    (
      dict(rope_scaling={"rope_type": "yarn"}),
      r"rope_scaling: expected rope_type in \('llama3',\)",
    ),
  ],
)
def test_arguments_are_validated(kw, match):
  with pytest.raises(ValueError, match=match):
    layers.LigerAttention(D, **ARGS | kw, rngs=nnx.Rngs(0))
