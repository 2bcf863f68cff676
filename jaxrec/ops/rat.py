"""RAT: a gated recurrence inside chunks, softmax attention across them (arXiv 2507.04416).

Chunks are laid out per document: token ``t`` at position ``p = t - s_t`` in its document (``s_t``
the document's first token; 0 without packing) lies in chunk ``c = p // L`` at offset
``l = p % L``. A packed row is therefore computed exactly as its documents run alone, whatever
the boundaries. Inside a chunk, keys and values run through one per-channel gated recurrence that
restarts at ``l = 0`` (every document start included)::

  k̃_t = g_t ⊙ k̃_{t-1} + (1 - g_t) ⊙ k_t        ṽ_t = g_t ⊙ ṽ_{t-1} + (1 - g_t) ⊙ v_t

Across chunks the raw query attends, in one joint softmax, to the final states ``(K̃_c', Ṽ_c')``
(the states at ``l = L - 1``) of the completed chunks ``c' < c`` of its own document and to its
own running state::

  o_t = softmax(s · [q_t · K̃_{<c} ; q_t · k̃_t]) · [Ṽ_{<c} ; ṽ_t],     s = K^-1/2

With InterRoPE the query and the chunk states are rotated by their chunk indices within the
document (the running state shares the query's chunk, so its term is unrotated). ``L = 1`` is
softmax attention over ``(1 - g) ⊙ k, (1 - g) ⊙ v``; ``L = T`` is the gated RNN ``o_t = ṽ_t``.

Forms, selected with ``method``:

* ``"parallel"``: the recurrence on ``linear_scan`` with resets at chunk starts; the chunk-final
  states (tokens with ``l = L - 1``, at most ``(T - 1) // L`` of them that a later token can see)
  are compacted per row into that many slots, then the chunk attention is one masked
  ``[T, (T - 1) // L]`` softmax: ``O(T² / L)`` work, however the documents fall.
* ``"sequential"``: ``rat_step`` token by token in ``lax.scan``: the reference, and the decoding
  form whose state (``RATState``) holds one ``(K̃, Ṽ)`` per completed chunk of the current
  document plus the running state, ``L`` times fewer entries than a KV cache.
"""

from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax

from jaxrec.ops import _checks
from jaxrec.ops.rope import apply_rope
from jaxrec.ops.scan import linear_scan
from jaxrec.ops.segments import segment_starts
from jaxrec.typing import HeadOutputs, Keys, Queries, SegmentIds, StepKeys, StepQueries, Values

RATMethod = Literal["auto", "parallel", "sequential"]
METHODS = get_args(RATMethod)


class RATState(NamedTuple):
  """The decoding state of RAT (fp32 states).

  Only the current document of each row is kept: a document never sees another's chunks, so a
  new document simply overwrites the slots from chunk 0 on, and ``ceil(max_length / L)`` slots
  hold every chunk any document of up to ``max_length`` tokens can see.

  Attributes:
    chunk_k: ``[B, N, H, K]`` final keys of the completed chunks of each row's current document,
      slot ``c`` for chunk ``c`` (rotated by ``c`` under InterRoPE). Slots from
      ``(position - 1) // L`` on are stale: at a chunk edge the chunk just completed is still the
      running state, written into its slot by the document's next token.
    chunk_v: ``[B, N, H, K]`` final values of those chunks.
    k: ``[B, H, K]`` the running key state of the current chunk.
    v: ``[B, H, K]`` the running value state.
    position: int32 ``[B]`` tokens of each row's current document seen so far (the next token's
      position in that document, if it continues it).
    index: int32 scalar, the number of tokens seen (the position of the next one in the row).
  """

  chunk_k: jax.Array
  chunk_v: jax.Array
  k: jax.Array
  v: jax.Array
  position: jax.Array
  index: jax.Array


def rat_init_state(
  batch_size: int, max_length: int, num_heads: int, head_dim: int, chunk_size: int
):
  """A zero ``RATState`` with room for the ``ceil(max_length / chunk_size)`` chunks."""
  n = max(-(-max_length // chunk_size), 1)
  zeros = jnp.zeros((batch_size, n, num_heads, head_dim), jnp.float32)
  run = jnp.zeros((batch_size, num_heads, head_dim), jnp.float32)
  return RATState(
    chunk_k=zeros,
    chunk_v=zeros,
    k=run,
    v=run,
    position=jnp.zeros((batch_size,), jnp.int32),
    index=jnp.zeros((), jnp.int32),
  )


def rat(
  q: Queries,
  k: Keys,
  v: Values,
  gate: Keys,
  *,
  chunk_size: int,
  rope_theta: float | None = None,
  initial_state: RATState | None = None,
  output_final_state: bool = False,
  segment_ids: SegmentIds | None = None,
  scale: float | None = None,
  method: RATMethod = "auto",
) -> tuple[HeadOutputs, RATState | None]:
  """RAT over ``[B, T, H, K]`` queries, keys, values and gates ``g ∈ (0, 1)``.

  Args:
    q: queries ``[B, T, H, K]``.
    k: keys, same shape.
    v: values, same shape (the gate is shared, so keys and values have one width).
    gate: the forget gate ``g``, same shape.
    chunk_size: ``L``, tokens per chunk.
    rope_theta: InterRoPE base wavelength (chunk-index positions); ``None`` is NoPE.
    initial_state: a ``RATState`` to continue (decoding, prefill); needs the sequential form.
    output_final_state: also return the state after the last token (sequential form).
    segment_ids: integer ``[B, T]``: packed documents; each lays out its own chunks from its
      first token, so a packed row equals its documents run alone. ``initial_state`` feeds the
      first document (the first token continues the state's document).
    scale: logit scale; ``K ** -0.5`` when ``None``.
    method: ``"auto" | "parallel" | "sequential"``; ``"auto"`` is parallel unless a state goes
      in or out.

  Returns:
    ``(o [B, T, H, K] in q's dtype, final_state or None)``.
  """
  _validate(q, k, v, gate, chunk_size, segment_ids, method)
  stateful = initial_state is not None or output_final_state
  if method == "auto":
    method = "sequential" if stateful else "parallel"
  if method == "parallel" and stateful:
    raise ValueError(
      "method: initial_state and output_final_state need method='sequential' or 'auto', got "
      "'parallel'"
    )
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if method == "parallel":
    return _parallel(q, k, v, gate, chunk_size, rope_theta, segment_ids, scale), None
  batch, t, heads, width = q.shape
  state = initial_state
  if state is None:
    state = rat_init_state(batch, t, heads, width, chunk_size)
  starts = jnp.zeros((batch, t), bool) if segment_ids is None else segment_starts(segment_ids)

  def step(state, xs):
    o, state = rat_step(*xs, state, chunk_size=chunk_size, rope_theta=rope_theta, scale=scale)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, gate, starts))
  state, o = lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), state if output_final_state else None


def rat_step(
  q: StepQueries,
  k: StepKeys,
  v: StepKeys,
  gate: StepKeys,
  new_segment: jax.Array,
  state: RATState,
  *,
  chunk_size: int,
  rope_theta: float | None = None,
  scale: float | None = None,
) -> tuple[StepQueries, RATState]:
  """One token ``[B, H, K]``; ``new_segment [B]`` bool starts a document with it (else it
  continues the row's document at ``state.position``). Returns ``(o [B, H, K] fp32, state)``."""
  f32 = jnp.float32
  q, k, v, g = (x.astype(f32) for x in (q, k, v, gate))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  position = jnp.where(new_segment, 0, state.position)  # [B], in the token's document
  chunk, offset = position // chunk_size, position % chunk_size
  # Entering chunk c > 0 of a document: the running state is the final state of chunk c - 1.
  close = (offset == 0) & (position > 0)
  slots = jnp.arange(state.chunk_k.shape[1])
  write = ((slots == chunk[:, None] - 1) & close[:, None])[..., None, None]  # [B, N, 1, 1]
  prev_k = _rotate(state.k[:, None], (chunk - 1)[:, None], rope_theta)
  chunk_k = jnp.where(write, prev_k, state.chunk_k)
  chunk_v = jnp.where(write, state.v[:, None], state.chunk_v)
  keep = (offset != 0).astype(f32)[:, None, None]
  run_k = keep * g * state.k + (1 - g) * k
  run_v = keep * g * state.v + (1 - g) * v
  q_rot = _rotate(q[:, None], chunk[:, None], rope_theta)[:, 0]
  logits = scale * jnp.einsum("bhk,bnhk->bhn", q_rot, chunk_k, precision="highest")
  visible = slots[None] < chunk[:, None]  # [B, N]
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  own = scale * jnp.sum(q * run_k, -1)
  p = jax.nn.softmax(jnp.concatenate([logits, own[..., None]], -1), axis=-1)
  o = jnp.einsum("bhn,bnhk->bhk", p[..., :-1], chunk_v, precision="highest")
  o = o + p[..., -1:] * run_v
  return o, RATState(chunk_k, chunk_v, run_k, run_v, position + 1, state.index + 1)


def _parallel(q, k, v, gate, chunk_size, rope_theta, segment_ids, scale):
  batch, t, _, width = q.shape
  f32 = jnp.float32
  g = gate.astype(f32)
  tokens = jnp.broadcast_to(jnp.arange(t), (batch, t))
  doc_start = jnp.zeros((batch, t), jnp.int32)  # s_t, the first token of t's document
  if segment_ids is not None:
    doc_start = lax.cummax(jnp.where(segment_starts(segment_ids), tokens, 0), axis=1)
  position = tokens - doc_start
  chunk, offset = position // chunk_size, position % chunk_size
  a = jnp.where((offset == 0)[..., None, None], 0.0, g)
  kv = jnp.concatenate([k.astype(f32), v.astype(f32)], -1)
  state, _ = linear_scan(jnp.concatenate([a, a], -1), jnp.concatenate([1 - g, 1 - g], -1) * kv)
  run_k, run_v = state[..., :width], state[..., width:]
  own = scale * jnp.sum(q.astype(f32) * run_k, -1)  # [B, T, H]
  # Chunk-final tokens a later token can see: l = L - 1 before the last token. Complete chunks
  # cover disjoint runs of L tokens of the first T - 1, so a row has at most n of them; they are
  # gathered into n slots per row (the unfilled ones masked), keeping the softmax at [T, n].
  n = (t - 1) // chunk_size
  if n == 0:
    return run_v.astype(q.dtype)
  final = (offset == chunk_size - 1) & (tokens < t - 1)
  last = jax.vmap(lambda f: jnp.nonzero(f, size=n, fill_value=0)[0])(final)  # [B, n]
  filled = jnp.arange(n)[None] < jnp.sum(final, axis=1, keepdims=True)
  take = lambda x: jnp.take_along_axis(x, last.reshape(last.shape + (1,) * (x.ndim - 2)), axis=1)
  chunk_k = _rotate(take(run_k), take(chunk), rope_theta)
  q_rot = _rotate(q.astype(f32), chunk, rope_theta)
  logits = scale * jnp.einsum("bthk,bnhk->bhtn", q_rot, chunk_k, precision="highest")
  # Slot visible to token t: filled, of t's document, and of an earlier chunk.
  same_doc = take(doc_start)[:, None, :] == doc_start[:, :, None]
  earlier = take(chunk)[:, None, :] < chunk[:, :, None]
  visible = filled[:, None, :] & same_doc & earlier  # [B, T, n]
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  logits = jnp.concatenate([logits, jnp.moveaxis(own, 1, 2)[..., None]], -1)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhtn,bnhk->bthk", p[..., :-1], take(run_v), precision="highest")
  o = o + jnp.moveaxis(p[..., -1], 1, 2)[..., None] * run_v
  return o.astype(q.dtype)


def _rotate(x, positions, rope_theta):
  return x if rope_theta is None else apply_rope(x, positions, rope_theta)


def _validate(q, k, v, gate, chunk_size, segment_ids, method):
  _checks.check_choice("method", method, METHODS)
  for name, x in (("q", q), ("k", k), ("v", v), ("gate", gate)):
    _checks.check_float(name, x)
  _checks.check_rank("q", q, 4, "[B, T, H, K]")
  for name, x in (("k", k), ("v", v), ("gate", gate)):
    _checks.check_shape(name, x, q.shape, "[B, T, H, K] (the shape of q)")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
  _checks.check_segment_ids(segment_ids, q.shape[:2])
