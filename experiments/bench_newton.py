r"""Benchmark of Newton-parallel RNN solves (``jaxrec.ops.newton_rnn``) against sequential forms.

For each cell, batch B, length T and state width D it times, forward and forward+backward:

* ``newton``: ``newton_rnn`` (Jacobian structure detected, default tolerance, sequential
  fallback), with the Newton iterations it needed (max over the batch);
* ``lax.scan``: the compiled sequential scan of the same cell (``newton_rnn(method=
  "sequential")``), the baseline of the ratio column;
* ``python loop``: the jitted batched cell called T times from Python (the "sequential mode" of
  the ParaRNN paper's speed-ups), backward by a jitted per-step VJP; only up to
  ``--python_loop_max_t``.

  python -m experiments.bench_newton                      # small default grid, a few minutes
  python -m experiments.bench_newton --full               # T 256…65536, D 16…1024, B 1 and 16
  python -m experiments.bench_newton --cells=paralstm,gru --seq_lens=1024 --widths=64
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import _bench
from jaxrec.ops import newton_rnn
from jaxrec.ops import rnn_cells as rc

_CELLS = flags.DEFINE_list("cells", ["paragru"], "Cells: paragru, paralstm, gru, tanh_rnn.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "1024", "4096"], "T values.")
_WIDTHS = flags.DEFINE_list("widths", ["16", "128"], "State widths D.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes B.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_FULL = flags.DEFINE_bool(
  "full", False, "The full grid: T 256…65536 (×4), D 16…1024 (×4); overrides the lists above."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per row (median reported).")
_PYTHON_LOOP_MAX_T = flags.DEFINE_integer(
  "python_loop_max_t", 1024, "Skip the per-step Python loop above this T."
)
_DENSE_MAX_D = flags.DEFINE_integer(
  "dense_max_d", 128, "Skip Newton for dense-Jacobian cells (gru, tanh_rnn) above this D."
)
_INPUT_DIM = flags.DEFINE_integer("input_dim", 64, "Input width I of the cells.")

_CELL_FNS = {
  "paragru": (rc.paragru_cell, lambda key, i, d: rc.init_paragru(key, i, d, 4)),
  "paralstm": (rc.paralstm_cell, lambda key, i, d: rc.init_paralstm(key, i, d // 2, 4)),
  "gru": (rc.gru_cell, rc.init_gru),
  "tanh_rnn": (rc.tanh_rnn_cell, rc.init_tanh_rnn),
}
_DENSE = ("gru", "tanh_rnn")


def _time(fn) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _loss(h):
  return jnp.sum(jnp.sin(h))


def _jitted(cell, method, mode):
  solve = lambda p, x, h0: newton_rnn(cell, p, x, h0, method=method)[0]
  if mode == "fwd":
    return jax.jit(solve)
  return jax.jit(jax.grad(lambda p, x, h0: _loss(solve(p, x, h0)), argnums=(0, 1, 2)))


def _python_loop(cell, mode):
  """The cell called step by step from Python; the backward walks back with per-step VJPs."""
  step = jax.jit(jax.vmap(cell, in_axes=(None, 0, 0)))
  step_vjp = jax.jit(
    lambda p, h, x, g: jax.vjp(jax.vmap(cell, in_axes=(None, 0, 0)), p, h, x)[1](g)
  )
  dloss = jax.jit(jax.grad(_loss))

  def run(params, xs, h0):
    states, h = [h0], h0
    for t in range(xs.shape[1]):
      h = step(params, h, xs[:, t])
      states.append(h)
    if mode == "fwd":
      return h
    grads, g = None, jnp.zeros_like(h0)
    for t in range(xs.shape[1] - 1, -1, -1):
      g = g + dloss(states[t + 1])
      dp, g, _ = step_vjp(params, states[t], xs[:, t], g)
      grads = dp if grads is None else jax.tree.map(jnp.add, grads, dp)
    return grads, g

  return run


def _iterations(cell, params, xs, h0) -> int:
  run = jax.jit(lambda p, x, h: newton_rnn(cell, p, x, h)[1].iterations)
  return int(np.max(run(params, xs, h0)))


def _time_methods(cell, params, xs, h0, mode, newton_ok) -> dict[str, float]:
  """Median seconds per method for one shape and mode."""
  fns = {"lax.scan": _jitted(cell, "sequential", mode)}
  if newton_ok:
    fns["newton"] = _jitted(cell, "newton", mode)
  if xs.shape[1] <= _PYTHON_LOOP_MAX_T.value:
    fns["python loop"] = _python_loop(cell, mode)
  return {method: _time(lambda f=f: f(params, xs, h0)) for method, f in fns.items()}


def _grid():
  if _FULL.value:
    return [256, 1024, 4096, 16384, 65536], [16, 64, 256, 1024], [1, 16]
  as_ints = lambda values: [int(v) for v in values]
  return as_ints(_SEQ_LENS.value), as_ints(_WIDTHS.value), as_ints(_BATCHES.value)


def main(argv):
  del argv
  print(f"machine: {_bench.machine()}; fp32, repeats {_REPEATS.value} (median)")
  seq_lens, widths, batches = _grid()
  print("\n| cell | method | mode | B | T | D | ms | tokens/s | vs lax.scan | iterations |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
  rng = np.random.default_rng(0)
  for name in _CELLS.value:
    cell, init = _CELL_FNS[name]
    for width in widths:
      params = init(jax.random.key(0), _INPUT_DIM.value, width)
      for batch in batches:
        for t in seq_lens:
          xs = jnp.asarray(rng.standard_normal((batch, t, _INPUT_DIM.value)), jnp.float32)
          h0 = jnp.zeros((batch, width), jnp.float32)
          newton_ok = name not in _DENSE or width <= _DENSE_MAX_D.value
          iters = _iterations(cell, params, xs, h0) if newton_ok else None
          for mode in _MODES.value:
            rows = _time_methods(cell, params, xs, h0, mode, newton_ok)
            for method, seconds in rows.items():
              ratio = rows["lax.scan"] / seconds
              it = str(iters) if method == "newton" else "–"
              print(
                f"| {name} | {method} | {mode} | {batch} | {t} | {width} | {seconds * 1e3:.2f} "
                f"| {batch * t / seconds:,.0f} | {ratio:.3g}× | {it} |",
                flush=True,
              )


if __name__ == "__main__":
  app.run(main)
