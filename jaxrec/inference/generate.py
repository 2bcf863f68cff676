"""Autoregressive generation: a (chunked) prefill that fills the caches, then a decode loop that
stops each row at a stop token, in one compiled program per bucket.

Recurrent mixers decode from their O(1) state (GLA's ``[B, H, K, V]``), attention from a KV cache
sized for the prompt plus the new tokens. A decoding step reads its whole KV cache, so a cache
past ``GROW_FROM`` slots starts at the prompt's size and doubles as the tokens fill it
(``cache_capacities``): a step never reads more than twice the slots it has filled, and each
growth copies the cache once. Prompts of any lengths share a batch: they are
left-padded into a bucket (``jaxrec.inference.prefill``), so that one program serves every prompt
length of a bucket. The decode loop is a ``lax.while_loop`` that ends after ``max_new_tokens``
tokens or as soon as every row has produced a stop token; a finished row is padded with
``pad_id``.

Decoding is greedy unless ``temperature > 0`` (as ``transformers.generate`` and the gemma
samplers). Sampling draws step ``i``'s tokens with ``fold_in(key(seed), i)``, so a seed gives the
same tokens whatever the bucket. ``on_token`` streams each step's tokens to the host as they are
decoded (an ordered ``io_callback``; one compiled program serves every callback).
"""

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import io_callback, multihost_utils

from jaxrec.inference import prefill as prefill_lib
from jaxrec.inference.longctx import substitution


class Generation(NamedTuple):
  """What ``generate`` returns.

  Attributes:
    tokens: int32 ``[B, max_new_tokens]`` numpy array, the generated tokens of each row, its stop
      token included, then ``pad_id``.
    lengths: int32 ``[B]``, the tokens each row generated (its stop token included).
    logits: fp32 ``[B, max_new_tokens, V]``, the logits each token was drawn from (zeros after a
      row stops), with ``return_logits=True``; else ``None``.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logits: np.ndarray | None = None

  def rows(self) -> list[list[int]]:
    """The generated ids of each row, up to its length."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def generate(
  model: nnx.Module,
  prompt: jax.Array | np.ndarray | Sequence[int] | Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  stop_tokens: Sequence[int] | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  pad_id: int = 0,
  buckets: prefill_lib.Buckets = "pow2",
  prefill_chunk: int | None = prefill_lib.DEFAULT_PREFILL_CHUNK,
  on_token: Callable[[np.ndarray, np.ndarray], bool | None] | None = None,
  return_logits: bool = False,
) -> Generation:
  """Continues each prompt by up to ``max_new_tokens`` tokens.

  Args:
    model: an ``LM`` (anything with ``model(tokens, segment_ids=..., cache=...) -> (logits,
      cache)`` and ``model.init_cache(batch_size, max_length)``), possibly with a long-context
      policy applied (``jaxrec.inference.longctx.apply``). Policies do not read padding, so
      such a model's prompts must have one length and are not bucketed; its chunked prefill
      runs ``longctx.chunked(model, prompt_length)``.
    prompt: int ``[B, T0]`` array, a list of ids (one prompt) or a list of lists of ids of any
      lengths (ragged prompts are left-padded into one batch, see the module docstring).
    max_new_tokens: the most tokens to generate per row, ``>= 0``.
    stop_tokens: ids that end a row (the tokenizer's eos, ``<|im_end|>`` ...): the row keeps the
      stop token and is padded after it. ``None``: every row runs ``max_new_tokens``.
    temperature: ``0`` (the default) decodes greedily (argmax); ``> 0`` samples from the softmax
      at this temperature.
    top_k: sample only among the ``k`` most likely tokens (needs ``temperature > 0``).
    top_p: nucleus sampling: only among the most likely tokens whose probabilities sum to
      ``top_p`` (the most likely token is always kept; needs ``temperature > 0``).
    seed: PRNG seed; the same seed gives the same tokens.
    pad_id: the id of left padding and of the tokens after a row stops.
    buckets: ``"pow2"`` (default) rounds the prompt length and ``max_new_tokens`` up to powers
      of two (at least 16) for the compiled program, a list of lengths rounds them up to the first
      that fits (past the list, to a power of two), ``None`` compiles for the exact lengths.
    prefill_chunk: prompts longer than this are prefilled in chunks of this many tokens, so the
      prefill's memory grows with the chunk rather than the prompt; ``None``: one call.
    on_token: ``on_token(tokens, finished)`` is called on the host as each step is decoded, with
      int32 ``tokens [B]`` (``pad_id`` for rows already finished) and bool ``finished [B]``;
      returning ``True`` ends the generation after that step.
    return_logits: also return the logits of every generated token.

  Returns:
    a ``Generation``: ``tokens [B, max_new_tokens]``, ``lengths [B]`` and optionally ``logits``.
  """
  return generate_with(
    _PROGRAM,
    model,
    prompt,
    max_new_tokens,
    stop_tokens=stop_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    pad_id=pad_id,
    buckets=buckets,
    prefill_chunk=prefill_chunk,
    on_token=on_token,
    return_logits=return_logits,
  )


def generate_with(
  program,
  model,
  prompt,
  max_new_tokens,
  *,
  stop_tokens,
  temperature,
  top_k,
  top_p,
  seed,
  pad_id,
  buckets,
  prefill_chunk,
  on_token,
  return_logits,
) -> Generation:
  """``generate`` with the jitted ``program`` to run (``jit_program()``; a ``Sampler`` holds its
  own, with its own compilation cache)."""
  prompts = _as_prompts(prompt)
  _validate(max_new_tokens, temperature, top_k, top_p, seed, pad_id)
  stops = _as_stop_tokens(stop_tokens)
  prefill_lib.check_buckets(buckets)
  prefill_lib.check_prefill_chunk(prefill_chunk)
  batch = len(prompts)
  longest = max(len(p) for p in prompts)
  policy = substitution.policy_of(model)
  prefill_lib.check_context(model, longest + max_new_tokens, stacklevel=4)
  if max_new_tokens == 0:
    return Generation(
      np.zeros((batch, 0), np.int32),
      np.zeros((batch,), np.int32),
      np.zeros((batch, 0, 0), np.float32) if return_logits else None,
    )
  if policy is not None:
    if any(len(p) != longest for p in prompts):
      raise ValueError(
        "prompt: long-context policies do not read padding, so their prompts must have one "
        f"length; got lengths {sorted({len(p) for p in prompts})}. Pass the prompts one at a time."
      )
    length = longest
  else:
    length = prefill_lib.bucket_length(longest, buckets)
  out_len = prefill_lib.bucket_length(max_new_tokens, buckets)
  tokens, segment_ids = prefill_lib.left_pad(prompts, length, pad_id)
  starts = [length - len(p) for p in prompts]
  schedule = prefill_lib.chunk_schedule(length, prefill_chunk, starts)
  prefill_lib.check_prefix_chunks(model, schedule, starts)
  if schedule.calls > 1:
    model = substitution.chunked(model, length)
  greedy = temperature == 0
  handle = _register(on_token)
  try:
    out, lengths, logits = program(
      *nnx.split(model),
      tokens,
      None if policy is not None else segment_ids,
      np.int32(max_new_tokens),
      stops,
      np.int32(pad_id),
      np.float32(temperature if not greedy else 1.0),
      np.float32(1.0 if top_p is None else top_p),
      np.uint32(seed),
      np.int32(handle),
      schedule=schedule,
      out_len=out_len,
      # Long-context policies size their own caches: theirs are not grown.
      capacities=cache_capacities(length, out_len, grow=policy is None),
      greedy=greedy,
      top_k=None if greedy else top_k,
      use_top_p=top_p is not None and not greedy,
      stream=on_token is not None,
      return_logits=return_logits,
    )
    out, lengths = _to_host(out), _to_host(lengths)
  finally:
    _CALLBACKS.pop(handle, None)
  logits = _to_host(logits)[:, :max_new_tokens] if return_logits else None
  return Generation(out[:, :max_new_tokens], lengths, logits)


# KV caches up to this many slots are read whole by every decoding step (a few MB); larger ones
# grow by doubling (``cache_capacities``).
GROW_FROM = 4096


def cache_capacities(length: int, out_len: int, grow: bool) -> tuple[int, ...]:
  """The cache sizes of the decoding phases of a ``length``-token prompt and ``out_len`` new
  tokens: the whole ``length + out_len`` at once, or, with ``grow`` and past ``GROW_FROM`` slots,
  powers of two from the first that holds the prompt and its first new token (at least
  ``GROW_FROM``), up to ``length + out_len``."""
  total = length + out_len
  if not grow or total <= GROW_FROM:
    return (total,)
  size = max(GROW_FROM, 1 << length.bit_length())  # > length: room for a new token
  sizes = []
  while size < total:
    sizes.append(size)
    size *= 2
  return (*sizes, total)


def _grown(cache, bigger):
  """``cache`` copied into the start of ``bigger``, an empty cache of the same structure whose
  arrays are as large or larger along one slot axis."""

  def grow(old, new):
    if old.shape == new.shape:
      return old
    return lax.dynamic_update_slice(new, old, (0,) * old.ndim)

  return jax.tree.map(grow, cache, bigger)


def _program_fn(
  graphdef,
  state,
  tokens,
  segment_ids,
  max_new,
  stop_ids,
  pad_id,
  temperature,
  top_p,
  seed,
  handle,
  *,
  schedule,
  out_len,
  capacities,
  greedy,
  top_k,
  use_top_p,
  stream,
  return_logits,
):
  """Prefill then decode, for one bucket: ``(tokens [B, out_len], lengths [B], logits)``."""
  model = nnx.merge(graphdef, state)
  batch, length = tokens.shape
  shapes = [jax.eval_shape(lambda n=n: model.init_cache(batch, n)) for n in capacities]
  if any(jax.tree.structure(c) != jax.tree.structure(shapes[0]) for c in shapes):
    # A cache whose kind changes with its size (a sliding window's ring once the size passes the
    # window) is made at its final size.
    capacities = capacities[-1:]
  cache = model.init_cache(batch, capacities[0])

  # Prefill, in chunks past prefill_chunk; only the last position's logits are kept.
  def prefill_step(cache, chunk):
    logits, cache = model(chunk["tokens"], segment_ids=chunk.get("segments"), cache=cache)
    return cache, logits[:, -1:]

  xs = {"tokens": tokens} | ({} if segment_ids is None else {"segments": segment_ids})
  cache, last = prefill_lib.scan_chunks(prefill_step, cache, xs, schedule)
  logits = last[:, -1]

  key = jax.random.key(seed)
  top_p = top_p if use_top_p else None

  def sample(logits, i):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _sample(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)

  def emit(active, tokens, done):
    if not stream:
      return jnp.zeros((), bool)
    flag = jax.ShapeDtypeStruct((), jnp.bool_)
    return io_callback(_emit, flag, handle, active, tokens, done, ordered=True)

  is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)
  token = sample(logits, 0)
  done = is_stop(token)
  out = jnp.full((batch, out_len), pad_id, jnp.int32).at[:, 0].set(token)
  lengths = jnp.ones((batch,), jnp.int32)
  if return_logits:
    kept = jnp.zeros((batch, out_len, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
  else:
    kept = jnp.zeros((), jnp.float32)
  cancel = emit(jnp.asarray(True), token, done)

  def step(carry, active):
    i, token, cache, out, lengths, done, kept, cancel = carry
    logits, cache = model(token[:, None], cache=cache)
    logits = logits[:, -1]
    new = jnp.where(done, pad_id, sample(logits, i))
    lengths = lengths + ~done
    if return_logits:
      kept = kept.at[:, i].set(jnp.where(done[:, None], 0.0, logits))
    out = out.at[:, i].set(new)
    done = done | is_stop(new)
    cancel = emit(active, new, done)
    return i + 1, new, cache, out, lengths, done, kept, cancel

  def running(carry):
    i, done, cancel = carry[0], carry[5], carry[7]
    return (i < max_new) & ~jnp.all(done) & ~cancel

  carry = (jnp.ones((), jnp.int32), token, cache, out, lengths, done, kept, cancel)
  after = jax.eval_shape(lambda c: step(c, jnp.asarray(True))[2], carry)
  if not prefill_lib.same_structure(after, cache):
    # The first decoding step changes the cache's structure (ThinK compresses a chunked prefill's
    # cache there): it runs before the loop, and counts only if the loop would run it.
    active = running(carry)
    stepped = step(carry, active)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
    carry = tuple(
      new if n == 2 else keep(new, old)
      for n, (new, old) in enumerate(zip(stepped, carry, strict=True))
    )
  for size in capacities:
    if size != capacities[0]:
      carry = (*carry[:2], _grown(carry[2], model.init_cache(batch, size)), *carry[3:])
    # Step i writes slot length + i - 1.
    fits = lambda c, size=size: running(c) & (c[0] < size - length + 1)
    carry = lax.while_loop(fits, lambda c: step(c, jnp.asarray(True)), carry)
  _, _, _, out, lengths, _, kept, _ = carry
  return out, lengths, kept


_STATIC = (
  "schedule",
  "out_len",
  "capacities",
  "greedy",
  "top_k",
  "use_top_p",
  "stream",
  "return_logits",
)


def jit_program():
  """A jitted generation program with its own compilation cache (one ``Sampler`` holds one)."""
  return jax.jit(_program_fn, static_argnums=(0,), static_argnames=_STATIC)


_PROGRAM = jit_program()

# Streaming: the compiled program calls _emit with an integer handle; the callbacks live here, so
# that one program serves every callback.
_CALLBACKS: dict[int, Callable] = {}
_HANDLES = itertools.count(1)


def _register(on_token) -> int:
  if on_token is None:
    return 0
  if not callable(on_token):
    raise ValueError(f"on_token: expected a callable or None, got {on_token!r}")
  handle = next(_HANDLES) % (2**31 - 1)
  _CALLBACKS[handle] = on_token
  return handle


def _emit(handle, active, tokens, done):
  callback = _CALLBACKS.get(int(handle))
  if callback is None or not bool(active):
    return np.bool_(False)
  return np.bool_(bool(callback(np.asarray(tokens), np.asarray(done))))


def sample_logits(
  logits: jax.Array,
  key: jax.Array,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """One token per row of ``logits [B, V]`` (int32 ``[B]``); ``temperature=0`` is the argmax; see
  ``generate`` for the options."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _sample(logits, key, temperature, top_k, top_p)


def _sample(logits, key, temperature, top_k, top_p):
  """Samples at a (possibly traced) ``temperature > 0`` with the static ``top_k`` filter and the
  ``top_p`` filter (traced or ``None``)."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    # Keep the shortest prefix of the sorted distribution whose mass reaches top_p: a token
    # stays if the mass strictly before it is below top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _to_host(x) -> np.ndarray:
  """A numpy copy; a global array of several processes is gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _as_prompts(prompt) -> list[list[int]]:
  """The prompts as lists of ids (one per row)."""
  if isinstance(prompt, (list, tuple)) and prompt and _is_int(prompt[0]):
    prompt = [prompt]
  if isinstance(prompt, (jax.Array, np.ndarray)):
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
      raise ValueError(
        f"prompt: expected a non-empty integer [B, T0] array, got {prompt.dtype} shape "
        f"{prompt.shape}"
      )
    return _to_host(prompt).tolist()
  if (
    not isinstance(prompt, (list, tuple))
    or not prompt
    or any(not isinstance(p, (list, tuple, np.ndarray)) or len(p) < 1 for p in prompt)
    or any(not _is_int(t) for p in prompt for t in p)
  ):
    raise ValueError(
      "prompt: expected an integer [B, T0] array, a list of ids or a list of non-empty lists of "
      f"ids, got {_describe(prompt)}"
    )
  return [[int(t) for t in p] for p in prompt]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _describe(x) -> str:
  text = repr(x)
  return text if len(text) <= 80 else text[:77] + "..."


def _as_stop_tokens(stop_tokens) -> np.ndarray:
  """int32 stop ids padded with -1 to a power-of-two length (a few shapes, a few programs)."""
  ids = [] if stop_tokens is None else list(stop_tokens)
  if any(not _is_int(t) or t < 0 for t in ids):
    raise ValueError(f"stop_tokens: expected None or non-negative ids, got {stop_tokens!r}")
  size = 1 << max(len(ids) - 1, 0).bit_length()
  return np.array(ids + [-1] * (size - len(ids)), np.int32)


def _validate(max_new_tokens, temperature, top_k, top_p, seed, pad_id):
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError(
      f"temperature: top_k={top_k} / top_p={top_p} filter sampling, which needs temperature > 0 "
      "(decoding is greedy by default); got temperature=0"
    )
  if not _is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
  if not _is_int(pad_id) or pad_id < 0:
    raise ValueError(f"pad_id: expected a non-negative id, got {pad_id!r}")
