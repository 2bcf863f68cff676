r"""RAT and MoE cost: one RAT layer against one attention layer, an MoE feed-forward against a dense
SwiGLU of equal active parameters.

* ``train``: forward + backward of one mixer layer on ``[B, T, D]`` (RAT's chunk attention is
  ``T × T / L``, attention's ``T × T``).
* ``decode``: one token at position ``P`` against a cache holding ``P`` tokens (attention: ``P``
  keys and values; RAT: ``P / L`` chunk states), random values at the right size.
* ``moe``: forward + backward of ``MoE(E experts, top-k, hidden F)`` against ``MLP(hidden k·F)``,
  the same active parameters per token, for each of ``--moe_tokens``: the capacity dispatch
  (capacity factor 1.25, and without a limit) and the sorted dropless dispatch (its grouped
  matmuls as tiles, and as ``jax.lax.ragged_dot``).

Medians of ``--repeats`` timed calls after a warm-up call (compilation); MoE rows also give the
spread, (slowest - fastest) / median. The machine line gives the load average.

  python -m experiments.bench_rat
  python -m experiments.bench_rat --lengths=1024,4096,16384 --d_model=512 --chunk_sizes=16,64
"""

import json
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments import _bench
from jaxrec import layers

_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096"], "Sequence lengths T.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["16"], "RAT chunk lengths L.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Heads.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row (median reported).")
_EXPERTS = flags.DEFINE_integer("experts", 8, "MoE experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "MoE experts per token.")
_MOE_TOKENS = flags.DEFINE_list("moe_tokens", ["2048", "8192"], "Tokens per MoE call.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


def _time(f, *args) -> float:
  return statistics.median(_times(f, *args))


def _times(f, *args) -> list[float]:
  return _bench.timings(f, *args, repeats=_REPEATS.value)


def _train_step(module):
  graphdef, state = nnx.split(module)

  @jax.jit
  def f(state, x):
    def loss(state, x):
      y = nnx.merge(graphdef, state)(x)
      return jnp.sum(jnp.square((y[0] if isinstance(y, tuple) else y).astype(jnp.float32)))

    return jax.grad(loss)(state, x)

  return lambda x: f(state, x)


def _decode_step(module, cache):
  graphdef, state = nnx.split(module)

  @jax.jit
  def f(state, cache, x):
    return nnx.merge(graphdef, state)(x, cache=cache)

  return lambda x: f(state, cache, x)


def _filled(cache, position):
  """A cache of random values for ``position`` tokens already seen."""
  key = jax.random.key(0)
  filled = jax.tree.map(
    lambda a: jax.random.normal(key, a.shape, a.dtype) if a.dtype == jnp.float32 else a, cache
  )
  return filled._replace(index=jnp.asarray(position, jnp.int32))


def _mixers():
  d, h = _D_MODEL.value, _NUM_HEADS.value
  rngs = nnx.Rngs(0)
  yield "attention", layers.Attention(d, h, rngs=rngs)
  for c in _CHUNKS.value:
    yield f"rat(L={c})", layers.RAT(d, h, chunk_size=int(c), rngs=rngs)


def run() -> list[dict]:
  rows = []
  d = _D_MODEL.value
  for t in (int(x) for x in _LENGTHS.value):
    x = jax.random.normal(jax.random.key(1), (1, t, d))
    base = {}
    for name, mixer in _mixers():
      train = _time(_train_step(mixer), x)
      cache = _filled(mixer.init_cache(1, t + 1, jnp.float32), t)
      decode = _time(_decode_step(mixer, cache), x[:, :1])
      base.setdefault("train", train)
      base.setdefault("decode", decode)
      rows.append(
        dict(
          bench="rat",
          method=name,
          T=t,
          train_ms=1e3 * train,
          train_tokens_per_s=t / train,
          decode_ms=1e3 * decode,
          train_speedup=base["train"] / train,
          decode_speedup=base["decode"] / decode,
        )
      )
  e, k = _EXPERTS.value, _TOP_K.value
  f = 4 * d // k
  variants = (
    ("moe", dict(capacity_factor=1.25)),
    ("moe-no-drop", dict(capacity_factor=None)),
    ("moe-sorted", dict(dispatch="sorted", grouped_matmul="tiles")),
    ("moe-sorted-ragged_dot", dict(dispatch="sorted", grouped_matmul="ragged_dot")),
  )
  for n in (int(x) for x in _MOE_TOKENS.value):
    x = jax.random.normal(jax.random.key(2), (1, n, d))
    times = {"dense": _times(_train_step(layers.MLP(d, k * f, rngs=nnx.Rngs(0))), x)}
    for name, kw in variants:
      times[name] = _times(_train_step(layers.MoE(d, f, e, top_k=k, rngs=nnx.Rngs(0), **kw)), x)
    dense = statistics.median(times["dense"])
    for name, ts in times.items():
      median = statistics.median(ts)
      rows.append(
        dict(
          bench="moe",
          method=f"dense(F={k * f})" if name == "dense" else name,
          T=n,
          train_ms=1e3 * median,
          spread=(max(ts) - min(ts)) / median,
          ratio_to_dense=median / dense,
        )
      )
  return rows


def main(argv):
  del argv
  print(f"machine: {_bench.machine()}")
  rows = run()
  for r in rows:
    print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
