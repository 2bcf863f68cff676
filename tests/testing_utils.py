"""Test-only references shared by several test files (on sys.path via setup.cfg's pythonpath)."""

import jax
import jax.numpy as jnp


def sequential_rnn(cell, params, xs, h0):
  """``h_t = cell(params, h_{t-1}, x_t)`` one sequence at a time by ``lax.scan``: the reference
  for every Newton solve. ``xs [B, T, ...]``, ``h0 [B, D]`` -> ``h [B, T, D]``."""

  def one(x, h):
    def step(h, x_t):
      h = cell(params, h, x_t)
      return h, h

    return jax.lax.scan(step, h, x)[1]

  return jax.vmap(one)(xs, h0)


def decode_token_by_token(mixer, x, cache):
  """Feeds ``x [B, t, D]`` one token at a time (the same call with T = 1 and a cache)."""

  def step(cache, x_t):
    y, cache = mixer(x_t[:, None], cache=cache)
    return cache, y[:, 0]

  cache, y = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))
  return jnp.swapaxes(y, 0, 1), cache
