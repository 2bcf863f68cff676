"""Diagonal linear recurrences ``h_t = a_t * h_{t-1} + b_t``.

This is the core every recurrent mixer in jaxrec reduces to. Axes (``jaxrec.typing``): ``B`` batch,
``T`` time, then any number of feature axes ``*F``, so ``a, b`` are ``[B, T, *F]`` and states are
``[B, *F]``.

Forms, selected with ``method``:

* ``"sequential"``: ``lax.scan`` over time, the reference.
* ``"associative"``: ``lax.associative_scan`` with the combine
  ``(a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2)``; O(log T) depth.
* ``"chunk"``: a sequential scan inside chunks of ``C`` steps, all chunks at once, then a scan over
  the ``T / C`` chunk carries and one fused correction ``h = h_local + cumprod(a) * carry``;
  ``T / C + C`` sequential steps instead of ``T``, for backends where a long serial loop is the
  bottleneck.
* ``"pallas"``: the kernel in ``pallas_kernels.linear_scan`` (interpret mode on CPU).

Gradients of the XLA forms go through one ``custom_vjp``: the adjoint ``g_t = dh_t + a_{t+1}
g_{t+1}`` is itself a linear recurrence run in the opposite direction with the same method, then
``da_t = g_t h_{t-1}``, ``db_t = g_t``. Only ``h`` is kept from the forward pass.
"""

import functools
import math
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks, _dispatch
from jaxrec.ops.segments import segment_starts
from jaxrec.typing import ScanInputs, ScanState, SegmentIds
from pallas_kernels import linear_scan as pallas_scan

ScanMethod = Literal["auto", "sequential", "associative", "chunk", "pallas"]
METHODS = get_args(ScanMethod)


def linear_scan(
  a: ScanInputs,
  b: ScanInputs,
  *,
  initial_state: ScanState | None = None,
  output_final_state: bool = False,
  reverse: bool = False,
  segment_ids: SegmentIds | None = None,
  method: ScanMethod = "auto",
  chunk_size: int | None = None,
) -> tuple[ScanInputs, ScanState | None]:
  """Runs ``h_t = a_t * h_{t-1} + b_t`` over axis 1.

  Args:
    a: decay, ``[B, T, ...]``, floating.
    b: input, same shape as ``a``.
    initial_state: ``h_{-1}``, ``[B, ...]``; zeros when ``None``. With ``reverse=True`` it is the
      state after the last step, ``h_T``.
    output_final_state: also return the final state.
    reverse: run from ``t = T-1`` down to 0, ``h_t = a_t * h_{t+1} + b_t``.
    segment_ids: integer ``[B, T]``; the recurrence restarts from zero wherever the id changes
      (packed documents, see ``segment_starts``). ``initial_state`` only feeds the first segment.
    method: ``"auto" | "sequential" | "associative" | "chunk" | "pallas"``.
    chunk_size: steps per chunk for ``"chunk"``; default about ``sqrt(T)``.

  Returns:
    ``(h, final_state)``: all states ``[B, T, ...]`` in the input dtype, and, when
    ``output_final_state``, the final state ``[B, ...]`` (at ``t = T-1``, or ``t = 0`` when
    ``reverse``) in fp32 (fp64 for fp64 inputs), else ``None``.
  """
  _validate(
    a=a,
    b=b,
    initial_state=initial_state,
    segment_ids=segment_ids,
    method=method,
    chunk_size=chunk_size,
  )
  cdt = _checks.compute_dtype(a, b)
  out_dtype = jnp.result_type(a, b)
  a = a.astype(cdt)
  b = b.astype(cdt)
  h0 = jnp.zeros((a.shape[0], *a.shape[2:]), cdt) if initial_state is None else initial_state
  h0 = h0.astype(cdt)
  if segment_ids is not None:
    reset = segment_starts(segment_ids, reverse=reverse)
    a = jnp.where(reset.reshape(reset.shape + (1,) * (a.ndim - 2)), 0.0, a)

  method = _resolve_method(method)
  if method == "pallas":
    h = pallas_scan.linear_scan(a, b, h0, reverse=reverse, interpret=_dispatch.pallas_interpret())
  else:
    chunk = chunk_size or _default_chunk(a.shape[1])
    h = _scan(a, b, h0, method=method, reverse=reverse, chunk=chunk)
  final_state = None
  if output_final_state:
    final_state = h[:, 0] if reverse else h[:, -1]
  return h.astype(out_dtype), final_state


def _validate(*, a, b, initial_state, segment_ids, method, chunk_size):
  _checks.check_choice("method", method, METHODS)
  _checks.check_float("a", a)
  _checks.check_float("b", b)
  if jnp.ndim(a) < 2:
    raise ValueError(f"a: expected rank >= 2 [B, T, ...], got shape {jnp.shape(a)}")
  _checks.check_shape("b", b, jnp.shape(a), "(the shape of a)")
  if initial_state is not None:
    _checks.check_float("initial_state", initial_state)
    want = (a.shape[0], *a.shape[2:])
    _checks.check_shape("initial_state", initial_state, want, "[B, ...]")
  _checks.check_segment_ids(segment_ids, a.shape[:2])
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _resolve_method(method: ScanMethod) -> ScanMethod:
  if method != "auto":
    return method
  # Measured in BENCHMARKS.md: on TPU the Pallas kernel (recurrentgemma's choice); on GPU the
  # Pallas time loop is bound by one global-memory load per step and XLA's associative scan is
  # faster; on CPU, where the recurrence is memory-bound, the plain lax.scan (fewest passes).
  return {"tpu": "pallas", "gpu": "associative"}.get(_dispatch.default_backend(), "sequential")


def _default_chunk(t: int) -> int:
  return max(8, 2 ** round(math.log2(max(math.sqrt(t), 1))))


# ----------------------------------------------------------------------------------------------
# Forward forms. Each takes fp32 [B, T, ...] arrays and h0 [B, ...] and returns h [B, T, ...].


def _sequential(a, b, h0, reverse, chunk):
  del chunk

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, h = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
  return jnp.moveaxis(h, 0, 1)


def _combine(x, y):
  """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
  return x[0] * y[0], y[0] * x[1] + y[1]


def _associative(a, b, h0, reverse, chunk):
  del chunk
  # Fold h0 into the first input step: b_0 <- a_0 h0 + b_0.
  first = 0 if not reverse else -1
  b = b.at[:, first].add(a[:, first] * h0)
  _, h = lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)
  return h


def _chunked(a, b, h0, reverse, chunk):
  if reverse:
    return jnp.flip(_chunked(jnp.flip(a, 1), jnp.flip(b, 1), h0, False, chunk), 1)
  batch, t = a.shape[:2]
  rest = a.shape[2:]
  c = min(chunk, t)
  n = -(-t // c)
  pad = n * c - t
  if pad:
    widths = ((0, 0), (0, pad)) + ((0, 0),) * len(rest)
    a = jnp.pad(a, widths, constant_values=1.0)
    b = jnp.pad(b, widths)
  # [C, B, n, ...]: time-within-chunk leads so one lax.scan covers every chunk at once.
  a_c = jnp.moveaxis(a.reshape(batch, n, c, *rest), 2, 0)
  b_c = jnp.moveaxis(b.reshape(batch, n, c, *rest), 2, 0)

  def local_step(carry, ab):
    h, p = carry
    h = ab[0] * h + ab[1]
    p = ab[0] * p
    return (h, p), (h, p)

  zeros = jnp.zeros(a_c.shape[1:], a.dtype)
  _, (h_loc, a_cum) = lax.scan(local_step, (zeros, jnp.ones_like(zeros)), (a_c, b_c))

  def carry_step(h, ab):
    return ab[0] * h + ab[1], h  # emit the state entering this chunk

  # Chunk totals: h_out = a_cum[-1] * h_in + h_loc[-1].
  totals = (jnp.moveaxis(a_cum[-1], 1, 0), jnp.moveaxis(h_loc[-1], 1, 0))
  _, h_in = lax.scan(carry_step, h0, totals)  # [n, B, ...]
  h = h_loc + a_cum * jnp.moveaxis(h_in, 0, 1)[None]
  h = jnp.moveaxis(h, 0, 2).reshape(batch, n * c, *rest)
  return h[:, :t]


_FORMS = {"sequential": _sequential, "associative": _associative, "chunk": _chunked}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(a, b, h0, method, reverse, chunk):
  return _FORMS[method](a, b, h0, reverse, chunk)


def _scan_fwd(a, b, h0, method, reverse, chunk):
  h = _FORMS[method](a, b, h0, reverse, chunk)
  return h, (a, h, h0)


def _scan_bwd(method, reverse, chunk, res, dh):
  a, h, h0 = res
  zero = jnp.zeros_like(a[:, :1])
  if not reverse:
    # g_t = dh_t + a_{t+1} g_{t+1}: a backward recurrence with a shifted one step left.
    a_adj = jnp.concatenate([a[:, 1:], zero], axis=1)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  else:
    a_adj = jnp.concatenate([zero, a[:, :-1]], axis=1)
    h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
  g = _FORMS[method](a_adj, dh, jnp.zeros_like(h0), not reverse, chunk)
  dh0 = (a[:, -1] * g[:, -1]) if reverse else (a[:, 0] * g[:, 0])
  return g * h_prev, g, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)
