"""The RAT mixer: a prefill then token-by-token decoding (the state passed across calls) equals the
full forward, a packed row equals its documents run alone (cuts off the chunk grid) and so does
its prefill and decoding, the gate bias starts chrono and is kept out of weight decay, and bad arguments name
the argument. The op's forms and gradients are tested in tests/ops/rat_test.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, decode_token_by_token, max_abs

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


def test_packed_rows_equal_documents_alone_and_their_prefill_then_decoding():
  # Cuts at 2, 5 and 6, off the chunk grid; documents of one token and shorter than L. The
  # decoding (tokens `prefill` onward) continues each row's last document, as a call's first token
  # continues the cache's document.
  t, prefill = 13, 8
  lengths = ([5, 1, 7], [2, 3, 8])
  seg = jnp.asarray(np.stack([np.repeat(np.arange(3), n) for n in lengths]), jnp.int32)
  docs = [
    (row, s, s + n) for row, ns in enumerate(lengths) for s, n in zip(np.cumsum([0, *ns]), ns)
  ]
  mixer = layers.RAT(D, 2, chunk_size=L, init_std=0.5, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, t, D)).astype(np.float32)
  # Each document alone starts a row of its own; the tokens after it are filler (RAT is causal).
  alone_x = rng.standard_normal((len(docs), t, D)).astype(np.float32)
  for i, (row, s, e) in enumerate(docs):
    alone_x[i, : e - s] = x[row, s:e]

  @nnx.jit
  def runs(mixer, x, alone_x):
    packed, _ = mixer(x, segment_ids=seg)
    y0, cache = mixer(
      x[:, :prefill], segment_ids=seg[:, :prefill], cache=mixer.init_cache(B, t, jnp.float32)
    )
    y1, _ = decode_token_by_token(mixer, x[:, prefill:], cache)
    return packed, jnp.concatenate([y0, y1], 1), mixer(alone_x)[0], mixer(x)[0]

  packed, cached, alone, unpacked = (np.asarray(y) for y in runs(mixer, x, alone_x))
  # Each pair computes the same document in fp32 (u = 6e-8): packed and alone in another order of
  # roundings, cached and packed by the two forms, which agree to ~60 u of the output scale
  # (tests/ops/rat_test.py); the D-term output projection adds ~D u. 1e-5 of the scale covers both.
  atol = 1e-5 * max_abs(packed)
  for i, (row, s, e) in enumerate(docs):
    assert_close(packed[row, s:e], alone[i, : e - s], rtol=1e-5, atol=atol, err_msg=f"doc {i}")
  assert_close(cached, packed, rtol=1e-5, atol=atol)
  # The documents must interact without packing, or the checks above prove nothing.
  assert np.abs(packed - unpacked).max() > 1e-3


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
