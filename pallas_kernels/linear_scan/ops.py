"""``linear_scan``: the Pallas diagonal recurrence on ``[B, T, ...]`` arrays, with its gradient.

``pallas_call`` has no autodiff rule, so the gradient is a ``custom_vjp``. For the forward
recurrence ``h_t = a_t h_{t-1} + b_t`` with loss cotangent ``dh``, the adjoint state

    g_t = dh_t + a_{t+1} g_{t+1},   g_{T-1} = dh_{T-1}

is the same recurrence run backwards with ``a`` shifted one step, so it reuses the kernel with
``reverse`` flipped. Then ``da_t = g_t h_{t-1}`` (``h_{-1} = h0``), ``db_t = g_t`` and
``dh0 = a_0 g_0``. The reverse recurrence mirrors this. Residuals are ``a``, ``h`` and ``h0``.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Float

from pallas_kernels.linear_scan import kernel

ScanInputs = Float[jax.Array, "B T *F"]
ScanState = Float[jax.Array, "B *F"]


def linear_scan(
  a: ScanInputs,
  b: ScanInputs,
  h0: ScanState,
  *,
  reverse: bool = False,
  interpret: bool = False,
  block_t: int | None = None,
) -> ScanInputs:
  """Runs ``h_t = a_t * h_{t-1} + b_t`` over axis 1 with a Pallas kernel.

  Axes: ``B`` batch, ``T`` time, then any feature axes ``*F`` (flattened to one inside).

  Args:
    a: decay, ``[B, T, ...]``, fp32.
    b: input, same shape as ``a``.
    h0: ``[B, ...]``, the state before step 0; with ``reverse=True`` the state after step
      ``T-1``.
    reverse: run from ``t = T-1`` down to 0, ``h_t = a_t * h_{t+1} + b_t``.
    interpret: run the Pallas interpreter instead of compiling (needed on CPU).
    block_t: time steps per grid step on TPU and in the interpreter (default 128); GPU always
      runs the whole sequence in one program.

  Returns:
    ``h``, ``[B, T, ...]``: every state, in the promoted dtype of ``a, b, h0`` (at least fp32).
  """
  _validate(a, b, h0, block_t)
  dtype = jnp.promote_types(jnp.result_type(a, b, h0), jnp.float32)
  batch, t = a.shape[:2]
  d = math.prod(a.shape[2:])
  if a.size == 0:  # an empty grid has nothing to run
    return jnp.zeros(a.shape, dtype)
  h = _scan(
    a.astype(dtype).reshape(batch, t, d),
    b.astype(dtype).reshape(batch, t, d),
    h0.astype(dtype).reshape(batch, d),
    reverse,
    interpret,
    block_t,
  )
  return h.reshape(a.shape)


def _validate(a, b, h0, block_t):
  for name, x in (("a", a), ("b", b), ("h0", h0)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")
  if jnp.ndim(a) < 2:
    raise ValueError(f"a: expected rank >= 2 [B, T, ...], got shape {jnp.shape(a)}")
  if jnp.shape(b) != jnp.shape(a):
    raise ValueError(f"b: expected shape {jnp.shape(a)} (the shape of a), got {jnp.shape(b)}")
  want = (a.shape[0], *a.shape[2:])
  if jnp.shape(h0) != want:
    raise ValueError(f"h0: expected shape {want} [B, ...], got {jnp.shape(h0)}")
  if block_t is not None and (not isinstance(block_t, int) or block_t < 1):
    raise ValueError(f"block_t: expected a positive int, got {block_t!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(a, b, h0, reverse, interpret, block_t):
  return kernel.scan_pallas_call(a, b, h0, reverse=reverse, interpret=interpret, block_t=block_t)


def _scan_fwd(a, b, h0, reverse, interpret, block_t):
  h = _scan(a, b, h0, reverse, interpret, block_t)
  return h, (a, h, h0)


def _scan_bwd(reverse, interpret, block_t, res, dh):
  a, h, h0 = res
  zero = jnp.zeros_like(a[:, :1])
  if reverse:
    # g_t = dh_t + a_{t-1} g_{t-1}: a forward recurrence with a shifted one step right.
    a_adj = jnp.concatenate([zero, a[:, :-1]], axis=1)
    h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
  else:
    a_adj = jnp.concatenate([a[:, 1:], zero], axis=1)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  g = kernel.scan_pallas_call(
    a_adj, dh, jnp.zeros_like(h0), reverse=not reverse, interpret=interpret, block_t=block_t
  )
  dh0 = a[:, -1] * g[:, -1] if reverse else a[:, 0] * g[:, 0]
  return g * h_prev, g, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)
