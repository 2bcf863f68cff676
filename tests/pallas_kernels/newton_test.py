"""The fused Newton kernel (interpret mode) against the XLA Newton path after the same number of
iterations, against a sequential lax.scan of the cells written here (testing_utils) once
converged, and gradients of newton_rnn(method="pallas") against jax.grad of that scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import assert_close, max_abs, newton_atol
from testing_utils import sequential_rnn as _reference

from jaxrec.ops import newton_rnn
from jaxrec.ops import rnn_cells as rc
from pallas_kernels.newton import newton_solve

# T = 37 steps in time blocks of 16: three blocks, the last one ragged. Channel blocks of 2 or 4
# leave the last channel block padded too.
BATCH, T, BLOCK_T = 2, 37, 16


def _paragru(params, h, u):
  """ParaGRU with the input projections u [3, D] precomputed: elementwise over channels."""
  a = params["a"]
  z = jax.nn.sigmoid(a[0] * h + u[0])
  r = jax.nn.sigmoid(a[1] * h + u[1])
  return (1.0 - z) * h + z * jnp.tanh(a[2] * (r * h) + u[2])


def _paralstm(params, s, u):
  """ParaLSTM (CIFG, peepholes) on a stacked [c; h] state, projections u [3, d] precomputed."""
  c, h = jnp.split(s, 2)
  a, p = params["a"], params["p"]
  f = jax.nn.sigmoid(a[0] * h + p[0] * c + u[0])
  c = f * c + (1.0 - f) * jnp.tanh(a[2] * h + u[2])
  o = jax.nn.sigmoid(a[1] * h + p[1] * c + u[1])
  return jnp.concatenate([c, o * jnp.tanh(c)])


def _rotation(params, h, u):
  """Adjacent pairs (h_2i, h_2i+1) rotate by θ_i under a tanh: 2×2 interleaved blocks. The
  inputs u [2, d] and the gain (0-d, shared by all channels) are per channel as well."""
  pairs = h.reshape(-1, 2)
  cos, sin = jnp.cos(params["theta"]), jnp.sin(params["theta"])
  rotated = jnp.stack(
    [cos * pairs[:, 0] - sin * pairs[:, 1], sin * pairs[:, 0] + cos * pairs[:, 1]]
  )
  return jnp.tanh(params["gain"] * rotated + u).T.reshape(-1)


# name: (cell, k, layout, channels d, channel block)
CELLS = {
  "paragru": (_paragru, 1, "stacked", 6, 4),
  "paralstm": (_paralstm, 2, "stacked", 3, 2),
  "rotation": (_rotation, 2, "interleaved", 3, 2),
}


@functools.cache
def _problem(name):
  """(params, xs, h0); recurrent weights up to 1.5, three times ParaRNN's clip, so that Newton
  needs several iterations."""
  rng = np.random.default_rng(len(name))
  _, k, _, d, _ = CELLS[name]
  uniform = lambda *shape: rng.uniform(-1.5, 1.5, shape).astype(np.float32)
  if name == "rotation":
    params = {"theta": uniform(d), "gain": np.float32(1.2)}
    xs = rng.standard_normal((BATCH, T, 2, d)).astype(np.float32)
  else:
    params = {"a": uniform(3, d)} | ({"p": uniform(2, d)} if k == 2 else {})
    xs = rng.standard_normal((BATCH, T, 3, d)).astype(np.float32)
  h0 = 0.5 * rng.standard_normal((BATCH, k * d)).astype(np.float32)
  return params, jnp.asarray(xs), jnp.asarray(h0)


def _solve(name, num_iters, **kwargs):
  """newton_solve under jit (the elementwise probe then runs on traced arguments)."""
  cell, k, layout, _, block_f = CELLS[name]
  solve = functools.partial(
    newton_solve, cell, num_iters=num_iters, block_size=k, layout=layout, block_t=BLOCK_T,
    block_f=block_f, interpret=True, **kwargs,
  )  # fmt: skip
  return jax.jit(solve)(*_problem(name))


@pytest.mark.parametrize(
  ("name", "damping"), [("paragru", None), ("paralstm", None), ("paralstm", 0.5)]
)
def test_fused_iterations_match_xla_newton(name, damping):
  """n fused iterations (time blocks carried across grid steps) equal n XLA Newton iterations."""
  cell, _, _, _, _ = CELLS[name]
  params, xs, h0 = _problem(name)
  got = _solve(name, 2, damping=damping, time_blocks_per_program=1)
  with pytest.warns(RuntimeWarning, match="did not converge"):
    want, info = newton_rnn(cell, params, xs, h0, max_iters=2, damping=damping, fallback=None)
    jax.effects_barrier()
  assert np.all(info.iterations == 2)  # no early stop in XLA either
  # Two implementations of the same two iterations, each a cell evaluation and a linearized
  # update rounded differently, carried through the Jacobians along the iterate.
  atol = newton_atol(cell, params, xs, h0, want, newton_steps=2 * 2)
  assert_close(got, want, rtol=0, atol=atol)
  # Two iterations are far from the solution: the comparison above is not of two converged runs.
  assert np.max(np.abs(got - _reference(cell, params, xs, h0))) > 1e-3


@pytest.mark.parametrize("name", list(CELLS))
def test_converged_matches_sequential(name):
  """Converged, with two time blocks per program (a loop inside and a carry across programs)."""
  cell, _, _, _, _ = CELLS[name]
  params, xs, h0 = _problem(name)
  got = _solve(name, 8, time_blocks_per_program=2)
  ref = _reference(cell, params, xs, h0)
  # Newton corrects the rounding of earlier iterates: after 8 iterations of a quadratically
  # converging solve only the last one's remains (a cell evaluation and a linearized update).
  assert_close(got, ref, rtol=0, atol=newton_atol(cell, params, xs, h0, ref, newton_steps=1))


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_newton_rnn_pallas_gradients(name):
  cell, _, _, _, _ = CELLS[name]
  params, xs, h0 = _problem(name)
  weights = jnp.asarray(np.random.default_rng(9).standard_normal((BATCH, T, h0.shape[1])))

  def loss(solve):
    def f(p, x, h):
      h, info = solve(p, x, h)
      return jnp.sum(weights * jnp.sin(h)), (h, info)

    return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))

  pallas = lambda p, x, h: newton_rnn(cell, p, x, h, method="pallas")
  reference = lambda p, x, h: (_reference(cell, p, x, h), None)
  (_, (h, info)), got = loss(pallas)(params, xs, h0)
  (_, (h_ref, _)), want = loss(reference)(params, xs, h0)
  assert np.all(info.converged) and not np.any(info.fallback), info
  assert np.all(info.iterations == 10)
  assert_close(h, h_ref, rtol=0, atol=newton_atol(cell, params, xs, h0, h_ref, tol=info.tol))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    # As testing_utils.assert_rnn_grads_match: the converged states' error times the curvature.
    assert_close(g, w, rtol=1e-4, atol=1e-4 * max_abs(w))


@pytest.mark.parametrize("name", ["paragru", "paralstm"])
def test_lowers_for_tpu(name):
  """The kernel body, cell and JVP included, is expressible in Mosaic (lowered, not compiled)."""
  cell, k, layout, _, _ = CELLS[name]
  params, xs, h0 = _problem(name)
  solve = functools.partial(
    newton_solve, cell, num_iters=3, block_size=k, layout=layout, interpret=False
  )
  lowered = jax.jit(solve).trace(params, xs, h0).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


def test_pallas_rejects_unsupported_cells():
  params, xs, h0 = _problem("paragru")
  clipped = lambda p, h, u: _paragru({"a": rc.clip_norm(p["a"])}, h, u)
  with pytest.raises(ValueError, match=r"cell: expected a cell elementwise .* params\['a'\]"):
    newton_rnn(clipped, params, xs, h0, method="pallas")
  mixed = lambda p, h, u: _paragru(p, h, u + jnp.mean(u, axis=-1, keepdims=True))
  with pytest.raises(ValueError, match=r"mixes channels through xs"):
    newton_rnn(mixed, params, xs, h0, method="pallas")
  gru = rc.init_gru(jax.random.key(0), 6, 6)
  with pytest.raises(ValueError, match="method: 'pallas' needs a diagonal or 2x2-block"):
    newton_rnn(rc.gru_cell, gru, xs[:, :, 0], h0, method="pallas")
  with pytest.raises(ValueError, match=r"params\['a'\]: expected a last \(channel\) axis of size"):
    newton_solve(_paragru, {"a": params["a"][:, :4]}, xs, h0, num_iters=1)
