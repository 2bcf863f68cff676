"""A long-context policy's decoding step reads its cache where it lies: after a real prefill, the
compiled decode loop of an attention LM under each policy copies and transposes no array as
large as a quarter of the layer's largest cache array (the chunks LongHeads gathers and the keys
Recycled Attention recycles are the methods' own reads, gathers, not copies). Before issue 26
vanilla, LM-Infinite, Recycled Attention and ThinK transposed their seq-major caches every step
(``tests/layers/attention_decode_test.py`` is the same check for the plain layer).

The numbers these steps compute are each method's own tests' business."""


import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from testing_utils import large_moves

from experiments import _bench
from jaxrec.inference import longctx
from jaxrec.models import LM, LMConfig

CFG = LMConfig(
  vocab_size=64,
  d_model=64,
  num_layers=1,
  mixer_pattern=("attention",),
  num_heads=2,
  max_seq_len=512,
)
CONTEXT, ROOM = 300, 400
POLICIES = {
  "vanilla": None,
  "lm_infinite": longctx.lm_infinite(global_tokens=4, window=64, distance_cap=64),
  "lm_infinite_top_k": longctx.lm_infinite(
    global_tokens=4, window=64, distance_cap=64, top_k=8, top_k_from_layer=0
  ),
  "recycled": longctx.recycled(k=32, stride=4),
  "longheads": longctx.longheads(chunk_size=16, chunks_per_head=4),
  "think": longctx.think(channel_ratio=0.4),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decoding_step_copies_nothing_of_the_cache(name):
  model = LM(CFG, rngs=nnx.Rngs(0))
  if POLICIES[name] is not None:
    model = longctx.apply(model, POLICIES[name])
  decode, state = _bench.greedy_decoder(model, 3)
  graphdef = nnx.graphdef(model)
  prompt = jax.random.randint(jax.random.key(1), (1, CONTEXT), 0, CFG.vocab_size)

  @jax.jit
  def prefill(state, prompt):
    model = nnx.merge(graphdef, state)
    return model(prompt, cache=model.init_cache(1, ROOM))[1]

  cache = prefill(state, prompt)
  token = jnp.zeros((1,), jnp.int32)
  hlo = decode.lower(state, cache, token).compile().as_text()
  largest = max(x.size for x in jax.tree.leaves(cache))
  moves = large_moves(hlo, largest // 4)
  assert not moves, "\n".join(moves)
