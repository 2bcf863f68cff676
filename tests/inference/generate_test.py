"""generate(): greedy (the default) against argmax over repeated full forwards (no cache), stop
tokens, streaming, sampling filters, seeds, the trained-context warning and the number of
compilations over many prompt lengths."""

import dataclasses
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close

import jaxrec
from jaxrec.inference import longctx, sample_logits
from jaxrec.inference.prefill import bucket_length
from jaxrec.models import LM, LMConfig

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=4,
  mixer_pattern=("gla", "attention"),
  num_heads=2,
  init_std=0.5,
  mixer_options={"gla": {"chunk_size": 16}},
  max_seq_len=16,
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


def test_greedy_is_the_default_and_equals_argmax_of_full_forwards(models):
  loop, scanned = models
  want = _greedy_by_full_forwards(loop, PROMPT, NEW)[:, PROMPT.shape[1] :]
  for model in (loop, scanned):
    got = jaxrec.generate(model, PROMPT, NEW)
    assert got.tokens.shape == (2, NEW) and got.tokens.dtype == np.int32
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(got.lengths, [NEW, NEW])


def test_top_k_one_is_greedy_and_seeds_reproduce(models):
  loop, _ = models
  greedy = jaxrec.generate(loop, PROMPT, NEW).tokens
  sample = lambda **kw: jaxrec.generate(loop, PROMPT, NEW, temperature=1.0, **kw).tokens
  np.testing.assert_array_equal(sample(top_k=1, seed=5), greedy)
  a = sample(seed=0)
  np.testing.assert_array_equal(sample(seed=0), a)
  assert not np.array_equal(sample(seed=1), a)


def test_rows_stop_at_their_stop_tokens(models):
  loop, _ = models
  free = jaxrec.generate(loop, PROMPT, NEW).tokens
  # Plant the stops: the greedy token of row 0 at step 2, and of row 1 at step 4 (each at its
  # first occurrence in its row, so the step where the row stops is known).
  stops = [int(free[0, 2]), int(free[1, 4])]
  want_lengths = [1 + min(int(np.flatnonzero(np.isin(row, stops))[0]), NEW - 1) for row in free]
  assert want_lengths[0] <= 3 and want_lengths[1] <= 5
  got = jaxrec.generate(loop, PROMPT, NEW, stop_tokens=stops, pad_id=31)
  np.testing.assert_array_equal(got.lengths, want_lengths)
  for row, n in enumerate(want_lengths):
    np.testing.assert_array_equal(got.tokens[row, :n], free[row, :n])
    assert got.tokens[row, n - 1] in stops
    np.testing.assert_array_equal(got.tokens[row, n:], 31)
  assert got.rows() == [free[row, :n].tolist() for row, n in enumerate(want_lengths)]


def test_tokens_stream_as_they_are_decoded_and_the_stream_can_end_them(models):
  loop, _ = models
  free = jaxrec.generate(loop, PROMPT, NEW).tokens
  steps = []
  got = jaxrec.generate(
    loop, PROMPT, NEW, stop_tokens=[int(free[0, 1])], on_token=lambda t, d: steps.append((t, d))
  )
  # The loop runs until every row has stopped or NEW tokens: one callback per step.
  assert len(steps) == max(got.lengths)
  np.testing.assert_array_equal(
    np.stack([t for t, _ in steps], axis=1), got.tokens[:, : len(steps)]
  )
  stopped = got.tokens[[0, 1], got.lengths - 1] == free[0, 1]
  np.testing.assert_array_equal(steps[-1][1], stopped)
  # A callback returning True ends the generation after that step.
  steps = []
  cut = jaxrec.generate(loop, PROMPT, NEW, on_token=lambda t, d: steps.append(t) or len(steps) == 2)
  assert len(steps) == 2
  np.testing.assert_array_equal(cut.lengths, [2, 2])
  np.testing.assert_array_equal(cut.tokens[:, :2], free[:, :2])


def test_ragged_list_prompts_and_zero_new_tokens(models):
  loop, _ = models
  out = jaxrec.generate(loop, [1, 2, 3], 0)
  assert out.tokens.shape == (1, 0) and out.lengths.tolist() == [0]
  ragged = jaxrec.generate(loop, [[1, 2, 3], [4, 5]], 2)
  assert ragged.tokens.shape == (2, 2)


def test_bad_arguments_are_refused(models):
  loop, _ = models
  with pytest.raises(ValueError, match="max_new_tokens"):
    jaxrec.generate(loop, [1, 2, 3], -1)
  with pytest.raises(ValueError, match="prompt"):
    jaxrec.generate(loop, np.zeros((2, 3), np.float32), 2)
  with pytest.raises(ValueError, match="prompt"):
    jaxrec.generate(loop, [[1, 2], []], 2)
  with pytest.raises(ValueError, match="top_p"):
    jaxrec.generate(loop, [1, 2, 3], 2, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature: top_k=2 / top_p=None filter sampling"):
    jaxrec.generate(loop, [1, 2, 3], 2, top_k=2)
  with pytest.raises(ValueError, match="stop_tokens"):
    jaxrec.generate(loop, [1, 2, 3], 2, stop_tokens=[-1])
  with pytest.raises(ValueError, match="buckets"):
    jaxrec.generate(loop, [1, 2, 3], 2, buckets=[8, 4])
  with pytest.raises(ValueError, match="prefill_chunk"):
    jaxrec.generate(loop, [1, 2, 3], 2, prefill_chunk=0)
  with pytest.raises(ValueError, match="on_token"):
    jaxrec.generate(loop, [1, 2, 3], 2, on_token=3)
  with pytest.raises(ValueError, match="must have one length"):
    jaxrec.generate(longctx.apply(loop, longctx.recycled(k=2, stride=2)), [[1, 2, 3], [4, 5]], 2)


def test_prompts_past_the_trained_context_warn_without_a_policy(models):
  loop, _ = models
  # The prompts of the tests above (two rows, bucket 16): no new program.
  long = np.ones((2, CFG.max_seq_len - NEW + 1), np.int32)
  with pytest.warns(UserWarning, match=r"max_seq_len=16.*jaxrec.inference.longctx.apply"):
    jaxrec.generate(loop, long, NEW)
  with pytest.warns(UserWarning, match="max_seq_len=16"):
    jaxrec.inference.loglikelihood(loop, np.ones((1, CFG.max_seq_len + 2), np.int32))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxrec.generate(loop, long[:, 1:], NEW)  # exactly the trained context
    jaxrec.generate(longctx.apply(loop, longctx.recycled(k=4, stride=2)), long, NEW)


def test_a_session_of_many_prompt_lengths_compiles_once_per_bucket():
  """20 prompts of 20 lengths (and one count of new tokens): one program per prompt bucket."""
  cfg = dataclasses.replace(CFG, vocab_size=48, num_layers=2, max_seq_len=64)
  model = LM(cfg, rngs=nnx.Rngs(2))
  lengths = list(range(3, 43, 2))
  buckets = {bucket_length(n, "pow2") for n in lengths}
  assert len(lengths) == 20 and buckets == {16, 32, 64}
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    rng = np.random.default_rng(0)
    for n in lengths:
      out = jaxrec.generate(model, rng.integers(0, 48, n).tolist(), 4, temperature=0.5, seed=n)
      assert out.tokens.shape == (1, 4)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # Every new program is lowered once, whether the backend then compiles it or the persistent
  # compilation cache (tests/conftest.py) loads it.
  assert compiles.count("/jax/core/compile/jaxpr_to_mlir_module_duration") == len(buckets)
  assert compiles.count("/jax/core/compile/backend_compile_duration") <= len(buckets)


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


def test_a_growing_kv_cache_decodes_the_same_tokens(models, monkeypatch):
  """Past GROW_FROM slots the cache starts at the prompt's size and doubles: 8 prompt slots and
  32 new tokens decode in caches of 16, 32 and 40 slots, as in one cache of 40."""
  generate_lib = importlib.import_module("jaxrec.inference.generate")
  loop, _ = models
  prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], np.int32)
  want = _greedy_by_full_forwards(loop, prompt, 32)[:, 8:]
  np.testing.assert_array_equal(jaxrec.generate(loop, prompt, 32).tokens, want)
  monkeypatch.setattr(generate_lib, "GROW_FROM", 8)
  assert generate_lib.cache_capacities(8, 32, grow=True) == (16, 32, 40)
  np.testing.assert_array_equal(jaxrec.generate(loop, prompt, 32).tokens, want)
