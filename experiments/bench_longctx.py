r"""Long-context decoding: time per token and cache bytes against context length, vanilla attention
against each ``jaxrec.inference.longctx`` policy (paper defaults).

An attention-only LM decodes ``--steps`` tokens (greedy, one jitted ``lax.fori_loop``, caches
donated so they update in place) after a context of ``C`` tokens. The context is not prefilled
through the model (a vanilla prefill at 64k would not fit): each layer's cache takes the structure
the policy's prefill gives it (``jax.eval_shape``, no compute) filled with random keys and values,
consistent counters and valid indices; decoding then costs what it costs after a real prompt.
Recycled Attention's full steps (every ``stride``-th) are included in the average over ``--steps``;
LongHeads closes a chunk every ``chunk_size`` tokens (rarely within a timed call). Set-Based
Prompting changes what a structured prompt sees, not decoding cost, and is not benchmarked.

Each time is the median of ``--repeats`` calls, with its spread ((slowest - fastest) / median),
next to a memory bound: every parameter and every byte the cache holds read once, over the read
bandwidth measured at the start of the run (the fastest of 10 reads; a policy that reads less than
it holds, LongHeads' chunks or Recycled Attention's recycled keys between full steps, can beat
it). The machine line gives the load average.

  python -m experiments.bench_longctx
  python -m experiments.bench_longctx --contexts=1024,32768 --steps=20
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
from jaxrec.inference import longctx
from jaxrec.models import LM, LMConfig, param_count_of

_CONTEXTS = flags.DEFINE_list(
  "contexts", ["1024", "2048", "4096", "8192", "16384", "32768", "65536"], "Context lengths C."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Tokens decoded per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per row (median and spread).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Number of attention blocks.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Heads (also key/value heads).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")

POLICIES = {
  "vanilla": None,
  "lm_infinite": longctx.lm_infinite(global_tokens=10, window=4096, distance_cap=4096),
  "recycled": longctx.recycled(k=2048, stride=10),
  "longheads": longctx.longheads(chunk_size=256, chunks_per_head=16),
  "think": longctx.think(channel_ratio=0.4),
}


def _decoder(model: LM):
  """``decode(cache, token) -> (token, cache)``: ``--steps`` greedy steps in one jit; the cache
  is donated, so attention's KV cache is updated in place."""
  decode, state = _bench.greedy_decoder(model, _STEPS.value)
  return functools.partial(decode, state)


_COUNTERS = ("index", "position", "last_full", "steps", "filled")


def _filled_layer(cache, context: int, key):
  """One layer's cache as if ``context`` tokens had been prefilled: random floats, counters at
  ``context`` (last full step just before, ThinK's observation window full), indices in range."""
  values = {}
  for name, x in zip(cache._fields, cache, strict=True):
    key, sub = jax.random.split(key)
    if x is None:  # an absent field, e.g. a contiguous KVCache's ring positions
      values[name] = None
    elif name in ("index", "position"):
      values[name] = jnp.asarray(context, jnp.int32)
    elif name == "last_full":
      values[name] = jnp.asarray(context - 1, jnp.int32)
    elif name == "steps":
      values[name] = jnp.zeros((), jnp.int32)
    elif name == "filled":
      values[name] = jnp.asarray(32, jnp.int32)
    elif name in ("recycled", "keep"):  # distinct valid indices per head
      values[name] = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    elif jnp.issubdtype(x.dtype, jnp.floating):
      values[name] = jax.random.normal(sub, x.shape, x.dtype)
    else:
      values[name] = jnp.zeros(x.shape, x.dtype)
  return type(cache)(**values)


def _cache(model: LM, context: int, length: int):
  """The caches after a ``context``-token prompt, in a cache of ``length`` tokens."""
  empty = model.init_cache(1, length)
  prompt = jax.ShapeDtypeStruct((1, context), jnp.int32)
  shapes = jax.eval_shape(lambda c, p: model(p, cache=c)[1], empty, prompt)
  keys = jax.random.split(jax.random.key(0), len(shapes))
  fill = jax.jit(_filled_layer, static_argnums=(1,))
  return tuple(
    fill(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layer), context, k)
    for layer, k in zip(shapes, keys, strict=True)
  )


def _times_per_token(decode, cache, token) -> list[float]:
  """Per-token times of ``--repeats`` calls (after a warm-up), each continuing the last."""
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
  cfg = LMConfig(
    vocab_size=256,
    d_model=_D_MODEL.value,
    num_layers=_NUM_LAYERS.value,
    num_heads=_NUM_HEADS.value,
    mixer_pattern=("attention",),
  )
  model = LM(cfg, rngs=nnx.Rngs(0))
  print(f"model: {param_count_of(model):,} parameters, {cfg}")
  for name, policy in POLICIES.items():
    print(f"{name}: {policy}")
  print(f"B=1, {_STEPS.value} greedy steps per call, median of {_REPEATS.value} calls.")
  models = {
    name: model if policy is None else longctx.apply(model, policy)
    for name, policy in POLICIES.items()
  }
  decoders = {name: _decoder(m) for name, m in models.items()}
  bandwidth = _bench.read_bandwidth()
  params = _bench.array_bytes(nnx.state(model, nnx.Param))
  print(f"read bandwidth: {bandwidth / 1e9:.2f} GB/s (jnp.sum of 256 MiB, fastest of 10)")
  token = jnp.zeros((1,), jnp.int32)
  rows = []
  for context in (int(c) for c in _CONTEXTS.value):
    base = {}
    for name, m in models.items():
      length = context + _STEPS.value * (_REPEATS.value + 1)
      cache = _cache(m, context, length)
      nbytes = longctx.cache_bytes(cache)
      keys = [c.key_bytes() for c in cache if isinstance(c, longctx.ThinKCache)]
      times = _times_per_token(decoders[name], cache, token)
      seconds = statistics.median(times)
      bound = (params + nbytes) / bandwidth
      base.setdefault("seconds", seconds)
      base.setdefault("bytes", nbytes)
      rows.append(
        dict(
          method=name,
          context=context,
          ms_per_token=seconds * 1e3,
          spread=_bench.spread(times),
          bound_ms=bound * 1e3,
          vs_bound=seconds / bound,
          tokens_per_s=1 / seconds,
          speedup=base["seconds"] / seconds,
          cache_mb=nbytes / 2**20,
          cache_vs_vanilla=nbytes / base["bytes"],
          pruned_keys_vs_full=sum(k[0] for k in keys) / sum(k[1] for k in keys) if keys else None,
        )
      )
      print(rows[-1], flush=True)
  print(
    "\n| method | context | ms/token | spread | memory bound (ms) | × bound | tokens/s | "
    "speed-up vs vanilla | cache MiB | cache / vanilla | pruned keys / full |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    pruned = "–" if r["pruned_keys_vs_full"] is None else f"{r['pruned_keys_vs_full']:.2f}"
    print(
      f"| {r['method']} | {r['context']} | {r['ms_per_token']:.3f} | {r['spread']:.2f} | "
      f"{r['bound_ms']:.3f} | {r['vs_bound']:.3g} | {r['tokens_per_s']:,.0f} | "
      f"{r['speedup']:.2f} | {r['cache_mb']:.1f} | {r['cache_vs_vanilla']:.2f} | {pruned} |"
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
