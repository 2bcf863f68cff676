"""A prompt prefilled in chunks through the caches equals one prefill call: for plain attention, a
recurrent mixer and every long-context policy, the logits and greedy tokens of ``generate`` and
the scores of ``loglikelihood`` (a pass over the whole sequence, and a prefill followed by
teacher-forced decoding); prefix linear attention, whose prefix is read within one call, equals it
when the prefix fits in the first chunk and warns otherwise."""

import warnings

import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, assert_same_generation, max_abs, reorder_tolerance

import jaxrec
from jaxrec.inference import loglikelihood, longctx
from jaxrec.models import LM, LMConfig

D, T0, NEW, CHUNK = 16, 13, 4, 4  # 13 = 1 + 3 x 4: a one-token head, then three full chunks

CASES = {
  "attention": (("attention",), None),
  "gla": (("gla",), None),
  "lm_infinite-top_k": (
    ("attention",),
    longctx.lm_infinite(2, 4, 5, top_k=2, top_k_from_layer=0, top_k_insert_at=3),
  ),
  "longheads": (("attention",), longctx.longheads(chunk_size=3, chunks_per_head=3)),
  "recycled": (("attention",), longctx.recycled(k=4, stride=3)),
  "set_based": (("attention",), longctx.set_based(prefix=3, options=(3, 4, 2), suffix=1)),
  "think-snapkv": (
    ("attention",),
    longctx.think(0.5, observation=3, eviction=longctx.SnapKV(capacity=6, kernel=3)),
  ),
}


def _model(pattern) -> LM:
  cfg = LMConfig(
    vocab_size=32,
    d_model=D,
    num_layers=1,
    mixer_pattern=pattern,
    num_heads=2,
    init_std=0.5,
    mixer_options={"gla": {"chunk_size": 4}},
    max_seq_len=64,
  )
  return LM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_chunked_prefill_equals_one_call(case):
  pattern, policy = CASES[case]
  model = _model(pattern)
  if policy is not None:
    model = longctx.apply(model, policy)
  prompt = np.random.default_rng(1).integers(0, 32, (2, T0)).astype(np.int32)
  tol = reorder_tolerance(D, T0 + NEW, layers=1)
  run = lambda chunk: jaxrec.generate(model, prompt, NEW, prefill_chunk=chunk, return_logits=True)
  one_call = run(None)
  assert_same_generation(run(CHUNK), one_call, tol, err_msg=case)
  # Scores at every position: one pass over the prompt and the first generated token (the
  # sequence Set-Based Prompting's layout describes), and the prompt's prefill followed by its
  # greedy continuation token by token.
  tokens = np.concatenate([prompt, one_call.tokens], axis=1)
  for prefill, n in ((None, T0 + 1), (T0, T0 + NEW)):
    want, got = (
      loglikelihood(model, tokens[:, :n], prefill, prefill_chunk=chunk) for chunk in (None, CHUNK)
    )
    assert_close(got, want, rtol=0, atol=tol * max_abs(want), err_msg=f"{case} {prefill}")


def test_prefix_linear_attention_equals_one_call_while_its_prefix_fits_a_chunk():
  cfg = LMConfig(
    vocab_size=32,
    d_model=D,
    num_layers=1,
    mixer_pattern=("pla",),
    num_heads=2,
    init_std=0.5,
    mixer_options={"pla": {"feature_dim": 4, "prefix_len": 4}},
  )
  model = LM(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(2).integers(0, 32, (2, T0)).astype(np.int32)
  want = loglikelihood(model, tokens, prefill_chunk=None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = loglikelihood(model, tokens, prefill_chunk=8)  # calls of 8 and 4: the prefix in the first
  tol = reorder_tolerance(D, T0, layers=1)
  assert_close(got, want, rtol=0, atol=tol * max_abs(want))
  with pytest.warns(UserWarning, match=r"pla\.prefix_len=4 .* crosses a boundary"):
    loglikelihood(model, tokens, prefill_chunk=3)
