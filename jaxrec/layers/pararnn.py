"""ParaGRU and ParaLSTM token mixers (Danieli et al., "ParaRNN", arXiv 2510.21450): nonlinear RNNs
with diagonal recurrences, trained in parallel over the sequence by Newton's method
(``jaxrec.ops.newton_rnn``) and decoded from an O(1) state.

The block follows the paper's RNN block (its Fig. 9) without the short causal convolution, so the
decoding state is the RNN state alone:

  [x'; g] = W_in x                                   (dense, D -> 2N)
  u_t     = B silu(x'_t) + b                          (block-diagonal per head, all t at once)
  h_t     = cell(h_{t-1} ⊙ (1 - reset_t), u_t)        (Newton-parallel over t)
  y       = W_o (RMSNorm(h) ⊙ silu(g))

The projections ``u`` depend on the input only, so they are computed once for the whole sequence
and handed to the solver as its ``x_t``: each Newton iteration re-evaluates only the elementwise
cell (``jaxrec.ops.rnn_cells.paragru_step`` / ``paralstm_step``), as ParaRNN does. ``reset_t`` is 1
where a packed document starts, which zeroes the previous state there; the cell's Jacobian keeps
its structure (diagonal, or ``2×2`` blocks for the LSTM's ``[c; h]``).

Every solve reports how it went as metrics (``jaxrec.layers.observe``): ``newton/iterations``,
the mean over the rows of ``NewtonInfo.iterations``, and ``newton/fallback``, the fraction of rows
recomputed by the sequential scan. The train step logs them (averaged over the layers), and
``experiments/pararnn_lm.py`` reads them per layer.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers import _checks, observe
from jaxrec.layers._params import logical_param
from jaxrec.layers.linear import Dense
from jaxrec.layers.norms import RMSNorm
from jaxrec.ops import NewtonInfo, newton_rnn, rnn_cells, segment_starts
from jaxrec.typing import Activations, RNNState, RNNStates, SegmentIds

_GATES = 3  # GRU: z, r, ĥ; LSTM-CIFG: f, o, ĉ (the order of rnn_cells)


class ParaRNNCache(NamedTuple):
  """The recurrent state, ``[B, S]`` fp32 (``S = N`` for ParaGRU, ``2N`` for ParaLSTM's
  ``[c; h]``): O(1) in the sequence length."""

  state: RNNState


# Cells for newton_rnn: x_t = (u_t [3, N], reset_t []). Module-level functions, so every call
# hits the same compilation of newton_rnn's inner jit.


def _gru_cell(params, h, x):
  u, reset = x
  return rnn_cells.paragru_step(params, h * (1.0 - reset), u)


def _lstm_cell(params, s, x):
  u, reset = x
  return rnn_cells.paralstm_step(params, s * (1.0 - reset), u)


def _uniform(limit: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class _HeadwiseDense(nnx.Module):
  """``u = B x + b`` with one ``[I/H, G, S/H]`` block per head: ``x [..., H, I/H]`` ->
  ``u [..., G, H, S/H]``, in fp32 (it feeds the fp32 Newton solve).

  The kernel is fan-in scaled (the paper initializes B Kaiming-uniform), so the gates see O(1)
  pre-activations.
  """

  def __init__(self, heads, head_in, gates, head_out, *, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(head_in**-0.5)
    shape = (heads, head_in, gates, head_out)
    names = ("heads", None, None, "head_dim")
    self.kernel = logical_param(init, rngs.params(), shape, param_dtype, names)
    zeros = nnx.initializers.zeros_init()
    names = (None, "heads", "head_dim")
    self.bias = logical_param(zeros, rngs.params(), (gates, heads, head_out), param_dtype, names)

  def __call__(self, x: jax.Array) -> jax.Array:
    f32 = jnp.float32
    u = jnp.einsum("...hi,higj->...ghj", x.astype(f32), self.kernel[...].astype(f32))
    return u + self.bias[...].astype(f32)


class _ParaRNN(nnx.Module):
  """The block of the module docstring; subclasses choose the cell.

  Args:
    d_model: width ``D`` of the input and output, and the state width ``N``.
    num_heads: heads ``H`` of the block-diagonal input projection ``B`` (a divisor of
      ``d_model``); the recurrence itself is elementwise.
    max_iters: Newton iterations at most; sequences not converged by then are recomputed by the
      sequential scan, so this trades speed, never accuracy.
    norm_eps: epsilon of the output RMSNorm.
    init_std: standard deviation of the input and gate projections.
    num_layers: depth of the model; the output projection starts at
      ``init_std / sqrt(2 num_layers)`` (as ``MLP``).
    dtype: compute dtype of the projections; the output comes back in it. The cell, its state
      and the Newton solve are fp32.
    param_dtype: parameter storage dtype.
    rngs: the ``params`` stream.
  """

  _CELL = None  # newton_rnn cell, (params, s_prev [S], (u [3, N], reset [])) -> s [S]
  _JACOBIAN = ""  # its Jacobian structure, as newton_rnn's `jacobian`
  _STATE_FACTOR = 1  # S = _STATE_FACTOR · N
  _PEEPHOLES = False

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    max_iters: int = 10,
    norm_eps: float = 1e-6,
    init_std: float = 0.02,
    num_layers: int = 1,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dtype, param_dtype = _checks.check_mixer_args(
      d_model, num_heads, init_std, num_layers, dtype, param_dtype
    )
    if d_model % num_heads:
      raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
    _checks.check_positive_int("max_iters", max_iters)
    _checks.check_positive("norm_eps", norm_eps, allow_zero=True)
    d = n = d_model
    h = num_heads
    self.width, self.num_heads, self.max_iters = n, h, max_iters
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    names = ("embed", "heads", "head_dim")
    self.in_proj = Dense(d, (h, n // h), names, std=init_std, **kw)
    self.gate_proj = Dense(d, (h, n // h), names, std=init_std, **kw)
    self.cell_proj = _HeadwiseDense(h, n // h, _GATES, n // h, param_dtype=param_dtype, rngs=rngs)
    # Recurrent diagonals (and LSTM peepholes) uniform in ±0.5, the clipping bound of the cell.
    # They are the gates' memory, not projections: weight decay would pull them towards a cell
    # that ignores its state, so they opt out of it (see train.optim.weight_decay_mask).
    diag = _uniform(rnn_cells.NORM_CLIP)
    names = (None, "heads", "head_dim")
    self.recurrent = logical_param(
      diag, rngs.params(), (_GATES, h, n // h), param_dtype, names, weight_decay=False
    )
    if self._PEEPHOLES:
      self.peephole = logical_param(
        diag, rngs.params(), (2, h, n // h), param_dtype, names, weight_decay=False
      )
    self.out_norm = RMSNorm(n, eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out_std = init_std / math.sqrt(2 * num_layers)
    self.out_proj = Dense((h, n // h), d, ("heads", "head_dim", "embed"), std=out_std, **kw)

  def __call__(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    cache: ParaRNNCache | None = None,
  ) -> tuple[Activations, ParaRNNCache | None]:
    """Mixes ``x [B, T, D]``; a cache is the state before ``x`` and comes back advanced. A
    Newton solve (``T > 1``, or no cache) sows its ``newton/*`` metrics."""
    u, reset = self._inputs(x, segment_ids)
    if cache is not None and x.shape[1] == 1:
      # Decoding: one step of the cell, no Newton solve; a single token never starts a segment.
      step = jax.vmap(self._CELL, in_axes=(None, 0, 0))
      state = step(self._cell_params(), cache.state, (u[:, 0], reset[:, 0]))
      states, cache = state[:, None], ParaRNNCache(state)
    else:
      initial = None if cache is None else cache.state
      states, info = self._solve(u, reset, initial)
      newton = {
        "newton/iterations": jnp.mean(info.iterations),
        "newton/fallback": jnp.mean(info.fallback),
      }
      observe.sow(self, observe.METRICS, newton)
      cache = None if cache is None else ParaRNNCache(states[:, -1])
    h = states[..., -self.width :]  # ParaLSTM: the h half of [c; h]
    o = self.out_norm(h).reshape(*h.shape[:2], self.num_heads, -1)
    return self.out_proj(o * jax.nn.silu(self.gate_proj(x))), cache

  def recurrence(
    self,
    x: Activations,
    *,
    segment_ids: SegmentIds | None = None,
    initial_state: RNNState | None = None,
  ) -> tuple[RNNStates, NewtonInfo]:
    """The cell states over ``x [B, T, D]`` and the solver's diagnostics.

    Args:
      x: the mixer's input ``[B, T, D]``.
      segment_ids: int ``[B, T]``; the state is reset wherever the id changes.
      initial_state: ``[B, S]`` fp32, the state before ``x``; zeros when ``None``.

    Returns:
      ``(s [B, T, S] fp32, NewtonInfo)``; ``S = N``, or ``2N`` for ParaLSTM's ``[c; h]``.
    """
    return self._solve(*self._inputs(x, segment_ids), initial_state)

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype) -> ParaRNNCache:
    """A zero state; ``max_length`` and ``dtype`` do not matter, the state is always fp32."""
    del max_length, dtype
    return ParaRNNCache(jnp.zeros((batch_size, self._STATE_FACTOR * self.width), jnp.float32))

  def _cell_params(self):
    params = {"a": self.recurrent[...].astype(jnp.float32).reshape(_GATES, self.width)}
    if self._PEEPHOLES:
      params["p"] = self.peephole[...].astype(jnp.float32).reshape(2, self.width)
    return params

  def _inputs(self, x, segment_ids):
    """The solver's inputs for every step: ``u [B, T, 3, N]`` and ``reset [B, T]``, fp32."""
    b, t = x.shape[:2]
    # The only work on x_t: done once here, never inside the Newton iterations.
    u = self.cell_proj(jax.nn.silu(self.in_proj(x))).reshape(b, t, _GATES, self.width)
    if segment_ids is None:
      reset = jnp.zeros((b, t), jnp.float32)
    else:
      # 1 where a new document starts; step 0 continues the given state (a cache, or zeros).
      reset = segment_starts(segment_ids).astype(jnp.float32)
    return u, reset

  def _solve(self, u, reset, initial_state):
    b = u.shape[0]
    if initial_state is None:
      initial_state = jnp.zeros((b, self._STATE_FACTOR * self.width), jnp.float32)
    return newton_rnn(
      self._CELL,
      self._cell_params(),
      (u, reset),
      initial_state,
      jacobian=self._JACOBIAN,
      max_iters=self.max_iters,
    )


class ParaGRU(_ParaRNN):
  """ParaGRU: the GRU with diagonal recurrent weights (``rnn_cells.paragru_step``); diagonal
  Jacobian, state ``[B, N]``. Built as ``ParaGRU(d_model, num_heads, *, max_iters, norm_eps,
  init_std, num_layers, dtype, param_dtype, rngs)`` (arguments: ``_ParaRNN``)."""

  _CELL = staticmethod(_gru_cell)
  _JACOBIAN = "diagonal"


class ParaLSTM(_ParaRNN):
  """ParaLSTM: the LSTM with coupled input and forget gates (CIFG), diagonal recurrent weights
  and peepholes (``rnn_cells.paralstm_step``); state ``[c; h]`` ``[B, 2N]`` whose Jacobian has
  ``2×2`` blocks of diagonals. Built with the arguments of ``ParaGRU``."""

  _CELL = staticmethod(_lstm_cell)
  _JACOBIAN = "block"
  _STATE_FACTOR = 2
  _PEEPHOLES = True
