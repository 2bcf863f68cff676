"""Ragged prompts in one batch: every registered mixer generates for a left-padded prompt what it
generates for the prompt alone (logits and greedy tokens); padding that ends on a prefill-chunk
boundary is read as its own document; the chunk schedule avoids those boundaries."""

import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_same_generation, reorder_tolerance

import jaxrec
from jaxrec.inference.prefill import ChunkSchedule, chunk_schedule
from jaxrec.models import LM, LMConfig, mixer_names

LONG = [[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]]  # 7 tokens: no padding in their batch
SHORT = [6, 5, 3]  # left-padded by 4 beside LONG[0]
NEW = 5
D = 16


def _model(mixer: str) -> LM:
  """One layer of ``mixer`` with chunks, windows and prefixes shorter than the prompts, so that
  the padding crosses them. (That packed documents change a mixer's output at all is
  ``tests/layers/mixers_test.py``'s.)"""
  cfg = LMConfig(
    vocab_size=32,
    d_model=D,
    num_layers=1,
    mixer_pattern=(mixer,),
    num_heads=2,
    num_kv_heads=1 if mixer == "attention" else None,
    init_std=0.5,
    max_seq_len=64,
    mixer_options={
      "gla": {"chunk_size": 4},
      "mlstm": {"chunk_size": 4},
      "liger": {"chunk_size": 4, "window": 3},
      "based": {"feature_dim": 4},
      "pla": {"feature_dim": 4, "prefix_len": 4},
      "rat": {"chunk_size": 3, "qk_groups": 1},  # the padding (4) is not a multiple: chunks move
    },
  )
  return LM(cfg, rngs=nnx.Rngs(0))


def _generate(model, prompts, **kw):
  return jaxrec.generate(model, prompts, NEW, buckets=None, return_logits=True, **kw)


@pytest.mark.parametrize("mixer", mixer_names())
def test_a_ragged_batch_equals_each_prompt_alone(mixer):
  model = _model(mixer)
  tol = reorder_tolerance(D, len(LONG[0]) + NEW, layers=1)
  # Two programs: [B=2, T=7] serves the unpadded pair and the ragged pair, [B=1, T=3] the short
  # prompt alone.
  alone_long = _generate(model, LONG)
  alone_short = _generate(model, [SHORT])
  ragged = _generate(model, [LONG[0], SHORT])
  want = jaxrec.Generation(
    *(np.concatenate([a[:1], b]) for a, b in zip(alone_long, alone_short, strict=True))
  )
  assert_same_generation(ragged, want, tol, err_msg=mixer)


def test_padding_ending_on_a_chunk_boundary_is_still_its_own_document():
  cfg = LMConfig(
    vocab_size=32,
    d_model=D,
    num_layers=2,
    mixer_pattern=("gla", "attention"),
    num_heads=2,
    init_std=0.5,
    mixer_options={"gla": {"chunk_size": 4}},
  )
  model = LM(cfg, rngs=nnx.Rngs(1))
  # Bucket 16: paddings 4 and 8, both on the boundaries of 4-token chunks.
  prompts = [list(range(1, 13)), list(range(3, 11))]
  assert chunk_schedule(16, 4, [4, 8]) == ChunkSchedule(head=1, size=4, count=3, tail=3)
  kw = dict(return_logits=True)
  chunked = jaxrec.generate(model, prompts, NEW, prefill_chunk=4, **kw)
  one_call = jaxrec.generate(model, prompts, NEW, prefill_chunk=None, **kw)
  assert_same_generation(chunked, one_call, reorder_tolerance(D, 16 + NEW, layers=2))


def test_chunk_schedules():
  assert chunk_schedule(10, None) == ChunkSchedule(10, 10, 0, 0)
  assert chunk_schedule(10, 16) == ChunkSchedule(10, 16, 0, 0)
  assert chunk_schedule(32, 8) == ChunkSchedule(0, 8, 4, 0)
  # A one-token remainder goes first: a policy would read a last one-token call as decoding.
  assert chunk_schedule(33, 8) == ChunkSchedule(1, 8, 4, 0)
  assert chunk_schedule(35, 8) == ChunkSchedule(0, 8, 4, 3)
  # Prompts starting at columns 8 and 17 (padding of 8 and 17): no boundary at 0 or 1 mod 8.
  schedule = chunk_schedule(32, 8, [8, 17, 0])
  assert schedule == ChunkSchedule(2, 8, 3, 6) and schedule.length == 32 and schedule.calls == 5
