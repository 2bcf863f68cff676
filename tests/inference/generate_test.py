"""generate(): greedy decoding against argmax over repeated full forwards (no cache), sampling
filters, seeds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close

import jaxrec
from jaxrec.inference import sample_logits
from jaxrec.models import LM, LMConfig

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=4,
  mixer_pattern=("gla", "attention"),
  num_heads=2,
  init_std=0.5,
  gla_chunk_size=16,
)
PROMPT = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
NEW = 6


@pytest.fixture(scope="module")
def models():
  """The looped model and a scanned model holding the same parameters."""
  loop = LM(CFG, rngs=nnx.Rngs(0))
  scanned = LM(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(1))
  pure = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  blocks = pure.pop("layers")
  period = len(CFG.mixer_pattern)
  groups = CFG.num_layers // period
  pure["layers"] = {
    "blocks": {
      p: jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[g * period + p] for g in range(groups)))
      for p in range(period)
    }
  }
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(scanned, state)
  return loop, scanned


def _greedy_by_full_forwards(model, prompt, new):
  """Argmax of a full, cache-free forward over the sequence so far, one token at a time.

  The sequence lives in a fixed-size buffer (one compilation); causality makes the logits at
  position t independent of the zero padding after it.
  """
  forward = jax.jit(lambda m, tokens: m(tokens)[0])
  t0 = prompt.shape[1]
  buf = np.zeros((prompt.shape[0], t0 + new), np.int32)
  buf[:, :t0] = prompt
  for t in range(t0, t0 + new):
    buf[:, t] = np.argmax(forward(model, buf)[:, t - 1], axis=-1)
  return buf


def test_greedy_equals_argmax_of_full_forwards(models):
  loop, scanned = models
  want = _greedy_by_full_forwards(loop, PROMPT, NEW)
  for model in (loop, scanned):
    got = jaxrec.generate(model, PROMPT, NEW, temperature=0.0)
    assert got.shape == (2, PROMPT.shape[1] + NEW) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


def test_top_k_one_is_greedy_and_seeds_reproduce(models):
  loop, _ = models
  greedy = jaxrec.generate(loop, PROMPT, NEW, temperature=0.0)
  np.testing.assert_array_equal(jaxrec.generate(loop, PROMPT, NEW, top_k=1, seed=5), greedy)
  a = jaxrec.generate(loop, PROMPT, NEW, seed=0)
  np.testing.assert_array_equal(jaxrec.generate(loop, PROMPT, NEW, seed=0), a)
  assert not np.array_equal(jaxrec.generate(loop, PROMPT, NEW, seed=1), a)
  np.testing.assert_array_equal(a[:, : PROMPT.shape[1]], PROMPT)


def test_list_prompt_and_zero_new_tokens(models):
  loop, _ = models
  np.testing.assert_array_equal(jaxrec.generate(loop, [1, 2, 3], 0), [[1, 2, 3]])
  with pytest.raises(ValueError, match="max_new_tokens"):
    jaxrec.generate(loop, [1, 2, 3], -1)
  with pytest.raises(ValueError, match="prompt"):
    jaxrec.generate(loop, np.zeros((2, 3), np.float32), 2)
  with pytest.raises(ValueError, match="top_p"):
    jaxrec.generate(loop, [1, 2, 3], 2, top_p=0.0)


def test_sampling_filters_restrict_the_support():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]] * 2000))
  keys = jax.random.key(0)
  top_k = np.asarray(sample_logits(logits, keys, 1.0, top_k=2))
  assert set(top_k) == {1, 2}
  # top_p = 0.75: {0.4, 0.3} holds 0.7 < 0.75, so 0.15 joins; 0.1 and 0.05 stay out.
  top_p = np.asarray(sample_logits(logits, keys, 1.0, top_p=0.75))
  assert set(top_p) == {1, 2, 3}
  np.testing.assert_array_equal(sample_logits(logits[:2], keys, 1.0, top_p=1e-6), [1, 1])
  np.testing.assert_array_equal(sample_logits(logits[:2], keys, 0.0), [1, 1])
  # Unfiltered sampling follows the probabilities.
  freq = np.bincount(np.asarray(sample_logits(logits, keys, 1.0)), minlength=5) / 2000
  assert_close(freq, [0.05, 0.4, 0.3, 0.15, 0.1], rtol=0.0, atol=0.04)
