r"""Benchmark of the linear-recurrence core: every method of linear_scan and gated_linear_attention.

Prints one table per op: method, shape, mode (fwd / fwd+bwd), median time, tokens/s and the
speed-up over the sequential form measured in the same run, plus a causal softmax attention row
(`jax.nn.dot_product_attention`) of the same shapes for scale.

  python -m experiments.bench_scan                       # the full default grid
  python -m experiments.bench_scan --seq_lens=4096 --ops=gla --repeats=5
"""

import typing

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import _bench
from jaxrec import ops

_OPS = flags.DEFINE_list("ops", ["scan", "gla"], "Which ops to time: scan, gla.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "1024", "2048", "4096", "8192", "16384"], "T.")
_BATCH = flags.DEFINE_integer("batch", 2, "B.")
_SCAN_WIDTHS = flags.DEFINE_list(
  "scan_widths", ["256", "1024"], "Feature widths D for linear_scan."
)
_GLA_SHAPES = flags.DEFINE_list("gla_shapes", ["4x64"], "HxK (K = V) head shapes for GLA.")
_METHODS = flags.DEFINE_list(
  "methods",
  ["sequential", "associative", "chunk", "pallas"],
  "Methods (those an op lacks are skipped; gla also has three_pass).",
)
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per row (median reported).")
_MAX_T_PALLAS_INTERPRET = flags.DEFINE_integer(
  "max_t_pallas_interpret",
  4096,
  "On CPU the Pallas kernels run interpreted; skip them above this T.",
)

_SCAN_METHODS = typing.get_args(ops.ScanMethod)
_GLA_METHODS = typing.get_args(ops.GLAMethod)


def _with_grad(f, argnums):
  """fwd+bwd: value and gradients w.r.t. every input of sum(f(...))."""
  return jax.jit(jax.value_and_grad(lambda *xs: jnp.sum(f(*xs)), argnums=argnums))


def _scan_cases(t, width):
  ka, kb = jax.random.split(jax.random.key(0))
  shape = (_BATCH.value, t, width)
  a = jax.random.uniform(ka, shape, minval=0.9, maxval=1.0)
  b = jax.random.normal(kb, shape)
  for method in _METHODS.value:
    if method in _SCAN_METHODS:
      yield method, (lambda a, b, m=method: ops.linear_scan(a, b, method=m)[0]), (a, b)


def _gla_cases(t, heads, dim):
  kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
  shape = (_BATCH.value, t, heads, dim)
  q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
  g = jax.nn.log_sigmoid(jax.random.normal(kg, shape) + 3.0)
  for method in _METHODS.value:
    if method in _GLA_METHODS:
      yield (
        method,
        (lambda q, k, v, g, m=method: ops.gated_linear_attention(q, k, v, g, method=m)[0]),
        (q, k, v, g),
      )
  attention = lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  yield "softmax attention", attention, (q, k, v, g)


def _run_table(title, shapes, make_cases):
  print(f"\n## {title}\n")
  print("| method | shape | mode | ms | tokens/s | speed-up vs sequential |")
  print("|---|---|---|---:|---:|---:|")
  for shape_name, t, case_args in shapes:
    for mode in _MODES.value:
      baseline = None
      for method, fn, args in make_cases(t, *case_args):
        if (
          method == "pallas"
          and jax.default_backend() == "cpu"
          and t > _MAX_T_PALLAS_INTERPRET.value
        ):
          continue
        argnums = tuple(range(len(args)))
        jitted = jax.jit(fn) if mode == "fwd" else _with_grad(fn, argnums)
        seconds = _bench.median_seconds(jitted, *args, repeats=_REPEATS.value)
        if method == "sequential":
          baseline = seconds
        ratio = f"{baseline / seconds:.3g}×" if baseline else "–"
        tokens = _BATCH.value * t / seconds
        print(
          f"| {method} | {shape_name} | {mode} | {seconds * 1e3:.2f} | {tokens:,.0f} | {ratio} |",
          flush=True,
        )


def main(argv):
  del argv
  print(f"machine: {_bench.machine()}; repeats {_REPEATS.value} (median)")
  seq_lens = [int(t) for t in _SEQ_LENS.value]
  if "scan" in _OPS.value:
    shapes = [
      (f"B={_BATCH.value} T={t} D={d}", t, (int(d),)) for t in seq_lens for d in _SCAN_WIDTHS.value
    ]
    _run_table("linear_scan  h_t = a_t h_{t-1} + b_t", shapes, _scan_cases)
  if "gla" in _OPS.value:
    shapes = []
    for t in seq_lens:
      for hk in _GLA_SHAPES.value:
        h, k = (int(x) for x in hk.split("x"))
        shapes.append((f"B={_BATCH.value} T={t} H={h} K=V={k}", t, (h, k)))
    _run_table("gated_linear_attention (per-channel decay)", shapes, _gla_cases)


if __name__ == "__main__":
  app.run(main)
