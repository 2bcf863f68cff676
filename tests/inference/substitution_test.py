"""A long-context policy applied by module substitution (``longctx.apply``): the copy wraps exactly
the attention layers, shares the model's parameter arrays and leaves the model as it was; it runs
through jit, remat, generation, the Sampler and scoring like any ``LM``; what cannot be wrapped is
refused; ``longctx.chunked`` re-applies a policy for a chunked prefill. That a wrapped model reads
its keys as each method's dense reference does is the business of the method's own tests (and
``chunked_prefill_test``)."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, lm_chain, lm_logits_atol, max_abs, rounding_atol

import jaxrec
from jaxrec import layers
from jaxrec.inference import longctx
from jaxrec.models import LM, LMConfig

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=3,
  mixer_pattern=("attention", "gla", "liger"),
  num_heads=2,
  init_std=0.5,
  mixer_options={"gla": {"chunk_size": 8}, "liger": {"window": 4}},
  max_seq_len=64,
)
T = 12
POLICY = longctx.lm_infinite(global_tokens=2, window=4, distance_cap=5)


def _tokens(b=2, t=T, seed=0):
  return np.random.default_rng(seed).integers(0, 32, (b, t)).astype(np.int32)


def _logits(model, tokens):
  return np.asarray(jax.jit(lambda t: model(t)[0])(tokens))


@pytest.fixture(scope="module")
def model():
  return LM(CFG, rngs=nnx.Rngs(0))


def test_apply_wraps_the_attention_layers_and_shares_the_arrays(model):
  tokens = _tokens()
  before = _logits(model, tokens)
  flat_before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  wrapped = longctx.apply(model, POLICY)

  # The model is left as it was: its mixers, its state, its outputs.
  assert [type(b.mixer) for b in model.layers] == [
    layers.Attention,
    layers.GatedLinearAttention,
    layers.LigerAttention,
  ]
  flat_after = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
  assert flat_after.keys() == flat_before.keys()
  assert all(flat_after[p] is flat_before[p] for p in flat_before)
  np.testing.assert_array_equal(_logits(model, tokens), before)

  # Only the attention layer is wrapped, told its depth; GLA and Liger's attention are not.
  mixers = [b.mixer for b in wrapped.layers]
  assert isinstance(mixers[0], longctx.PolicyAttention)
  assert (mixers[0].policy, mixers[0].layer) == (POLICY, 0)
  assert type(mixers[1]) is layers.GatedLinearAttention
  assert type(mixers[2]) is layers.LigerAttention
  assert isinstance(wrapped, LM) and longctx.policy_of(wrapped) == POLICY
  assert longctx.policy_of(model) is None

  # The same parameter arrays, none copied and none added: the wrapper's path has one more name.
  flat_wrapped = {
    tuple(k for k in p if k != "attention"): v.get_value()
    for p, v in nnx.to_flat_state(nnx.state(wrapped))
  }
  assert flat_wrapped.keys() == flat_before.keys()
  for path, value in flat_before.items():
    assert flat_wrapped[path] is value, path
    assert flat_wrapped[path].unsafe_buffer_pointer() == value.unsafe_buffer_pointer(), path
  # The variables themselves are shared: an update of the model shows in the copy.
  assert wrapped.layers[0].mixer.attention.q_proj.kernel is model.layers[0].mixer.q_proj.kernel

  # The wrapped model reads its keys through the policy: a window below T changes the logits.
  logits = _logits(wrapped, tokens)
  assert logits.shape == before.shape and np.abs(logits - before).max() > 1e-3


def test_a_policy_that_sees_every_key_gives_the_models_logits(model):
  """LM-Infinite with a window and distance cap past the sequence is plain attention: the
  wrapped model computes the model's function, the other layers untouched."""
  tokens = _tokens()
  want = _logits(model, tokens)
  wide = longctx.apply(
    model, longctx.lm_infinite(global_tokens=1, window=2 * T, distance_cap=2 * T)
  )
  got = _logits(wide, tokens)
  assert_close(got, want, rtol=0, atol=lm_logits_atol(want, CFG, T))
  cache = wide.init_cache(2, T + 1)
  got, cache = jax.jit(lambda t, c: wide(t, cache=c))(tokens, cache)
  assert_close(got, want, rtol=0, atol=lm_logits_atol(want, CFG, T))


def test_remat_gives_the_same_logits_and_gradients(model):
  tokens = _tokens(t=T)
  remat = LM(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(1))
  nnx.update(remat, nnx.state(model))

  def logits_and_grads(m):
    graphdef, state = nnx.split(longctx.apply(m, POLICY), nnx.Param)

    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens)[0]
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(state)
    return logits, jax.tree.leaves(grads)

  want_logits, want_grads = logits_and_grads(model)
  logits, grads = logits_and_grads(remat)
  assert_close(logits, want_logits, rtol=0, atol=lm_logits_atol(want_logits, CFG, T))
  # Each gradient is a sum along the same chains, run backwards: the gradients' scale times
  # both runs' roundings.
  atol = rounding_atol(max(max_abs(g) for g in want_grads), terms=2 * lm_chain(CFG, T))
  for g, w in zip(grads, want_grads, strict=True):
    assert_close(g, w, rtol=0, atol=atol)


def test_generate_sampler_and_scoring_run_the_wrapped_model(model):
  """No ``policy=`` anywhere: the wrapped model is the argument. The Sampler decodes what
  ``generate`` decodes; teacher-forced decoding of the generated tokens scores their argmax."""
  wrapped = longctx.apply(model, POLICY)
  prompt = _tokens(t=T)
  out = jaxrec.generate(wrapped, prompt, 3, prefill_chunk=5, return_logits=True)
  sampled = jaxrec.Sampler(wrapped, prefill_chunk=5)(prompt.tolist(), 3)
  np.testing.assert_array_equal(sampled.generation.tokens, out.tokens)
  tokens = np.concatenate([prompt, out.tokens], axis=1)
  scores = np.asarray(jaxrec.inference.loglikelihood(wrapped, tokens, prefill=T))
  picked = jax.nn.log_softmax(out.logits, axis=-1).max(-1)
  assert_close(scores[:, T - 1 :], picked, rtol=0, atol=2 * lm_logits_atol(out.logits, CFG, T + 3))
  for f in (jaxrec.generate, jaxrec.Sampler.__init__, jaxrec.inference.loglikelihood):
    assert "policy" not in inspect.signature(f).parameters, f.__qualname__
  for f in (layers.Attention.__call__, layers.Attention.init_cache):
    assert not {"policy", "layer"} & set(inspect.signature(f).parameters), f.__qualname__


def test_chunked_reapplies_the_policy_for_a_prompt_length(model):
  think = longctx.think(0.5, observation=3)
  wrapped = longctx.apply(model, think)
  for_prompt = longctx.chunked(wrapped, 9)
  assert longctx.policy_of(for_prompt) == think.chunked(9) != think
  assert longctx.policy_of(wrapped) == think  # the model given is left as it was
  a, b = for_prompt.layers[0].mixer.attention, wrapped.layers[0].mixer.attention
  assert a.q_proj.kernel is b.q_proj.kernel
  # A policy that reads chunks as one call, and a model without a policy, are given back.
  recycled = longctx.apply(model, longctx.recycled(k=4, stride=3))
  assert longctx.chunked(recycled, 9) is recycled
  assert longctx.chunked(model, 9) is model


def test_what_cannot_be_wrapped_is_refused(model):
  with pytest.raises(ValueError, match=r"policy: expected a jaxrec\.inference\.longctx policy"):
    longctx.apply(model, None)
  with pytest.raises(ValueError, match=r"model: expected a jaxrec\.models\.LM, got Attention"):
    longctx.apply(model.layers[0].mixer, POLICY)
  scanned = LM(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"build the model with scan_layers=False"):
    longctx.apply(scanned, POLICY)
  recurrent = LM(dataclasses.replace(CFG, mixer_pattern=("gla",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model: has no attention layer .*'gla'"):
    longctx.apply(recurrent, POLICY)
  wrapped = longctx.apply(model, POLICY)
  with pytest.raises(ValueError, match="model: already has the long-context policy"):
    longctx.apply(wrapped, longctx.recycled(k=4))
  with pytest.raises(ValueError, match="segment_ids: packed sequences are not supported"):
    wrapped(_tokens(), segment_ids=np.ones((2, T), np.int32))
  with pytest.raises(ValueError, match=r"attention: expected a jaxrec\.layers\.Attention"):
    longctx.PolicyAttention(model.layers[1].mixer, POLICY, layer=1)
  with pytest.raises(ValueError, match="layer: expected an int >= 0"):
    longctx.PolicyAttention(model.layers[0].mixer, POLICY, layer=-1)
