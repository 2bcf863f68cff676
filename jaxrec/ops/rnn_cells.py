"""Pure functional RNN cells for ``jaxrec.ops.newton_rnn``, with parameter initializers.

Every cell is ``cell(params, h_prev [D], x [I]) -> h [D]`` for one step of one sequence
(``newton_rnn`` vmaps it over batch and time) and every ``init_*`` returns its ``params`` dict.

* ``paragru_cell`` and ``paralstm_cell``: the ParaRNN cells (Danieli et al., arXiv 2510.21450, §3)
  whose recurrent matrices are diagonal, so the step Jacobian is diagonal (GRU) or made of ``2×2``
  blocks of diagonals (LSTM-CIFG with state ``[c; h]``), and whose input matrices are
  block-diagonal per head. The recurrent vectors are norm-clipped inside the cell, which bounds
  the Jacobian (the paper's LM runs clip to 0.5). ``paragru_step`` and ``paralstm_step`` are
  their elementwise parts, taking the input projections ``B x + b`` precomputed for all steps.
* ``gru_cell`` and ``tanh_rnn_cell``: classic cells with full recurrent matrices (dense
  Jacobians), to show that any cell works.

Notation: ``σ`` is the logistic sigmoid, ``⊙`` the elementwise product, ``diag(a)`` a diagonal
matrix, ``B x`` the per-head (block-diagonal) input projection.
"""

import functools
import math

import jax
import jax.numpy as jnp

NORM_CLIP = 0.5


def clip_norm(a: jax.Array, max_norm: float = NORM_CLIP) -> jax.Array:
  """Rescales each row ``a_v`` so that ``‖diag(a_v)‖ = max_i |a_v,i| ≤ max_norm``.

  Rescaling (rather than clamping entries) keeps the direction and a gradient for every entry.
  """
  norm = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
  return a * jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(a.dtype).tiny))


def _heads_in(w: jax.Array, x: jax.Array) -> jax.Array:
  """Block-diagonal input projection: ``w [H, I/H, G, S/H]``, ``x [I]`` -> ``[G, S]``."""
  heads, head_in, gates, _ = w.shape
  # One [I/H] x [I/H, G·S/H] product per head, then the gate axis to the front: under vmap over
  # B and T this lowers to a plain batched matmul (about 1.7× faster on CPU than contracting
  # straight into [G, H, S/H]).
  u = jnp.einsum("hi,hij->hj", x.reshape(heads, head_in), w.reshape(heads, head_in, -1))
  return jnp.swapaxes(u.reshape(heads, gates, -1), 0, 1).reshape(gates, -1)


def paragru_cell(params, h: jax.Array, x: jax.Array, *, max_norm: float = NORM_CLIP) -> jax.Array:
  """ParaGRU step (paper §3, diagonal GRU; its Jacobian is diagonal).

    z = σ(a_z ⊙ h + B_z x + b_z)
    r = σ(a_r ⊙ h + B_r x + b_r)
    ĥ = tanh(a_h ⊙ (r ⊙ h) + B_h x + b_h)
    h' = (1 - z) ⊙ h + z ⊙ ĥ

  Args:
    params: ``a [3, D]`` recurrent diagonals (z, r, h; each row norm-clipped to ``max_norm``),
      ``B [H, I/H, 3, D/H]`` per-head input blocks, ``b [3, D]`` biases.
    h: ``[D]``.
    x: ``[I]``.
    max_norm: bound on ``max_i |a_v,i|``.

  Returns:
    ``h' [D]``.
  """
  return paragru_step(params, h, _heads_in(params["B"], x) + params["b"], max_norm=max_norm)


def paragru_step(params, h: jax.Array, u: jax.Array, *, max_norm: float = NORM_CLIP) -> jax.Array:
  """The elementwise part of ``paragru_cell``, given the input projections ``u = B x + b``.

  Layers compute ``u`` for all steps at once, outside the Newton solve, so the iterations only
  redo this elementwise work (as ParaRNN does).

  Args:
    params: ``a [3, D]`` recurrent diagonals (other entries are ignored).
    h: ``[D]``.
    u: ``[3, D]``, the z, r and h pre-activations ``B_v x + b_v``.
    max_norm: bound on ``max_i |a_v,i|``.

  Returns:
    ``h' [D]``.
  """
  a = clip_norm(params["a"], max_norm)
  z = jax.nn.sigmoid(a[0] * h + u[0])
  r = jax.nn.sigmoid(a[1] * h + u[1])
  cand = jnp.tanh(a[2] * (r * h) + u[2])
  return (1.0 - z) * h + z * cand


def paralstm_cell(params, s: jax.Array, x: jax.Array, *, max_norm: float = NORM_CLIP) -> jax.Array:
  """ParaLSTM step: LSTM with coupled input and forget gates (CIFG), diagonal recurrent weights
  and peepholes (paper §3). The state is ``s = [c; h]`` (``D = 2d``); its Jacobian has ``2×2``
  blocks pairing ``(c_i, h_i)``.

    f  = σ(a_f ⊙ h + p_f ⊙ c + B_f x + b_f)
    ĉ  = tanh(a_c ⊙ h + B_c x + b_c)
    c' = f ⊙ c + (1 - f) ⊙ ĉ
    o  = σ(a_o ⊙ h + p_o ⊙ c' + B_o x + b_o)
    h' = o ⊙ tanh(c')

  Args:
    params: ``a [3, d]`` recurrent diagonals (f, o, c), ``p [2, d]`` peepholes (f, o), each row
      norm-clipped to ``max_norm``; ``B [H, I/H, 3, d/H]`` per-head input blocks; ``b [3, d]``.
    s: ``[2d]``, ``[c; h]``.
    x: ``[I]``.
    max_norm: bound on ``max_i |a_v,i|`` and ``max_i |p_v,i|``.

  Returns:
    ``[c'; h'] [2d]``.
  """
  return paralstm_step(params, s, _heads_in(params["B"], x) + params["b"], max_norm=max_norm)


def paralstm_step(params, s: jax.Array, u: jax.Array, *, max_norm: float = NORM_CLIP) -> jax.Array:
  """The elementwise part of ``paralstm_cell``, given the input projections ``u = B x + b``.

  Args:
    params: ``a [3, d]`` recurrent diagonals and ``p [2, d]`` peepholes (other entries are
      ignored).
    s: ``[2d]``, ``[c; h]``.
    u: ``[3, d]``, the f, o and ĉ pre-activations ``B_v x + b_v``.
    max_norm: bound on ``max_i |a_v,i|`` and ``max_i |p_v,i|``.

  Returns:
    ``[c'; h'] [2d]``.
  """
  c, h = jnp.split(s, 2)
  a = clip_norm(params["a"], max_norm)
  p = clip_norm(params["p"], max_norm)
  f = jax.nn.sigmoid(a[0] * h + p[0] * c + u[0])
  cand = jnp.tanh(a[2] * h + u[2])
  c = f * c + (1.0 - f) * cand
  o = jax.nn.sigmoid(a[1] * h + p[1] * c + u[1])
  return jnp.concatenate([c, o * jnp.tanh(c)])


def gru_cell(params, h: jax.Array, x: jax.Array) -> jax.Array:
  """Classic GRU (Cho et al., 2014) with full recurrent matrices; dense Jacobian.

    z = σ(W_z x + U_z h + b_z),  r = σ(W_r x + U_r h + b_r)
    ĥ = tanh(W_h x + U_h (r ⊙ h) + b_h),  h' = (1 - z) ⊙ h + z ⊙ ĥ

  Args:
    params: ``W [3, I, D]``, ``U [3, D, D]``, ``b [3, D]`` (gates z, r, h).
    h: ``[D]``.
    x: ``[I]``.

  Returns:
    ``h' [D]``.
  """
  w, u, b = params["W"], params["U"], params["b"]
  z = jax.nn.sigmoid(x @ w[0] + h @ u[0] + b[0])
  r = jax.nn.sigmoid(x @ w[1] + h @ u[1] + b[1])
  cand = jnp.tanh(x @ w[2] + (r * h) @ u[2] + b[2])
  return (1.0 - z) * h + z * cand


def tanh_rnn_cell(params, h: jax.Array, x: jax.Array) -> jax.Array:
  """Elman RNN ``h' = tanh(W x + U h + b)``; dense Jacobian.

  Args:
    params: ``W [I, D]``, ``U [D, D]``, ``b [D]``.
    h: ``[D]``.
    x: ``[I]``.

  Returns:
    ``h' [D]``.
  """
  return jnp.tanh(x @ params["W"] + h @ params["U"] + params["b"])


# ----------------------------------------------------------------------------------------------
# Initializers: Glorot-uniform input weights, recurrent diagonals uniform in ±max_norm, zero
# biases. Jitted so that one call is one compilation, not one per random op.


def _glorot(key, shape, fan_in, fan_out, dtype):
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def _check_heads(num_heads, **dims):
  for name, dim in dims.items():
    if dim % num_heads:
      raise ValueError(f"{name}: expected a multiple of num_heads={num_heads}, got {dim}")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def init_paragru(key, input_dim: int, state_dim: int, num_heads: int = 1, dtype=jnp.float32):
  """Parameters of ``paragru_cell`` for inputs ``[input_dim]`` and states ``[state_dim]``."""
  _check_heads(num_heads, input_dim=input_dim, state_dim=state_dim)
  ka, kb = jax.random.split(key)
  hi, hs = input_dim // num_heads, state_dim // num_heads
  return {
    "a": jax.random.uniform(ka, (3, state_dim), dtype, -NORM_CLIP, NORM_CLIP),
    "B": _glorot(kb, (num_heads, hi, 3, hs), hi, hs, dtype),
    "b": jnp.zeros((3, state_dim), dtype),
  }


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def init_paralstm(key, input_dim: int, hidden_dim: int, num_heads: int = 1, dtype=jnp.float32):
  """Parameters of ``paralstm_cell``; its state ``[c; h]`` has width ``2 * hidden_dim``."""
  _check_heads(num_heads, input_dim=input_dim, hidden_dim=hidden_dim)
  ka, kp, kb = jax.random.split(key, 3)
  hi, hs = input_dim // num_heads, hidden_dim // num_heads
  return {
    "a": jax.random.uniform(ka, (3, hidden_dim), dtype, -NORM_CLIP, NORM_CLIP),
    "p": jax.random.uniform(kp, (2, hidden_dim), dtype, -NORM_CLIP, NORM_CLIP),
    "B": _glorot(kb, (num_heads, hi, 3, hs), hi, hs, dtype),
    "b": jnp.zeros((3, hidden_dim), dtype),
  }


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_gru(key, input_dim: int, state_dim: int, dtype=jnp.float32):
  """Parameters of ``gru_cell``."""
  kw, ku = jax.random.split(key)
  return {
    "W": _glorot(kw, (3, input_dim, state_dim), input_dim, state_dim, dtype),
    "U": _glorot(ku, (3, state_dim, state_dim), state_dim, state_dim, dtype),
    "b": jnp.zeros((3, state_dim), dtype),
  }


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def init_tanh_rnn(key, input_dim: int, state_dim: int, dtype=jnp.float32):
  """Parameters of ``tanh_rnn_cell``."""
  kw, ku = jax.random.split(key)
  return {
    "W": _glorot(kw, (input_dim, state_dim), input_dim, state_dim, dtype),
    "U": _glorot(ku, (state_dim, state_dim), state_dim, state_dim, dtype),
    "b": jnp.zeros((state_dim,), dtype),
  }
