r"""jaxrec's gated linear attention against flash-linear-attention's ``chunk_gla``, side by side.

One run on one GPU: the same bf16 inputs (``q, k, v`` and the log-decay ``g``) go to jaxrec's
forms (``gated_linear_attention(method=...)``) and to FLA's Triton ``chunk_gla``; the script times
forward and forward+backward (a fixed output cotangent; gradients w.r.t. ``q, k, v, g``), checks
that outputs and gradients agree with FLA's, and prints one table with the ratio to FLA per row,
plus the machine. FLA's Triton autotuning takes minutes on a fresh device for each new shape
(forward and backward each), so every shape is warmed once, untimed (the warm-up time is
printed), and ``--deadline_s`` skips what would run past the device time.

FLA is a pure-Python package over PyTorch and Triton, which the accelerator image has; it comes
to the device as a wheel, installed from a local folder (nothing from the network)::

  # here, once: fetch the wheel into .whl/ (ignored by git, carried to the device)
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: fla-core==0.6.0 -d .whl
  # on the device (carry .whl):
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && PYTHONPATH=/tmp/site:$PWD python3 -m experiments.bench_peers_gpu

Without torch, triton or fla (or without a GPU) the FLA rows are skipped and the jaxrec rows are
checked against jaxrec's sequential form instead; ``--smoke`` runs small shapes, so the jaxrec
part runs on a CPU (``python -m experiments.bench_peers_gpu --smoke``).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch

import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxrec import ops

_SHAPES = flags.DEFINE_list(
  "shapes", ["2x16384x4x64", "8x4096x16x128"], "BxTxHxK shapes (K = V), issue 13's two."
)
_METHODS = flags.DEFINE_list(
  "methods",
  ["chunk", "pallas", "three_pass"],
  "jaxrec forms to time: gated_linear_attention's methods (three_pass is the FLA-structured one).",
)
_CHUNK_SIZE = flags.DEFINE_integer(
  "chunk_size", 64, "gated_linear_attention's chunk_size, for every method (FLA's is 64)."
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype (FLA: bf16, as in the issue)."
)
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs per row (median reported).")
_DEADLINE = flags.DEFINE_float(
  "deadline_s", 420.0, "Skip the rows that would start after this many seconds of the run."
)
_TOLERANCE = flags.DEFINE_float(
  "tolerance", 2e-2, "Agreement: max |x - ref| <= tolerance * max |ref| per output and gradient."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Small shapes and 2 repeats (runs on CPU).")

_SMOKE_SHAPES = ["1x256x2x32"]
_NAMES = ("o", "dq", "dk", "dv", "dg")


def _load_fla():
  """``(torch, chunk_gla)``, or ``None`` with the reason when FLA cannot run here."""
  try:
    import torch
    from fla.ops.gla import chunk_gla
  except ImportError as e:
    return None, f"FLA skipped: {e}"
  if not torch.cuda.is_available():
    return None, "FLA skipped: torch sees no GPU"
  return (torch, chunk_gla), None


def _inputs(b, t, h, d):
  """``q, k, v, g`` (``g = log σ(x + 3)``, decays near 0.95) and an output cotangent."""
  rng = np.random.default_rng(0)
  q, k, v, do = (rng.standard_normal((b, t, h, d), np.float32) for _ in range(4))
  g = np.log(1.0 / (1.0 + np.exp(-(rng.standard_normal((b, t, h, d)) + 3.0))))
  return tuple(jnp.asarray(x, _DTYPE.value) for x in (q, k, v, g, do))


def _jaxrec_fns(method):
  def forward(q, k, v, g):
    return ops.gated_linear_attention(q, k, v, g, method=method, chunk_size=_CHUNK_SIZE.value)[0]

  def forward_backward(q, k, v, g, do):
    o, vjp = jax.vjp(forward, q, k, v, g)
    return (o, *vjp(do))

  return jax.jit(forward), jax.jit(forward_backward), jax.block_until_ready


def _fla_fns(torch, chunk_gla):
  def forward(q, k, v, g):
    return chunk_gla(q, k, v, g)[0]

  def forward_backward(q, k, v, g, do):
    xs = [x.detach().requires_grad_() for x in (q, k, v, g)]
    o = forward(*xs)
    o.backward(do)
    return (o, *(x.grad for x in xs))

  def sync(_):
    torch.cuda.synchronize()

  return forward, forward_backward, sync


def _median_ms(fn, sync, args, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _rel_errors(got, ref):
  """Per output/gradient: ``max |got - ref| / max |ref|`` in fp32."""
  out = []
  for a, r in zip(got, ref):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    out.append(float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), 1e-30)))
  return out


def _run(argv_shapes, repeats):
  fla, why = _load_fla()
  start = time.monotonic()
  machine = (
    f"{platform.node()} {platform.machine()}, jax {jax.__version__} {jax.devices()}, "
    f"python {sys.version.split()[0]}"
  )
  if fla:
    torch = fla[0]
    machine += f", torch {torch.__version__} on {torch.cuda.get_device_name()}"
  print(f"machine: {machine}; {_DTYPE.value} inputs, median of {repeats}")
  if why:
    print(why, "(jaxrec rows are checked against jaxrec's sequential form instead)")
  rows, failures = [], []
  for spec in argv_shapes:
    b, t, h, d = (int(x) for x in spec.split("x"))
    shape = f"B={b} T={t} H={h} K=V={d}"
    q, k, v, g, do = _inputs(b, t, h, d)
    impls = {m: _jaxrec_fns(m) for m in _METHODS.value}
    ref_name = "fla chunk_gla"
    if fla:
      torch, chunk_gla = fla
      tdtype = getattr(torch, _DTYPE.value)
      targs = [torch.from_numpy(np.asarray(x, np.float32)).cuda().to(tdtype) for x in (q, k, v, g)]
      tdo = torch.from_numpy(np.asarray(do, np.float32)).cuda().to(tdtype)
      impls[ref_name] = _fla_fns(torch, chunk_gla)
    else:
      ref_name = "sequential"
      impls.setdefault(ref_name, _jaxrec_fns(ref_name))
    results = {}
    for name, (fwd, fwd_bwd, sync) in impls.items():
      if time.monotonic() - start > _DEADLINE.value:
        print(f"deadline: skipped {name} at {shape}")
        continue
      is_fla = fla is not None and name == ref_name
      args = (*targs, tdo) if is_fla else (q, k, v, g, do)
      warm = time.perf_counter()
      out = fwd_bwd(*args)
      sync(out)
      sync(fwd(*args[:4]))
      print(
        f"{name} {shape}: first calls (compile / autotune) {time.perf_counter() - warm:.1f} s",
        flush=True,
      )
      results[name] = [x.float().cpu().numpy() if is_fla else x for x in out]
      for mode in _MODES.value:
        fn, fn_args = (fwd, args[:4]) if mode == "fwd" else (fwd_bwd, args)
        rows.append((name, shape, mode, _median_ms(fn, sync, fn_args, repeats), b * t))
        print(f"{name} {shape} {mode}: {rows[-1][3]:.3f} ms", flush=True)  # kept if cut short
    if ref_name not in results:
      continue
    for name, got in results.items():
      if name == ref_name:
        continue
      errors = _rel_errors(got, results[ref_name])
      ok = all(e <= _TOLERANCE.value for e in errors)
      failures += [] if ok else [(name, shape)]
      detail = ", ".join(f"{n} {e:.1e}" for n, e in zip(_NAMES, errors))
      print(f"agreement {name} vs {ref_name} at {shape}: {'ok' if ok else 'DIFFERS'} ({detail})")
  _print_table(rows, ref_name)
  return failures


def _print_table(rows, ref_name):
  ref = {(shape, mode): ms for name, shape, mode, ms, _ in rows if name == ref_name}
  print(f"\n| impl | shape | mode | ms | tokens/s | time / {ref_name} |")
  print("|---|---|---|---:|---:|---:|")
  for name, shape, mode, ms, tokens in rows:
    base = ref.get((shape, mode))
    ratio = f"{ms / base:.3g}×" if base else "–"
    print(f"| {name} | {shape} | {mode} | {ms:.2f} | {tokens / ms * 1e3:,.0f} | {ratio} |")


def main(argv):
  del argv
  shapes = _SMOKE_SHAPES if _SMOKE.value else _SHAPES.value
  failures = _run(shapes, 2 if _SMOKE.value else _REPEATS.value)
  if failures:
    print(f"outputs differ beyond --tolerance={_TOLERANCE.value}: {failures}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
