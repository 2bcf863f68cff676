r"""Decoding speed versus context length: GLA-only and mLSTM-only LMs against an attention-only LM.

Each model decodes ``--steps`` tokens (greedy, one jitted ``lax.fori_loop``) after a context of
``C`` tokens. The context is not prefilled through the model: its caches are filled with random
values at the right size (attention: a KV cache holding ``C`` keys and values; GLA: a random
``[B, H, K, V]`` state; mLSTM: random memory and normalizer), which costs the same per decoded
token as a real prefix. The recurrent states do not grow with ``C``, so their time per token stays
flat while attention reads ``C`` cached keys per token, in place: the step copies nothing of the
cache (``tests/layers/attention_decode_test.py``).

Each time is the median of ``--repeats`` calls, with its spread ((slowest - fastest) / median),
next to its memory bound: the bytes a step must read (every parameter, the filled part of a KV
cache, a whole recurrent state) over the read bandwidth measured at the start of the run (the
fastest of 10 reads). The machine line gives the load average.

  python -m experiments.bench_decode
  python -m experiments.bench_decode --contexts=1024,65536 --d_model=512 --steps=64
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments import _bench
from jaxrec.layers import GLACache, KVCache
from jaxrec.models import LM, LMConfig, param_count_of
from jaxrec.ops import MLSTMState

_CONTEXTS = flags.DEFINE_list(
  "contexts", ["1024", "2048", "4096", "8192", "16384", "32768"], "Context lengths C."
)
_MIXERS = flags.DEFINE_list("mixers", ["gla", "mlstm", "attention"], "One model per mixer name.")
_STEPS = flags.DEFINE_integer("steps", 16, "Tokens decoded per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per row (median and spread).")
_BATCH = flags.DEFINE_integer("batch", 1, "B.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Number of blocks.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Heads (attention: also key/value heads).")
_VOCAB = flags.DEFINE_integer("vocab_size", 256, "Vocabulary size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute/KV-cache dtype.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


def _config(mixer: str) -> LMConfig:
  return LMConfig(
    vocab_size=_VOCAB.value,
    d_model=_D_MODEL.value,
    num_layers=_NUM_LAYERS.value,
    mixer_pattern=(mixer,),
    num_heads=_NUM_HEADS.value,
    max_seq_len=max(int(c) for c in _CONTEXTS.value),
    dtype=_DTYPE.value,
  )


def _decoder(model: LM):
  """``decode(cache, token) -> (token, cache)``: ``--steps`` greedy steps in one jit; the cache
  is donated, so attention's KV cache is updated in place."""
  decode, state = _bench.greedy_decoder(model, _STEPS.value)
  return functools.partial(decode, state)


@functools.partial(jax.jit, static_argnums=(1,))
def _fill_randomly(cache, context: int):
  """The caches as if ``context`` tokens had been seen: random keys, values and states."""
  states = (KVCache, GLACache, MLSTMState)
  leaves, treedef = jax.tree.flatten(cache, is_leaf=lambda c: isinstance(c, states))
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(leaves)))
  filled = []
  for c in leaves:
    if isinstance(c, KVCache):
      k = jax.random.normal(next(keys), c.k.shape, c.k.dtype)
      v = jax.random.normal(next(keys), c.v.shape, c.v.dtype)
      filled.append(c._replace(k=k, v=v, index=jnp.asarray(context, jnp.int32)))
    elif isinstance(c, GLACache):
      filled.append(GLACache(0.1 * jax.random.normal(next(keys), c.state.shape, c.state.dtype)))
    elif isinstance(c, MLSTMState):
      mem = 0.1 * jax.random.normal(next(keys), c.c.shape, c.c.dtype)
      norm = jax.random.normal(next(keys), c.n.shape, c.n.dtype)
      filled.append(MLSTMState(mem, norm, c.m))
    else:
      raise ValueError(f"mixers: no random fill for a cache of type {type(c).__name__}")
  return jax.tree.unflatten(treedef, filled)


def _step_bytes(model: LM, cache, context: int) -> int:
  """Bytes one decoding step must read: every parameter, the ``context`` filled slots of each KV
  cache (not the empty ones after them) and every recurrent state."""
  read = _bench.array_bytes(nnx.state(model, nnx.Param))
  for c in jax.tree.leaves(cache, is_leaf=lambda c: isinstance(c, KVCache | GLACache | MLSTMState)):
    if isinstance(c, KVCache):
      read += (_bench.array_bytes((c.k, c.v)) * context) // c.k.shape[2]
    else:
      read += _bench.array_bytes(c)
  return read


def _times_per_token(decode, cache, token) -> list[float]:
  """Per-token times of ``--repeats`` calls (after a warm-up); the cache is donated, so each
  call continues from the last one's."""
  token, cache = jax.block_until_ready(decode(cache, token))  # compile + warm up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    token, cache = jax.block_until_ready(decode(cache, token))
    times.append((time.perf_counter() - start) / _STEPS.value)
  return times


def main(argv):
  del argv
  print(f"machine: {_bench.machine()}")
  contexts = [int(c) for c in _CONTEXTS.value]
  models = {name: LM(_config(name), rngs=nnx.Rngs(0)) for name in _MIXERS.value}
  for name, model in models.items():
    print(f"model {name}: {param_count_of(model):,} parameters, {model.cfg}")
  print(
    f"B={_BATCH.value}, {_STEPS.value} greedy steps per call, median of {_REPEATS.value} calls; "
    "each context is a cache filled with random values, not a prefill through the model."
  )
  bandwidth = _bench.read_bandwidth()
  print(f"read bandwidth: {bandwidth / 1e9:.2f} GB/s (jnp.sum of 256 MiB, fastest of 10)")
  decoders = {name: _decoder(model) for name, model in models.items()}
  token = jnp.zeros((_BATCH.value,), jnp.int32)
  rows = []
  first = {}
  for context in contexts:
    per_context = {}
    for name, model in models.items():
      # Room for the warm-up and the timed calls after the context.
      length = context + _STEPS.value * (_REPEATS.value + 1)
      cache = _fill_randomly(model.init_cache(_BATCH.value, length), context)
      bound = _step_bytes(model, cache, context) / bandwidth
      times = _times_per_token(decoders[name], cache, token)
      seconds = statistics.median(times)
      first.setdefault(name, seconds)
      per_context[name] = seconds
      rows.append(
        dict(
          method=name,
          context=context,
          ms_per_token=seconds * 1e3,
          spread=_bench.spread(times),
          bound_ms=bound * 1e3,
          vs_bound=seconds / bound,
          tokens_per_s=_BATCH.value / seconds,
          vs_first_context=seconds / first[name],
          vs_gla=seconds / per_context["gla"] if "gla" in per_context else None,
        )
      )
  print(
    "\n| method | context | ms/token | spread | memory bound (ms) | × bound | tokens/s | "
    "× own first context | × gla |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    vs_gla = "–" if r["vs_gla"] is None else f"{r['vs_gla']:.3g}"
    print(
      f"| {r['method']} | {r['context']} | {r['ms_per_token']:.3f} | {r['spread']:.2f} | "
      f"{r['bound_ms']:.3f} | {r['vs_bound']:.3g} | {r['tokens_per_s']:,.0f} | "
      f"{r['vs_first_context']:.3g} | {vs_gla} |"
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
