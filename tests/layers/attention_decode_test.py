"""A decoding step of ``Attention`` reads its KV cache where it lies: the compiled step (XLA on
this machine's CPU) copies and transposes no array as large as the cache's keys, and the cache is
updated in place. Before ``written_after`` and ``merged_grouped_attention`` it copied each layer's K and V
cache 2-4 times per step, 4-6x off the memory bound (BENCHMARKS.md, issue 26).

The numbers these steps compute are checked against references in ``mixers_test.py``."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import lax
from testing_utils import large_moves

from jaxrec import layers

SLOTS = 203
WINDOW = 37


def _decode_hlo(attention: layers.Attention, cache) -> str:
  graphdef, state = nnx.split(attention)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def decode(state, cache, x):
    model = nnx.merge(graphdef, state)

    def step(_, carry):
      x, cache = carry
      return model(x, cache=cache)

    return lax.fori_loop(0, 3, step, (x, cache))

  x = jnp.ones((1, 1, 16))
  return decode.lower(state, cache, x).compile().as_text()


@pytest.mark.parametrize(
  "kw,slots",
  [
    (dict(num_heads=2), SLOTS),
    (dict(num_heads=4, num_kv_heads=2), SLOTS),
    (dict(num_heads=4, num_kv_heads=2, window=WINDOW), WINDOW),
  ],
  ids=["mha", "gqa", "ring"],
)
def test_decoding_step_copies_nothing_of_the_cache(kw, slots):
  attention = layers.Attention(16, **kw, rngs=nnx.Rngs(0))
  cache = attention.init_cache(1, SLOTS, jnp.float32)
  assert cache.k.shape[2] == slots
  cache = cache._replace(index=jnp.asarray(100, jnp.int32))
  moves = large_moves(_decode_hlo(attention, cache), cache.k.size)
  assert not moves, "\n".join(moves)
