"""The mLSTM cell (Beck et al. 2024, xLSTM §2.3; xLSTM 7B, Beck et al. 2025): a matrix memory
with an exponential input gate, a normalizer and a max stabilizer.

Per batch row and head, with a ``[K, V]`` memory ``C``, a ``[K]`` normalizer ``n`` and a scalar
stabilizer ``m``, for pre-activations ``ĩ_t`` (input gate) and ``f̃_t`` (forget gate) and the query
scale ``s = K^{-1/2}``, as in ``mlstm_kernels``' native step::

  log f_t = logσ(f̃_t)
  m_t  = max(log f_t + m_{t-1}, ĩ_t)
  f'_t = exp(log f_t + m_{t-1} - m_t)        i'_t = exp(ĩ_t - m_t)
  C_t  = f'_t C_{t-1} + i'_t k_t v_tᵀ        n_t = f'_t n_{t-1} + i'_t k_t
  h_t  = s q_tᵀ C_t / (max(|s q_tᵀ n_t|, exp(-m_t)) + ε)

Axes (``jaxrec.typing``): ``B`` batch, ``T`` time, ``H`` heads, ``K`` query/key width, ``V`` value
width. The state ``(C, n, m)`` is ``MLSTMState``, fp32; a zero state (``m = 0`` too) is the
default, as in ``mlstm_kernels``.

Why it is stable. The true memory is ``C̃_t = e^{m_t} C_t``, a sum of ``k_j v_jᵀ`` weighted by
``exp(ĩ_j + Σ_{j<s≤t} log f_s)``, which overflows for an exponential input gate. ``m_t`` is the
running maximum of those log-weights (and of ``Σ_{s≤t} log f_s + m_0`` for the initial state), so
every weight actually computed is ``exp(log-weight - m_t) <= 1``. In unstabilized terms
``h_t = s qᵀC̃_t / (max(|s qᵀñ_t|, 1) + ε e^{m_t})``: ``m`` changes the value only through the ``ε``
term. Every form therefore computes the same ``m_t`` (the chunked forms combine it from per-chunk
maxima) and all agree to rounding.

Gradients. ``m`` is a stabilizer: every form differentiates through it as a constant (its
contributions are of relative size ``ε e^{m} / max(|s qᵀñ|, 1)``, the size of the ``ε`` term),
except the given initial ``m_0``, which scales the initial memory and keeps its gradient.

Packing. Where ``segment_ids`` changes, the forget gate is forced shut (``log f = -∞``, so
``f' = 0`` and ``m_t = ĩ_t``) as xLSTM 7B's ``reset_at_document_boundaries`` does (it sets the
pre-activation to -25; here the reset is exact, so packed documents do not see each other).

Forms, selected with ``method``:

* ``"sequential"``: ``lax.scan`` of the step above; the reference.
* ``"parallel"``: the quadratic form over the whole sequence: the ``[T, T]`` matrix of
  log-weights ``Σ_{j<s≤t} log f_s + ĩ_j`` (plus a column for the initial state), stabilized by its
  row maxima. O(T²) memory: for short sequences.
* ``"chunk"``: chunkwise (the native chunkwise form of ``mlstm_kernels``): the parallel form inside
  chunks of ``C`` steps, and a scan over the ``T / C`` chunk states in between, with the
  stabilizer carried from chunk to chunk (``_chunked``).
* ``"pallas"``: the chunkwise kernels of ``pallas_kernels.mlstm`` (interpret mode on CPU).
"""

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks, _dispatch
from jaxrec.ops.segments import segment_starts
from jaxrec.typing import (
  HeadGates,
  HeadOutputs,
  Keys,
  MatrixState,
  NormalizerState,
  Queries,
  SegmentIds,
  StabilizerState,
  StepHeadGates,
  StepKeys,
  StepQueries,
  StepValues,
  Values,
)
from pallas_kernels import mlstm as pallas_mlstm

MLSTMMethod = Literal["auto", "sequential", "parallel", "chunk", "pallas"]
METHODS = get_args(MLSTMMethod)


class MLSTMState(NamedTuple):
  """The mLSTM state, fp32: O(1) in the sequence length.

  Attributes:
    c: the memory ``C``, ``[B, H, K, V]``.
    n: the normalizer, ``[B, H, K]``.
    m: the stabilizer (log-scale of ``c`` and ``n``), ``[B, H]``.
  """

  c: MatrixState
  n: NormalizerState
  m: StabilizerState


def mlstm(
  q: Queries,
  k: Keys,
  v: Values,
  i_gate: HeadGates,
  f_gate: HeadGates,
  *,
  initial_state: MLSTMState | None = None,
  output_final_state: bool = False,
  segment_ids: SegmentIds | None = None,
  eps: float = 1e-6,
  chunk_size: int = 64,
  method: MLSTMMethod = "auto",
) -> tuple[HeadOutputs, MLSTMState | None]:
  """Runs the mLSTM over axis 1.

  Args:
    q: queries, ``[B, T, H, K]``; scaled by ``K^{-1/2}`` inside.
    k: keys, ``[B, T, H, K]``.
    v: values, ``[B, T, H, V]``.
    i_gate: input gate pre-activations ``ĩ``, ``[B, T, H]`` (the gate is ``exp(ĩ)``).
    f_gate: forget gate pre-activations ``f̃``, ``[B, T, H]`` (the gate is ``σ(f̃)``).
    initial_state: ``MLSTMState`` before the first step (``c [B, H, K, V]``, ``n [B, H, K]``,
      ``m [B, H]``); zeros when ``None``.
    output_final_state: also return the state after the last step.
    segment_ids: integer ``[B, T]``; the forget gate is shut wherever the id changes (packed
      documents, see ``segment_starts``). ``initial_state`` only feeds the first segment.
    eps: ``ε`` added to the denominator of ``h``.
    chunk_size: steps per chunk for ``"chunk"`` and ``"pallas"``, a power of two (``"chunk"``
      uses a shorter one when ``T`` is shorter).
    method: ``"auto" | "sequential" | "parallel" | "chunk" | "pallas"``; ``"auto"`` is
      ``"chunk"`` (BENCHMARKS.md: on CPU it trains about 8x faster than the sequential scan, on
      par with ``mlstm_kernels``' JAX chunkwise form; the kernel has not been compiled on an
      accelerator yet).

  Returns:
    ``(h, final_state)``: ``h`` ``[B, T, H, V]`` in the dtype of ``q``, and, when
    ``output_final_state``, the ``MLSTMState`` after the last step in fp32 (fp64 for fp64
    inputs), else ``None``.
  """
  _validate(
    q=q,
    k=k,
    v=v,
    i_gate=i_gate,
    f_gate=f_gate,
    initial_state=initial_state,
    segment_ids=segment_ids,
    eps=eps,
    chunk_size=chunk_size,
    method=method,
  )
  batch, _, heads, key_dim = q.shape
  cdt = _checks.compute_dtype(q, k, v, i_gate, f_gate)
  if initial_state is None:
    state = MLSTMState(
      jnp.zeros((batch, heads, key_dim, v.shape[-1]), cdt),
      jnp.zeros((batch, heads, key_dim), cdt),
      jnp.zeros((batch, heads), cdt),
    )
  else:
    state = MLSTMState(*(x.astype(cdt) for x in initial_state))
  reset = None if segment_ids is None else segment_starts(segment_ids)
  out_dtype = q.dtype
  q = q.astype(cdt) * key_dim**-0.5
  k, v, i_gate = (x.astype(cdt) for x in (k, v, i_gate))
  log_f = jax.nn.log_sigmoid(f_gate.astype(cdt))
  forms = dict(q=q, k=k, v=v, i_gate=i_gate, log_f=log_f, state=state, reset=reset, eps=eps)
  method = "chunk" if method == "auto" else method
  if method == "sequential":
    h, final = _sequential(**forms)
  elif method == "parallel":
    h, final = _parallel(**forms)
  elif method == "pallas":
    h, final = _pallas(**forms, chunk_size=chunk_size)
  else:
    h, final = _chunked(**forms, chunk_size=chunk_size)
  return h.astype(out_dtype), final if output_final_state else None


def mlstm_step(
  q: StepQueries,
  k: StepKeys,
  v: StepValues,
  i_gate: StepHeadGates,
  f_gate: StepHeadGates,
  state: MLSTMState,
  *,
  eps: float = 1e-6,
) -> tuple[StepValues, MLSTMState]:
  """One decoding step of ``mlstm``.

  Args:
    q: query, ``[B, H, K]``.
    k: key, ``[B, H, K]``.
    v: value, ``[B, H, V]``.
    i_gate: input gate pre-activation, ``[B, H]``.
    f_gate: forget gate pre-activation, ``[B, H]``.
    state: the ``MLSTMState`` before this step.
    eps: ``ε`` of the denominator.

  Returns:
    ``(h, new_state)``: ``h`` ``[B, H, V]`` in the dtype of ``q``, ``new_state`` in fp32 (fp64
    for fp64 inputs).
  """
  _validate_step(q, k, v, i_gate, f_gate, state)
  cdt = _checks.compute_dtype(q, k, v, i_gate, f_gate)
  scaled = q.astype(cdt) * q.shape[-1] ** -0.5
  state = MLSTMState(*(x.astype(cdt) for x in state))
  log_f = jax.nn.log_sigmoid(f_gate.astype(cdt))
  h, new_state = _step(
    state, scaled, k.astype(cdt), v.astype(cdt), i_gate.astype(cdt), log_f, None, eps
  )
  return h.astype(q.dtype), new_state


# ----------------------------------------------------------------------------------------------
# Validation.


def _validate(*, q, k, v, i_gate, f_gate, initial_state, segment_ids, eps, chunk_size, method):
  _checks.check_choice("method", method, METHODS)
  for name, x in (("q", q), ("k", k), ("v", v), ("i_gate", i_gate), ("f_gate", f_gate)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 4, "[B, T, H, K]")
  batch, t, heads, key_dim = q.shape
  _checks.check_shape("k", k, q.shape, "[B, T, H, K] (the shape of q)")
  _checks.check_rank("v", v, 4, "[B, T, H, V]")
  _checks.check_shape("v", v, (batch, t, heads, v.shape[-1]), "[B, T, H, V] (B, T, H of q)")
  for name, x in (("i_gate", i_gate), ("f_gate", f_gate)):
    _checks.check_shape(name, x, (batch, t, heads), "[B, T, H]")
  if initial_state is not None:
    _check_state("initial_state", initial_state, (batch, heads, key_dim, v.shape[-1]))
  _checks.check_segment_ids(segment_ids, (batch, t))
  if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
    raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
  _checks.check_power_of_two("chunk_size", chunk_size)


def _check_state(name, state, c_shape):
  if not isinstance(state, tuple) or len(state) != 3:
    raise ValueError(f"{name}: expected an MLSTMState (c, n, m), got {type(state).__name__}")
  batch, heads, key_dim, _ = c_shape
  for field, x, shape, axes in (
    ("c", state[0], c_shape, "[B, H, K, V]"),
    ("n", state[1], (batch, heads, key_dim), "[B, H, K]"),
    ("m", state[2], (batch, heads), "[B, H]"),
  ):
    _checks.check_float(f"{name}.{field}", x)
    _checks.check_shape(f"{name}.{field}", x, shape, axes)


def _validate_step(q, k, v, i_gate, f_gate, state):
  for name, x in (("q", q), ("k", k), ("v", v), ("i_gate", i_gate), ("f_gate", f_gate)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 3, "[B, H, K]")
  batch, heads, key_dim = q.shape
  _checks.check_shape("k", k, q.shape, "[B, H, K] (the shape of q)")
  _checks.check_rank("v", v, 3, "[B, H, V]")
  _checks.check_shape("v", v, (batch, heads, v.shape[-1]), "[B, H, V] (B, H of q)")
  for name, x in (("i_gate", i_gate), ("f_gate", f_gate)):
    _checks.check_shape(name, x, (batch, heads), "[B, H]")
  _check_state("state", state, (batch, heads, key_dim, v.shape[-1]))


def _pallas(*, q, k, v, i_gate, log_f, state, reset, eps, chunk_size):
  t = q.shape[1]
  pad = -t % chunk_size
  if pad:
    # Padding steps take no input (ĩ = -∞), keep the state (log f = 0) and start no segment.
    def padded(x, fill=0.0):
      return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)

    q, k, v, log_f = (padded(x) for x in (q, k, v, log_f))
    i_gate = padded(i_gate, -jnp.inf)
    if reset is not None:
      reset = padded(reset, False)
  h, final = pallas_mlstm.chunk_mlstm(
    q,
    k,
    v,
    i_gate,
    log_f,
    initial_state=tuple(state),
    segment_starts=reset,
    eps=eps,
    chunk_size=chunk_size,
    interpret=_dispatch.pallas_interpret(),
  )
  return h[:, :t], MLSTMState(*final)


# ----------------------------------------------------------------------------------------------
# The recurrence, one step at a time.


def _exp_where(mask, exponent):
  """``exp(exponent)`` where ``mask``, else 0; masked entries never reach ``exp``, so neither
  the value nor the gradient can become ``inf · 0``."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def _readout(num, den, m, eps):
  """``h = num / (max(|den|, e^{-m}) + ε)``; ``num [..., V]``, ``den`` and ``m`` ``[...]``."""
  return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]


def _step(state, q, k, v, i_gate, log_f, reset, eps):
  """One step on ``[B, H, ...]`` slices; ``q`` is already scaled. ``reset`` (``[B]`` bool or
  ``None``) shuts the forget gate."""
  c, n, m = state
  carried = log_f + m
  live = None if reset is None else ~reset[:, None]
  if live is not None:
    carried = jnp.where(live, carried, -jnp.inf)
  m_new = lax.stop_gradient(jnp.maximum(carried, i_gate))
  decay = jnp.exp(carried - m_new) if live is None else _exp_where(live, carried - m_new)
  gain = jnp.exp(i_gate - m_new)
  c = decay[..., None, None] * c + (gain[..., None] * k)[..., :, None] * v[..., None, :]
  n = decay[..., None] * n + gain[..., None] * k
  num = jnp.einsum("bhk,bhkv->bhv", q, c)
  den = jnp.einsum("bhk,bhk->bh", q, n)
  return _readout(num, den, m_new, eps), MLSTMState(c, n, m_new)


def _sequential(*, q, k, v, i_gate, log_f, state, reset, eps):
  def step(state, x):
    *inputs, reset_t = x
    state = MLSTMState(*state)
    h, state = _step(state, *inputs, reset_t, eps)
    return tuple(state), h

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, i_gate, log_f))
  xs += (None if reset is None else reset.T,)
  final, h = lax.scan(step, tuple(state), xs)
  return jnp.moveaxis(h, 0, 1), MLSTMState(*final)


# ----------------------------------------------------------------------------------------------
# The quadratic form.


def _parallel(*, q, k, v, i_gate, log_f, state, reset, eps):
  """Every output at once from the ``[T, T]`` log-weights ``b_t - b_j + ĩ_j`` (``b`` the running
  sum of ``log f``) and the initial-state column ``b_t + m_0``, stabilized by their row maximum
  ``m_t``, the same value the recurrence computes."""
  t = q.shape[1]
  if reset is not None:
    # The reset step's own gate multiplies a state that the masks below drop.
    log_f = jnp.where(reset[..., None], 0.0, log_f)
  log_f = jnp.moveaxis(log_f, 1, 2)  # [B, H, T]
  b = _cumsum(log_f)
  i_gate = jnp.moveaxis(i_gate, 1, 2)
  pair = jnp.tril(jnp.ones((t, t), bool))
  if reset is None:
    live_in = jnp.ones((1, 1, t), bool)
  else:
    run = jnp.cumsum(reset.astype(jnp.int32), axis=1)[:, None]  # [B, 1, T]
    pair = pair & (run[..., :, None] == run[..., None, :])
    live_in = run == 0
  log_w = jnp.where(pair, _pair_sums(log_f) + i_gate[..., None, :], -jnp.inf)
  log_in = jnp.where(live_in, b + state.m[..., None], -jnp.inf)
  m = lax.stop_gradient(jnp.maximum(jnp.max(log_w, axis=-1), log_in))  # [B, H, T]
  w = _exp_where(pair, log_w - m[..., None])
  w_in = _exp_where(live_in, log_in - m)
  qh, kh, vh = (jnp.moveaxis(x, 1, 2) for x in (q, k, v))
  scores = jnp.einsum("bhik,bhjk->bhij", qh, kh) * w
  num = w_in[..., None] * jnp.einsum("bhik,bhkv->bhiv", qh, state.c)
  num = num + jnp.einsum("bhij,bhjv->bhiv", scores, vh)
  den = w_in * jnp.einsum("bhik,bhk->bhi", qh, state.n) + jnp.sum(scores, axis=-1)
  h = jnp.moveaxis(_readout(num, den, m, eps), 2, 1)
  # The last row of weights is the final state.
  w_last = w[..., -1, :, None] * kh
  c = w_in[..., -1, None, None] * state.c + jnp.einsum("bhjk,bhjv->bhkv", w_last, vh)
  n = w_in[..., -1, None] * state.n + jnp.sum(w_last, axis=2)
  return h, MLSTMState(c, n, m[..., -1])


# ----------------------------------------------------------------------------------------------
# The chunkwise form.


def _chunked(*, q, k, v, i_gate, log_f, state, reset, eps, chunk_size):
  """Chunkwise form. Inside a chunk, with ``b`` the running sum of ``log f`` from its start and
  ``(C, n, m)`` the state entering it, step ``t`` sees the entering state with log-weight
  ``b_t + m`` and step ``j <= t`` with ``b_t - b_j + ĩ_j``; ``m_t`` is the maximum of those, and::

    h_t = (e^{b_t + m - m_t} q_tᵀC + Σ_j e^{b_t - b_j + ĩ_j - m_t} (q_t·k_j) v_j)
          / (max(|·|, e^{-m_t}) + ε)

  with the same weights on ``n`` and ``1`` in the denominator. The state leaving the chunk has
  stabilizer ``m' = max(b_last + m, max_j (b_last - b_j + ĩ_j))`` (a scan over chunks of scalars)
  and ``C' = e^{b_last + m - m'} C + Σ_j e^{b_last - b_j + ĩ_j - m'} k_j v_jᵀ``, a linear scan over
  chunks once the ``m'`` are known. Every exponent is a log-weight minus a maximum that includes
  it, so ``<= 0``. Resets (``segment_ids``) are masks on those terms.
  """
  batch, t, heads, _ = q.shape
  # Short inputs use a shorter chunk, still a power of two.
  c = min(chunk_size, 1 << max(t - 1, 0).bit_length())
  n = -(-t // c)
  pad = n * c - t
  if reset is not None:
    log_f = jnp.where(reset[..., None], 0.0, log_f)

  def blocks(x, fill=0.0):  # [B, T, H, ...] -> [B, H, n, C, ...]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(batch, n, c, heads, *x.shape[3:]), 3, 1)

  # Padding steps take no input (ĩ = -∞) and keep the state (log f = 0).
  q, k, v, log_f = (blocks(x) for x in (q, k, v, log_f))
  i_gate = blocks(i_gate, -jnp.inf)
  b = _cumsum(log_f)  # [B, H, n, C]
  causal = jnp.tril(jnp.ones((c, c), bool))
  if reset is None:
    pair, live_in, live_out = causal, jnp.ones((c,), bool), jnp.ones((c,), bool)
  else:
    # `run` counts the resets up to each step of its chunk: two steps share a segment iff their
    # counts are equal, and the entering state is live while the count is 0.
    reset = jnp.pad(reset, ((0, 0), (0, pad))).reshape(batch, 1, n, c)
    run = jnp.cumsum(reset.astype(jnp.int32), axis=-1)
    pair = causal & (run[..., :, None] == run[..., None, :])
    live_in, live_out = run == 0, run == run[..., -1:]
  b_last = b[..., -1]
  through = jnp.broadcast_to(live_in[..., -1], b_last.shape)  # the entering state survives

  # Stabilizers of the chunk states: m'_k = max(b_last + m_k, max_j a_j), a scan of scalars.
  sums = _pair_sums(log_f)  # [B, H, n, C, C]
  a = jnp.where(live_out, sums[..., -1, :] + i_gate, -jnp.inf)
  g = jnp.where(through, b_last, -jnp.inf)
  m_out = lax.stop_gradient(_max_plus_scan(g, jnp.max(a, axis=-1), state.m))  # [B, H, n]
  # The entering stabilizer: the given m_0 (which keeps its gradient), then the chunk states'.
  m_in = jnp.concatenate([state.m[..., None], m_out[..., :-1]], axis=-1)

  # Chunk states: S_{k+1} = α_k S_k + U_k (the only sequential part).
  k_out = _exp_where(live_out, a - m_out[..., None])[..., None] * k
  u_c = jnp.einsum("bhnck,bhncv->bhnkv", k_out, v)
  u_n = jnp.sum(k_out, axis=3)
  alpha = _exp_where(through, g + m_in - m_out)

  def carry(state, x):
    (c_k, n_k), (a_k, uc_k, un_k) = state, x
    new = (a_k[..., None, None] * c_k + uc_k, a_k[..., None] * n_k + un_k)
    return new, (c_k, n_k)  # emit the state entering the chunk

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (alpha, u_c, u_n))
  (c_last, n_last), (c_in, n_in) = lax.scan(carry, (state.c, state.n), xs)
  c_in, n_in = jnp.moveaxis(c_in, 0, 2), jnp.moveaxis(n_in, 0, 2)

  # Outputs.
  log_w = jnp.where(pair, sums + i_gate[..., None, :], -jnp.inf)
  log_in = jnp.where(live_in, b + m_in[..., None], -jnp.inf)
  m = lax.stop_gradient(jnp.maximum(jnp.max(log_w, axis=-1), log_in))  # [B, H, n, C]
  w = _exp_where(pair, log_w - m[..., None])
  w_in = _exp_where(live_in, log_in - m)
  scores = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * w
  num = w_in[..., None] * jnp.einsum("bhnik,bhnkv->bhniv", q, c_in)
  num = num + jnp.einsum("bhnij,bhnjv->bhniv", scores, v)
  den = w_in * jnp.einsum("bhnik,bhnk->bhni", q, n_in) + jnp.sum(scores, axis=-1)
  h = _readout(num, den, m, eps)
  h = jnp.moveaxis(h, 1, 3).reshape(batch, n * c, heads, -1)[:, :t]
  return h, MLSTMState(c_last, n_last, m_out[..., -1])


def _cumsum(x):
  """Inclusive cumulative sum over the last axis, as a matmul with a triangle of ones (XLA:CPU
  fuses ``jnp.cumsum``'s reduce-window into, and recomputes it in, every consumer)."""
  c = x.shape[-1]
  tri = jnp.triu(jnp.ones((c, c), x.dtype))
  return jnp.einsum("...j,ji->...i", x, tri, precision=lax.Precision.HIGHEST)


@jax.custom_jvp
def _pair_sums(log_f):
  """``S_tj = Σ_{j<s≤t} log f_s = b_t - b_j`` over the last axis (``b`` the running sum),
  ``[..., L] -> [..., L, L]``; meaningful for ``t >= j``.

  ``b_t - b_j`` in fp32 loses the bits that matter after strong forgetting: both running sums are
  large and their difference small (gates of ±30 cost 1e-4 in ``h``). So ``b`` is carried in two
  floats (``hi + lo``, error-free sums), which makes ``S`` exact to its own fp32 rounding. The
  map is linear: its derivative is itself, taken in plain fp32.
  """
  hi, lo = lax.associative_scan(_two_sum, (log_f, jnp.zeros_like(log_f)), axis=-1)
  return _diff(hi) + _diff(lo)


@_pair_sums.defjvp
def _pair_sums_jvp(primals, tangents):
  return _pair_sums(*primals), _diff(_cumsum(tangents[0]))


def _diff(b):
  return b[..., :, None] - b[..., None, :]


def _two_sum(x, y):
  """``(hi, lo) ⊕ (hi', lo')``: ``hi + hi'`` and its rounding error (Knuth's TwoSum), plus the
  ``lo`` parts."""
  (a, a_lo), (b, b_lo) = x, y
  s = a + b
  b_virtual = s - a
  err = (a - (s - b_virtual)) + (b - b_virtual)
  return s, err + a_lo + b_lo


def _max_plus_scan(g, a, m0):
  """``m_k = max(g_k + m_{k-1}, a_k)`` over the last axis from ``m_{-1} = m0``; ``[..., n]``."""

  def step(m, x):
    m = jnp.maximum(x[0] + m, x[1])
    return m, m

  _, m = lax.scan(step, m0, (jnp.moveaxis(g, -1, 0), jnp.moveaxis(a, -1, 0)))
  return jnp.moveaxis(m, 0, -1)
