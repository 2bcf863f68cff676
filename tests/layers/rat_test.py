"""The RAT mixer: a prefill then token-by-token decoding (the state passed across calls) equals the
full forward, the gate bias starts chrono and is kept out of weight decay, and bad arguments name
the argument. The op's forms and gradients are tested in tests/ops/rat_test.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, decode_token_by_token

from jaxrec import layers

B, T, D, L = 2, 10, 16, 4


def test_prefill_then_decoding_equals_the_full_forward():
  mixer = layers.RAT(D, 2, chunk_size=L, init_std=0.5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)
  full, _ = nnx.jit(lambda m, x: m(x))(mixer, x)

  @nnx.jit
  def prefill_and_decode(mixer, x):
    y0, cache = mixer(x[:, :3], cache=mixer.init_cache(B, T, jnp.float32))
    y1, cache = decode_token_by_token(mixer, x[:, 3:], cache)
    return jnp.concatenate([y0, y1], 1), cache

  got, cache = prefill_and_decode(mixer, x)
  assert_close(got, full, rtol=1e-5, atol=1e-6)
  assert cache.chunk_k.shape == (B, T // L + 1, 2, D // 2)


def test_gate_bias_is_chrono_and_not_decayed():
  mixer = layers.RAT(D, 2, chunk_size=L, rngs=nnx.Rngs(0))
  bias = np.asarray(mixer.gate_bias[...])
  assert bias.min() >= 0.0 and bias.max() <= np.log(L - 1) + 1e-6
  assert mixer.gate_bias.get_metadata()["weight_decay"] is False


@pytest.mark.parametrize(
  "kw, message",
  [
    (dict(chunk_size=0), "chunk_size"),
    (dict(qk_groups=3), "qk_groups: expected a divisor of num_heads=2"),
    (dict(position="alibi"), "position"),
  ],
)
def test_bad_arguments_name_the_argument(kw, message):
  with pytest.raises(ValueError, match=message):
    layers.RAT(D, 2, **kw, rngs=nnx.Rngs(0))
