"""jaxrec.ops.rnn_cells against float64 numpy transcriptions of the ParaRNN equations, with the
per-head input projection written as one explicit block-diagonal matrix."""

import jax
import numpy as np
import pytest
from testing_utils import assert_close, cell_atol

from jaxrec.ops import rnn_cells as rc

INPUT, HEADS = 6, 2


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _clip(a, max_norm=0.5):
  norm = np.max(np.abs(a), axis=-1, keepdims=True)
  return a * np.minimum(1.0, max_norm / norm)


def _block_diag_input(w):
  """``[H, I/H, G, S/H]`` -> one dense ``[G, S, I]`` matrix, zero off the head blocks."""
  heads, hi, gates, hs = w.shape
  dense = np.zeros((gates, heads * hs, heads * hi))
  for h in range(heads):
    dense[:, h * hs : (h + 1) * hs, h * hi : (h + 1) * hi] = np.transpose(w[h], (1, 2, 0))
  return dense


def _f64(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def _scaled(params, factor):
  """Recurrent vectors pushed beyond the clip so that clipping is exercised."""
  return dict(params, **{k: factor * params[k] for k in ("a", "p") if k in params})


def test_paragru_matches_numpy():
  params = _scaled(rc.init_paragru(jax.random.key(0), INPUT, 8, HEADS), 3.0)
  rng = np.random.default_rng(0)
  h, x = rng.standard_normal(8).astype(np.float32), rng.standard_normal(INPUT).astype(np.float32)
  got = jax.jit(rc.paragru_cell)(params, h, x)
  p = _f64(params)
  a = _clip(p["a"])
  u = _block_diag_input(p["B"]) @ x + p["b"]
  z = _sigmoid(a[0] * h + u[0])
  r = _sigmoid(a[1] * h + u[1])
  want = (1 - z) * h + z * np.tanh(a[2] * r * h + u[2])
  assert_close(got, want, rtol=0, atol=cell_atol(rc.paragru_cell, params, h, x))


def test_paralstm_matches_numpy():
  params = _scaled(rc.init_paralstm(jax.random.key(1), INPUT, 4, HEADS), 3.0)
  params["b"] = params["b"] + 0.3
  rng = np.random.default_rng(1)
  s, x = rng.standard_normal(8).astype(np.float32), rng.standard_normal(INPUT).astype(np.float32)
  got = jax.jit(rc.paralstm_cell)(params, s, x)
  p = _f64(params)
  a, peep = _clip(p["a"]), _clip(p["p"])
  u = _block_diag_input(p["B"]) @ x + p["b"]
  c, h = s[:4], s[4:]
  f = _sigmoid(a[0] * h + peep[0] * c + u[0])
  c_new = f * c + (1 - f) * np.tanh(a[2] * h + u[2])
  o = _sigmoid(a[1] * h + peep[1] * c_new + u[1])
  want = np.concatenate([c_new, o * np.tanh(c_new)])
  assert_close(got, want, rtol=0, atol=cell_atol(rc.paralstm_cell, params, s, x))


def test_dense_cells_match_numpy():
  rng = np.random.default_rng(2)
  h, x = rng.standard_normal(5).astype(np.float32), rng.standard_normal(INPUT).astype(np.float32)
  p = rc.init_gru(jax.random.key(2), INPUT, 5)
  w, u, b = (np.asarray(p[k], np.float64) for k in ("W", "U", "b"))
  z = _sigmoid(x @ w[0] + h @ u[0] + b[0])
  r = _sigmoid(x @ w[1] + h @ u[1] + b[1])
  want = (1 - z) * h + z * np.tanh(x @ w[2] + (r * h) @ u[2] + b[2])
  assert_close(jax.jit(rc.gru_cell)(p, h, x), want, rtol=0, atol=cell_atol(rc.gru_cell, p, h, x))
  p = rc.init_tanh_rnn(jax.random.key(3), INPUT, 5)
  want = np.tanh(x @ np.asarray(p["W"]) + h @ np.asarray(p["U"]) + np.asarray(p["b"]))
  atol = cell_atol(rc.tanh_rnn_cell, p, h, x)
  assert_close(jax.jit(rc.tanh_rnn_cell)(p, h, x), want, rtol=0, atol=atol)


def test_clip_norm_bounds_rows():
  a = np.array([[0.1, -0.2, 0.3], [2.0, -4.0, 1.0]], np.float32)
  got = np.asarray(rc.clip_norm(a))
  assert_close(got[0], a[0], rtol=1e-7)  # already within the bound: unchanged
  assert_close(got[1], a[1] / 8.0, rtol=1e-7)  # rescaled to max |a| = 0.5
  np.testing.assert_array_equal(rc.clip_norm(np.zeros((1, 3), np.float32)), 0.0)


def test_heads_must_divide_widths():
  with pytest.raises(ValueError, match="input_dim: expected a multiple of num_heads=4, got 6"):
    rc.init_paragru(jax.random.key(0), INPUT, 8, 4)
  with pytest.raises(ValueError, match="hidden_dim: expected a multiple of num_heads=4, got 6"):
    rc.init_paralstm(jax.random.key(0), 8, 6, 4)
