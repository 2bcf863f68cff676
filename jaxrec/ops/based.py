"""Based linear attention and prefix linear attention (JRT-RNN), on the linear-recurrence core.

**Taylor feature map** (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"). For a query or key ``x`` of width ``F`` (``feature_dim``)::

  φ(x) = [1, x / d^¼, vec(x xᵀ) / sqrt(2d)]        (width 1 + F + F², d = F by default)
  φ(q)·φ(k) = 1 + q·k / sqrt(d) + (q·k)² / 2d      (the 2nd-order Taylor series of exp(q·k/√d))

The dot product is ``((q·k/√d + 1)² + 1) / 2 >= 1/2``: every attention weight is positive, so the
normalizer below never vanishes.

**Based** (normalized causal linear attention)::

  y_i = φ(q_i) Σ_{j<=i} φ(k_j) v_jᵀ / (φ(q_i) · Σ_{j<=i} φ(k_j) + eps)

Numerator and normalizer are one recurrence: ``gated_linear_attention`` with zero log-decay, unit
scale and the values widened by a column of ones, ``[v, 1]``; its last output column is the
normalizer. The state is therefore ``[B, H, 1 + F + F², V + 1]``: ``S = Σ φ(k) [v, 1]ᵀ``.

**Prefix linear attention** (Arora et al. 2024, "Just read twice", eq. 3): separate encoder keys and
values ``k_e, v_e`` read the first ``M`` tokens (``prefix_len``) non-causally; every query, those
inside the prefix included, sees the whole encoder sum::

  y_i = φ(q_i) [Σ_{j<=i} φ(k_j) [v_j, 1]ᵀ + Σ_{j<M} φ(k_e,j) [v_e,j, 1]ᵀ]  (numerator / normalizer)

Decoding continues from ``s_M = Σ_{j<M} (φ(k_e,j) [v_e,j, 1]ᵀ + φ(k_j) [v_j, 1]ᵀ)`` as ordinary
Based decoding (O(1) memory per token). With packed ``segment_ids`` the prefix is the first ``M``
tokens *of each document*, so a packed row equals its documents run separately; a document shorter
than ``M`` is all prefix. The encoder sum is masked exactly: features of tokens outside the prefix
are zeroed after the feature map (the JRT code zeroes ``k`` before it, which leaves the constant
feature of padding in the sums).

With segments, the per-document encoder sum at every position is a forward causal pass plus a
reversed one minus the diagonal, each a ``gated_linear_attention`` that resets at the boundaries;
without segments it is one ``[B, H, 1 + F + F², V + 1]`` sum.

Axes (``jaxrec.typing``): ``B`` batch, ``T`` time, ``H`` heads, ``K`` the query/key width ``F``
before the feature map, ``V`` the value width. Feature maps, states and accumulations are fp32
(fp64 for fp64 inputs); outputs come back in the dtype of ``q``.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks
from jaxrec.ops import gla as gla_ops
from jaxrec.ops.segments import segment_starts
from jaxrec.typing import (
  HeadOutputs,
  Keys,
  MatrixState,
  Queries,
  SegmentIds,
  StepKeys,
  StepQueries,
  StepValues,
  Values,
)

# The forms are those of the recurrence underneath.
BasedMethod = gla_ops.GLAMethod


def taylor_feature_map(x: jax.Array, *, scale_dim: int | None = None) -> jax.Array:
  """``φ(x) = [1, x / d^¼, vec(x xᵀ) / sqrt(2d)]`` over the last axis.

  Args:
    x: ``[..., F]``.
    scale_dim: ``d``; ``F`` when ``None`` (as Based and JRT).

  Returns:
    ``[..., 1 + F + F²]`` in the dtype of ``x``.
  """
  f = x.shape[-1]
  d = f if scale_dim is None else scale_dim
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f)
  ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
  return jnp.concatenate([ones, x * d**-0.25, outer * (2.0 * d) ** -0.5], axis=-1)


def feature_width(feature_dim: int) -> int:
  """Width of ``taylor_feature_map``'s output, ``1 + F + F²``."""
  return 1 + feature_dim + feature_dim**2


def based_attention(
  q: Queries,
  k: Keys,
  v: Values,
  *,
  initial_state: MatrixState | None = None,
  output_final_state: bool = False,
  segment_ids: SegmentIds | None = None,
  eps: float = 1e-12,
  chunk_size: int = 64,
  method: BasedMethod = "auto",
) -> tuple[HeadOutputs, MatrixState | None]:
  """Normalized causal linear attention with the Taylor feature map (Based).

  Args:
    q: queries ``[B, T, H, K]`` (``K`` the feature dim before the map).
    k: keys ``[B, T, H, K]``.
    v: values ``[B, T, H, V]``.
    initial_state: ``[B, H, 1 + K + K², V + 1]``: ``Σ φ(k) [v, 1]ᵀ`` of the tokens before;
      zeros when ``None``.
    output_final_state: also return the state after the last step.
    segment_ids: integer ``[B, T]``; the sums restart wherever the id changes.
    eps: added to the normalizer (which is ``>= 1/2`` whenever a key has been seen).
    chunk_size: chunk length of ``gated_linear_attention``'s chunkwise form.
    method: the form of the recurrence, as ``gated_linear_attention``'s.

  Returns:
    ``(y [B, T, H, V]`` in the dtype of ``q``, the final state in fp32 or ``None``).
  """
  _validate(q=q, k=k, v=v, segment_ids=segment_ids)
  _check_state("initial_state", initial_state, q, v)
  cdt = _checks.compute_dtype(q, k, v)
  phi_q, phi_k = (taylor_feature_map(x.astype(cdt)) for x in (q, k))
  o, state = _linear_attention(
    phi_q,
    phi_k,
    _with_ones(v.astype(cdt)),
    initial_state=initial_state,
    output_final_state=output_final_state,
    segment_ids=segment_ids,
    chunk_size=chunk_size,
    method=method,
  )
  return _normalize(o, eps).astype(q.dtype), state


def based_attention_step(
  q: StepQueries,
  k: StepKeys,
  v: StepValues,
  state: MatrixState,
  *,
  eps: float = 1e-12,
) -> tuple[StepValues, MatrixState]:
  """One decoding step of ``based_attention``: ``q, k [B, H, K]``, ``v [B, H, V]``, ``state
  [B, H, 1 + K + K², V + 1]`` -> ``(y [B, H, V], new_state)``."""
  _check_state("state", state, q[:, None], v[:, None])
  cdt = _checks.compute_dtype(q, k, v)
  phi_q, phi_k = (taylor_feature_map(x.astype(cdt)) for x in (q, k))
  o, state = _step(phi_q, phi_k, _with_ones(v.astype(cdt)), state.astype(cdt))
  return _normalize(o, eps).astype(q.dtype), state


def prefix_linear_attention(
  q: Queries,
  k: Keys,
  v: Values,
  k_enc: Keys,
  v_enc: Values,
  *,
  prefix_len: int | jax.Array,
  continues: bool | jax.Array = False,
  initial_state: MatrixState | None = None,
  output_final_state: bool = False,
  segment_ids: SegmentIds | None = None,
  eps: float = 1e-12,
  chunk_size: int = 64,
  method: BasedMethod = "auto",
) -> tuple[HeadOutputs, MatrixState | None]:
  """Prefix linear attention: Based over all tokens plus a non-causal encoder over each
  document's first ``prefix_len`` tokens (the JRT-RNN mixer's core).

  Args:
    q: queries ``[B, T, H, K]``.
    k: decoder keys ``[B, T, H, K]``.
    v: decoder values ``[B, T, H, V]``.
    k_enc: encoder keys ``[B, T, H, K]`` (only the prefix positions are read).
    v_enc: encoder values ``[B, T, H, V]``.
    prefix_len: ``M``, the prefix length of every document; ``0`` is plain Based. May be traced.
    continues: the first document continues one whose prefix an earlier call consumed (decoding
      after a prefill): it has no encoder part here. May be traced.
    initial_state: the state before the first token, as ``based_attention``'s (after a prefill it
      already holds the prefix); zeros when ``None``.
    output_final_state: also return the state after the last step, the decoder sum plus the
      last document's encoder sum: the state decoding continues from.
    segment_ids: integer ``[B, T]``: packed documents, each with its own prefix and sums.
    eps: added to the normalizer.
    chunk_size: chunk length of the recurrences' chunkwise form.
    method: the form of the recurrences, as ``gated_linear_attention``'s.

  Returns:
    ``(y [B, T, H, V]`` in the dtype of ``q``, the final state in fp32 or ``None``).
  """
  _validate(q=q, k=k, v=v, segment_ids=segment_ids)
  _checks.check_float("k_enc", k_enc)
  _checks.check_float("v_enc", v_enc)
  _checks.check_shape("k_enc", k_enc, q.shape, "[B, T, H, K] (the shape of q)")
  _checks.check_shape("v_enc", v_enc, v.shape, "[B, T, H, V] (the shape of v)")
  _check_state("initial_state", initial_state, q, v)
  cdt = _checks.compute_dtype(q, k, v, k_enc, v_enc)
  phi_q, phi_k, phi_e = (taylor_feature_map(x.astype(cdt)) for x in (q, k, k_enc))
  in_prefix = prefix_mask(q.shape[:2], prefix_len, segment_ids=segment_ids, continues=continues)
  phi_e = jnp.where(in_prefix[:, :, None, None], phi_e, 0.0)
  v1, v_enc1 = _with_ones(v.astype(cdt)), _with_ones(v_enc.astype(cdt))
  forms = dict(chunk_size=chunk_size, method=method)

  o, dec_state = _linear_attention(
    phi_q,
    phi_k,
    v1,
    initial_state=initial_state,
    output_final_state=output_final_state,
    segment_ids=segment_ids,
    **forms,
  )
  if segment_ids is None:
    enc_state = jnp.einsum("bthf,bthv->bhfv", phi_e, v_enc1)
    o_enc = jnp.einsum("bthf,bhfv->bthv", phi_q, enc_state)
  else:
    # Σ over the document's prefix = causal part (j <= i) + anti-causal part (j >= i) - (j = i).
    o_fwd, enc_state = _linear_attention(
      phi_q, phi_e, v_enc1, output_final_state=True, segment_ids=segment_ids, **forms
    )
    o_rev, _ = _linear_attention(
      *(_flip(x) for x in (phi_q, phi_e, v_enc1)), segment_ids=_flip(segment_ids), **forms
    )
    diag = jnp.sum(phi_q * phi_e, axis=-1, keepdims=True) * v_enc1
    o_enc = o_fwd + _flip(o_rev) - diag
  state = dec_state + enc_state if output_final_state else None
  return _normalize(o + o_enc, eps).astype(q.dtype), state


def prefix_linear_attention_step(
  q: StepQueries,
  k: StepKeys,
  v: StepValues,
  k_enc: StepKeys,
  v_enc: StepValues,
  state: MatrixState,
  *,
  in_prefix: bool | jax.Array = False,
  eps: float = 1e-12,
) -> tuple[StepValues, MatrixState]:
  """One token of ``prefix_linear_attention``: a Based step whose state also takes the token's
  encoder term when ``in_prefix`` (a one-token prompt is its own prefix; decoding after a
  prefill is not in it). ``q, k, k_enc [B, H, K]``, ``v, v_enc [B, H, V]``."""
  _check_state("state", state, q[:, None], v[:, None])
  cdt = _checks.compute_dtype(q, k, v, k_enc, v_enc)
  phi_q, phi_k, phi_e = (taylor_feature_map(x.astype(cdt)) for x in (q, k, k_enc))
  phi_e = jnp.where(jnp.asarray(in_prefix), phi_e, 0.0)
  state = state.astype(cdt) + phi_e[..., :, None] * _with_ones(v_enc.astype(cdt))[..., None, :]
  o, state = _step(phi_q, phi_k, _with_ones(v.astype(cdt)), state)
  return _normalize(o, eps).astype(q.dtype), state


def prefix_mask(
  batch_time: tuple[int, int],
  prefix_len: int | jax.Array,
  *,
  segment_ids: SegmentIds | None = None,
  continues: bool | jax.Array = False,
) -> jax.Array:
  """bool ``[B, T]``: the token is among the first ``prefix_len`` of its document.

  Documents start where ``segment_ids`` changes (``segment_starts``) and at step 0; with
  ``continues`` the document at step 0 started in an earlier call and has no prefix here.
  """
  batch, t = batch_time
  steps = jnp.broadcast_to(jnp.arange(t), (batch, t))
  if segment_ids is None:
    first = jnp.ones((batch, t), bool)
    offset = steps
  else:
    starts = segment_starts(segment_ids)
    first = jnp.cumsum(starts, axis=1) == 0  # the document that began before step 0
    offset = steps - lax.cummax(jnp.where(starts, steps, 0), axis=1)
  return (offset < prefix_len) & ~(first & jnp.asarray(continues))


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _linear_attention(phi_q, phi_k, v1, *, initial_state=None, **kw):
  """``Σ_{j<=i} (φ(q_i)·φ(k_j)) v1_j``: the recurrence with zero log-decay and unit scale."""
  log_decay = jnp.zeros(phi_q.shape[:3], phi_q.dtype)
  return gla_ops.gated_linear_attention(
    phi_q, phi_k, v1, log_decay, initial_state=initial_state, scale=1.0, **kw
  )


def _step(phi_q, phi_k, v1, state):
  log_decay = jnp.zeros(phi_q.shape[:2], phi_q.dtype)
  return gla_ops.gated_linear_attention_step(phi_q, phi_k, v1, log_decay, state, scale=1.0)


def _flip(x):
  return jnp.flip(x, axis=1)


def _with_ones(v):
  return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _normalize(o, eps):
  return o[..., :-1] / (o[..., -1:] + eps)


def _validate(*, q, k, v, segment_ids):
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 4, "[B, T, H, K]")
  _checks.check_shape("k", k, q.shape, "[B, T, H, K] (the shape of q)")
  _checks.check_rank("v", v, 4, "[B, T, H, V]")
  _checks.check_shape("v", v, (*q.shape[:3], v.shape[-1]), "[B, T, H, V] (B, T, H of q)")
  _checks.check_segment_ids(segment_ids, q.shape[:2])


def _check_state(name, state, q, v):
  if state is None:
    return
  _checks.check_float(name, state)
  want = (q.shape[0], q.shape[2], feature_width(q.shape[-1]), v.shape[-1] + 1)
  _checks.check_shape(name, state, want, "[B, H, 1 + K + K², V + 1]")
