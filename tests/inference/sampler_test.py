"""Sampler: text in and out with the tokenizer's bos and eos, a planted eos ends the text, extra
stop tokens, ids without a tokenizer, and streaming (text pieces and ids, closed early)."""

import numpy as np
import pytest
from flax import nnx

import jaxrec
from jaxrec.data import ByteTokenizer
from jaxrec.models import LM, LMConfig

NEW = 6


@pytest.fixture(scope="module")
def model():
  cfg = LMConfig(
    vocab_size=ByteTokenizer.vocab_size,
    d_model=16,
    num_layers=2,
    mixer_pattern=("gla", "attention"),
    num_heads=2,
    init_std=0.5,
    mixer_options={"gla": {"chunk_size": 8}},
  )
  return LM(cfg, rngs=nnx.Rngs(0))


def test_text_in_text_out_until_a_planted_eos(model):
  tok = ByteTokenizer()
  prompts = ["ab", "hello"]
  ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
  free = jaxrec.generate(model, ids, NEW).tokens
  # A tokenizer whose eos is what the model writes at step 2 of the first prompt.
  planted = type("Planted", (ByteTokenizer,), {"eos_id": int(free[0, 2])})()
  sampler = jaxrec.Sampler(model, planted)
  assert sampler.stop_tokens == (planted.eos_id,) and sampler.pad_id == tok.pad_id
  out = sampler(prompts, NEW)
  ends = [next((i for i, t in enumerate(row) if t == planted.eos_id), NEW) for row in free]
  assert ends[0] <= 2
  assert out.tokens == [row[:n].tolist() for row, n in zip(free, ends, strict=True)]
  assert out.text == [tok.decode(t) for t in out.tokens]
  np.testing.assert_array_equal(out.generation.lengths, [min(n + 1, NEW) for n in ends])
  # Further stop tokens end it too; ids work without a tokenizer.
  stop = int(free[1, 1])
  bare = jaxrec.Sampler(model, stop_tokens=[stop])(ids, NEW)
  assert bare.text is None and bare.tokens[1] == free[1, :1].tolist()


def test_stream_yields_the_text_as_it_is_decoded(model):
  sampler = jaxrec.Sampler(model, ByteTokenizer())
  whole = sampler("ab", NEW, temperature=0.7, seed=3)
  pieces = list(sampler.stream("ab", NEW, temperature=0.7, seed=3))
  assert "".join(pieces) == whole.text[0] and len(pieces) >= 1
  stream = sampler.stream("ab", NEW)
  next(stream)
  stream.close()  # ends the generation; nothing hangs
  ids = jaxrec.Sampler(model)
  got = list(ids.stream([1, 2, 3], NEW))
  assert got == ids([1, 2, 3], NEW).tokens[0]
  with pytest.raises(ValueError, match="text needs a tokenizer"):
    ids("ab")
  with pytest.raises(ValueError, match="stream\\(\\) takes one prompt"):
    list(ids.stream([[1, 2], [3]]))
