r"""The mLSTM forms of ``jaxrec.ops.mlstm`` beside ``mlstm_kernels``' JAX chunkwise form.

One run times, at the same shape and on the same inputs, the forward pass and the forward+backward
pass (``jax.grad`` of ``sum(w · h)``) of each method: jaxrec's ``sequential``, ``parallel``,
``chunk`` and ``pallas`` (interpret mode on CPU) forms, and the peer, ``mlstm_kernels``' native JAX
chunkwise form (``mlstm_kernels/jax/chunkwise/native/fw.py``, differentiated by autodiff as its
``native_autograd`` entry point does). The peer's ``mlstm_kernels.jax`` package imports
``jax_triton`` at the top, which does not run on CPU, so its native module is loaded from its file
directly. The peer takes ``[B, H, T, D]``; its inputs are transposed before timing.

  pip install --no-deps mlstm-kernels einops
  python -m experiments.bench_mlstm
  python -m experiments.bench_mlstm --seq_lens=512,2048,8192 --methods=chunk,peer --dtype=bfloat16
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import _bench
from jaxrec.ops import mlstm

_METHODS = flags.DEFINE_list(
  "methods", ["sequential", "parallel", "chunk", "pallas", "peer"], "Methods to time."
)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048"], "Sequence lengths T.")
_BATCH = flags.DEFINE_integer("batch", 2, "B.")
_HEADS = flags.DEFINE_integer("heads", 4, "H.")
_DIM = flags.DEFINE_integer("dim", 64, "Query/key and value width per head.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of the chunkwise forms.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per row (median reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_MAX_PALLAS_T = flags.DEFINE_integer(
  "max_interpreted_t", 4096, "Skip the Pallas form above this T on CPU (the interpreter is slow)."
)
_MAX_PARALLEL_T = flags.DEFINE_integer("max_parallel_t", 8192, "Skip the O(T²) form above this T.")


def _load_peer():
  """``mlstm_chunkwise_fw`` of ``mlstm_kernels``' native JAX chunkwise module, by file."""
  spec = importlib.util.find_spec("mlstm_kernels")
  if spec is None:
    raise app.UsageError("--methods=peer needs `pip install --no-deps mlstm-kernels einops`")
  path = pathlib.Path(spec.origin).parent / "jax" / "chunkwise" / "native" / "fw.py"
  module_spec = importlib.util.spec_from_file_location("mlstm_kernels_native_fw", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.mlstm_chunkwise_fw


def _functions(method: str):
  """``f(q, k, v, i, f) -> h`` for a method, and whether it takes ``[B, H, T, D]`` inputs."""
  if method == "peer":
    peer = _load_peer()

    def run(q, k, v, i, f):
      return peer(q, k, v, i, f, chunk_size=_CHUNK.value)[0]

    return run, True

  def run(q, k, v, i, f):
    return mlstm(q, k, v, i, f, method=method, chunk_size=_CHUNK.value)[0]

  return run, False


def _inputs(t: int):
  b, h, d = _BATCH.value, _HEADS.value, _DIM.value
  keys = jax.random.split(jax.random.key(0), 6)
  dtype = jnp.dtype(_DTYPE.value)
  q, k, v = (jax.random.normal(key, (b, t, h, d), dtype) for key in keys[:3])
  i_gate = jax.random.normal(keys[3], (b, t, h), dtype)
  f_gate = 3.0 + jax.random.normal(keys[4], (b, t, h), dtype)
  weights = jax.random.normal(keys[5], (b, t, h, d), jnp.float32)
  return (q, k, v, i_gate, f_gate), weights


def _heads_first(args, weights):
  q, k, v, i_gate, f_gate = args
  qkv = tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  return (*qkv, jnp.swapaxes(i_gate, 1, 2), jnp.swapaxes(f_gate, 1, 2)), jnp.swapaxes(weights, 1, 2)


def main(argv):
  del argv
  print(f"machine: {_bench.machine()}")
  rows = []
  for t in (int(x) for x in _SEQ_LENS.value):
    args, weights = _inputs(t)
    shape = f"B={_BATCH.value} T={t} H={_HEADS.value} K=V={_DIM.value} {_DTYPE.value}"
    for method in _METHODS.value:
      interpreted = method == "pallas" and jax.default_backend() == "cpu"
      if (interpreted and t > _MAX_PALLAS_T.value) or (
        method == "parallel" and t > _MAX_PARALLEL_T.value
      ):
        continue
      fn, heads_first = _functions(method)
      call_args, w = _heads_first(args, weights) if heads_first else (args, weights)
      forward = jax.jit(fn)
      grad = jax.jit(
        jax.grad(
          lambda *a, f=fn, w=w: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2, 3, 4)
        )
      )
      for mode, timed in (("fwd", forward), ("fwd+bwd", grad)):
        seconds = _bench.median_seconds(timed, *call_args, repeats=_REPEATS.value)
        rows.append(dict(method=method, shape=shape, mode=mode, seconds=seconds, t=t))
        print(f"  {method} {shape} {mode}: {seconds * 1e3:.2f} ms", flush=True)
  peer = {(r["shape"], r["mode"]): r["seconds"] for r in rows if r["method"] == "peer"}
  print(f"\nMedian of {_REPEATS.value} calls; chunk size {_CHUNK.value}.")
  print("| method | shape | mode | ms | tokens/s | × peer time |")
  print("|---|---|---|---:|---:|---:|")
  for r in rows:
    ref = peer.get((r["shape"], r["mode"]))
    ratio = "–" if ref is None else f"{r['seconds'] / ref:.2f}"
    tokens = _BATCH.value * r["t"] / r["seconds"]
    print(
      f"| {r['method']} | {r['shape']} | {r['mode']} | {r['seconds'] * 1e3:.2f} | "
      f"{tokens:,.0f} | {ratio} |"
    )


if __name__ == "__main__":
  app.run(main)
