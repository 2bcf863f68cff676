"""jaxrec.ops.mlstm against independent references: a float64 numpy loop for values
(testing_utils.numpy_mlstm), jax.grad of a plain lax.scan (testing_utils.scan_mlstm) for
gradients, and the outputs of mlstm_kernels' PyTorch chunkwise and recurrent forms recorded by
tests/fixtures/make_xlstm_fixtures.py.

Tolerances follow testing_utils' error model for the mLSTM: per element, magnitudes from the
numpy loop over absolute inputs (the output's as a quotient), ``mlstm_chain`` roundings and
``mlstm_exponent_terms`` for the log-weights of each form.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import (
  assert_close,
  mlstm_atols,
  mlstm_chain,
  mlstm_exponent_terms,
  mlstm_gradient_magnitudes,
  numpy_mlstm,
  rounding_atol,
  scan_mlstm,
)

from jaxrec.ops import MLSTMState, mlstm, mlstm_step

FORMS = ["sequential", "parallel", "chunk", "pallas"]
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "xlstm"


def _inputs(b, t, h, key_dim, value_dim, seed=0, gates=4.0):
  """float32 numpy inputs; gate pre-activations uniform in ``±gates`` (forget gates shifted up
  by ``gates / 2`` so that memories last)."""
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, t, h, key_dim), np.float32) for _ in range(2))
  v = rng.standard_normal((b, t, h, value_dim), np.float32)
  i_gate = rng.uniform(-gates, gates, (b, t, h)).astype(np.float32)
  f_gate = rng.uniform(-gates / 2, gates, (b, t, h)).astype(np.float32)
  state = MLSTMState(
    rng.standard_normal((b, h, key_dim, value_dim), np.float32),
    rng.standard_normal((b, h, key_dim), np.float32),
    rng.standard_normal((b, h), np.float32),
  )
  return (q, k, v, i_gate, f_gate), state


def _segments(b, t, seed=0):
  starts = np.random.default_rng(seed + 11).random((b, t)) < 0.1
  return np.cumsum(starts, axis=1).astype(np.int32)


@functools.cache
def _mlstm(method, chunk_size=16):
  return jax.jit(
    functools.partial(mlstm, method=method, chunk_size=chunk_size, output_final_state=True)
  )


def _assert_matches(h, state, h_ref, state_ref, atols):
  """``h`` and the state ``(C, n, m)`` within ``atols`` (four, as ``mlstm_atols`` gives)."""
  for name, x, r, atol in zip("hcnm", (h, *state), (h_ref, *state_ref), atols, strict=True):
    assert_close(x, r, rtol=0.0, atol=atol, err_msg=name)


def _terms(method, args, state, t, key_dim, chunk_size=16):
  """Roundings of one form: its chain and its exponent terms."""
  m0 = None if state is None else state[2]
  return mlstm_chain(method, t, key_dim, chunk_size) + mlstm_exponent_terms(
    method, args[3], args[4], m0, chunk_size
  )


CASES = {
  # name: (B, T, H, K, V, initial state, segments)
  "h0_ragged": (2, 37, 2, 8, 4, True, False),
  "segments": (2, 50, 2, 8, 4, True, True),
  "T1": (1, 1, 1, 4, 4, False, False),
}


@pytest.mark.parametrize("method", FORMS)
@pytest.mark.parametrize("case", CASES)
def test_matches_numpy_reference(method, case):
  b, t, h, key_dim, value_dim, with_h0, with_seg = CASES[case]
  args, state = _inputs(b, t, h, key_dim, value_dim)
  state = state if with_h0 else None
  seg = _segments(b, t) if with_seg else None
  out, final = _mlstm(method)(*args, initial_state=state, segment_ids=seg)
  assert out.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in final)
  atols = mlstm_atols(*args, state, seg, terms=_terms(method, args, state, t, key_dim))
  _assert_matches(out, final, *numpy_mlstm(*args, state, seg), atols)


@pytest.mark.parametrize("method", FORMS)
def test_extreme_gates(method):
  """Gate pre-activations of ±30: exponential input gates of e^{±30} and forget gates from
  e^{-30} to 1 - e^{-30}, with resets; no inf or NaN, and fp32 accuracy."""
  b, t, h, key_dim, value_dim, _, _ = CASES["segments"]
  args, state = _inputs(b, t, h, key_dim, value_dim, seed=3, gates=30.0)
  seg = _segments(b, t, seed=3)
  out, final = _mlstm(method)(*args, initial_state=state, segment_ids=seg)
  assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(x)) for x in final)
  atols = mlstm_atols(*args, state, seg, terms=_terms(method, args, state, t, key_dim))
  _assert_matches(out, final, *numpy_mlstm(*args, state, seg), atols)


def test_bf16_inputs():
  """bf16 inputs (cast to fp32 on entry, the same for every form): fp32 states, bf16 output."""
  args, state = _inputs(2, 37, 2, 8, 4, seed=1)
  args = tuple(jnp.asarray(x, jnp.bfloat16) for x in args)
  exact = tuple(np.asarray(x, np.float32) for x in args)  # bf16 values, exactly
  h_ref, final_ref = numpy_mlstm(*exact, state)
  for method in FORMS:
    out, final = _mlstm(method)(*args, initial_state=state)
    assert out.dtype == jnp.bfloat16 and final.c.dtype == jnp.float32
    # fp32 arithmetic on the bf16 values; only the output is rounded to bf16.
    h_atol, *state_atols = mlstm_atols(*exact, state, terms=_terms(method, exact, state, 37, 8))
    h_atol = h_atol + rounding_atol(np.abs(h_ref), terms=1, dtype=jnp.bfloat16)
    _assert_matches(out, final, h_ref, final_ref, (h_atol, *state_atols))


def test_gradients_match_scan_reference():
  b, t, h = 2, 24, 2
  args, state = _inputs(b, t, h, 8, 4, seed=2)
  seg = _segments(b, t, seed=2)
  rng = np.random.default_rng(7)
  w_h = rng.standard_normal((b, t, h, 4), np.float32)
  seg[:, 16:] += 1  # a reset on a chunk edge
  w_c, w_n = (rng.standard_normal(x.shape, np.float32) for x in state[:2])

  def loss(fn, *xs):
    out, (c, n, _) = fn(*xs)
    return jnp.sum(w_h * out) + jnp.sum(w_c * c) + jnp.sum(w_n * n)

  argnums = tuple(range(8))
  ref = jax.jit(jax.grad(lambda *a: loss(lambda *x: scan_mlstm(*x[:5], x[5:], seg), *a), argnums))(
    *args, *state
  )
  magnitudes = mlstm_gradient_magnitudes(args, state, seg, (w_h, w_c, w_n))
  # The Pallas form's gradients: tests/pallas_kernels/mlstm_test.py, against the same reference.
  for method in ("sequential", "parallel", "chunk"):

    def fn(*x, m=method):
      return _mlstm(m)(*x[:5], initial_state=MLSTMState(*x[5:]), segment_ids=seg)

    got = jax.jit(jax.grad(lambda *a, f=fn: loss(f, *a), argnums))(*args, *state)
    # Two computations (the form, the scan), each a forward and a backward chain.
    terms = 2 * (_terms(method, args, state, t, 8) + _terms("sequential", args, state, t, 8))
    names = ("q", "k", "v", "i_gate", "f_gate", "c0", "n0", "m0")
    for name, x, r, m in zip(names, got, ref, magnitudes, strict=True):
      assert np.all(np.isfinite(x)), (method, name)
      atol = rounding_atol(m, terms=terms)
      assert_close(x, r, rtol=0.0, atol=atol, err_msg=f"{method} {name}")


@pytest.mark.parametrize("method", ["chunk", "pallas"])
def test_split_sequence_with_state_passing(method):
  """Two calls with the state handed over equal one pass, a segment live at the cut included
  (the chunked forms, whose stabilizer is carried between chunks)."""
  args, state = _inputs(2, 50, 2, 8, 4, seed=4)
  seg = np.zeros((2, 50), np.int32)
  seg[:, 7:] += 1
  seg[:, 30:] += 1
  seg[1, 12:] += 1
  cut = 21
  out, final = _mlstm(method)(*args, initial_state=state, segment_ids=seg)
  first = tuple(x[:, :cut] for x in args)
  second = tuple(x[:, cut:] for x in args)
  out_a, state_a = _mlstm(method)(*first, initial_state=state, segment_ids=seg[:, :cut])
  out_b, state_b = _mlstm(method)(*second, initial_state=state_a, segment_ids=seg[:, cut:])
  # Two computations, neither with a longer chain or span than one pass.
  atols = mlstm_atols(*args, state, seg, terms=2 * _terms(method, args, state, 50, 8))
  _assert_matches(np.concatenate([out_a, out_b], axis=1), state_b, out, final, atols)


def test_step_matches_full_sequence():
  t = 9
  args, state = _inputs(2, t, 3, 8, 4, seed=5)
  out, final = _mlstm("chunk")(*args, initial_state=state)
  terms = _terms("chunk", args, state, t, 8) + _terms("sequential", args, state, t, 8)
  atols = mlstm_atols(*args, state, terms=terms)
  step = jax.jit(mlstm_step)
  outs = []
  for s in range(t):
    o, state = step(*(x[:, s] for x in args), state)
    outs.append(o)
  assert all(x.dtype == jnp.float32 for x in state)
  _assert_matches(np.stack(outs, axis=1), state, out, final, atols)


def test_long_sequence_chunk_form():
  """T = 65536 in chunks: the stabilizer carried over 1024 chunks keeps every exponent <= 0.
  (Against the sequential form, which the other tests check against the float64 loop, too slow
  in numpy at this length.)"""
  t = 65536
  args, state = _inputs(1, t, 1, 4, 4, seed=6)
  out, final = _mlstm("chunk", chunk_size=64)(*args, initial_state=state)
  assert np.all(np.isfinite(out))
  # Roundings made every step (every chunk), against the accumulated magnitudes (each step's
  # carried forward by the forget gates): the sequential form's five and two of its exponent
  # (terms up to max|log f| + |ĩ| + 2|m|); a chunk state's two and the carried stabilizer's (a
  # chunk's Σ|log f| + |ĩ| + 2|m|). Made once, against the magnitudes: the in-chunk sums and
  # exponents of one chunk, the readouts.
  i_gate, f_gate = args[3:]
  log_f = np.logaddexp(0.0, -f_gate.astype(np.float64))
  gates = np.max(np.abs(i_gate)) + 2 * max(np.max(np.abs(i_gate)), np.max(np.abs(state[2])))
  window = np.max(np.convolve(log_f[0, :, 0], np.ones(64), mode="valid"))
  per_step = 5 + 2 * (np.max(log_f) + gates) + 2 + 2 * (window + gates)
  once = 2 * 64 * (1 + window) + 2 * (2 * 4 + 8)
  atols = [
    a + b
    for a, b in zip(
      mlstm_atols(*args, state, terms=per_step, accumulated=True),
      mlstm_atols(*args, state, terms=once),
      strict=True,
    )
  ]
  _assert_matches(out, final, *_mlstm("sequential")(*args, initial_state=state), atols)


@pytest.mark.parametrize("method", FORMS)
def test_matches_mlstm_kernels(method):
  """The same random inputs as mlstm_kernels' native PyTorch chunkwise and recurrent forms
  (``[B, H, T, D]`` there), outputs and final states, fp32 within 1e-4."""
  data = np.load(FIXTURES / "mlstm_kernels.npz")
  heads_last = functools.partial(np.swapaxes, axis1=1, axis2=2)
  args = tuple(heads_last(data[name]) for name in ("q", "k", "v", "i", "f"))
  state = MLSTMState(data["c0"], data["n0"], data["m0"])
  out, final = _mlstm(method)(*args, initial_state=state)
  # Two fp32 computations; the peer's counted as the sequential form (the longest chain, span).
  t, key_dim = args[0].shape[1], args[0].shape[-1]
  terms = _terms(method, args, state, t, key_dim) + _terms("sequential", args, state, t, key_dim)
  atols = mlstm_atols(*args, state, terms=terms)
  for peer in ("chunkwise", "recurrent"):
    ref = [data[f"{peer}_{name}"] for name in "hcnm"]
    _assert_matches(out, final, heads_last(ref[0]), ref[1:], atols)


def _bad(**overrides):
  b, t, h, key_dim, value_dim = 2, 5, 3, 4, 6
  args = {
    "q": np.zeros((b, t, h, key_dim)),
    "k": np.zeros((b, t, h, key_dim)),
    "v": np.zeros((b, t, h, value_dim)),
    "i_gate": np.zeros((b, t, h)),
    "f_gate": np.zeros((b, t, h)),
  }
  args.update({k: v for k, v in overrides.items() if k in args})
  kwargs = {k: v for k, v in overrides.items() if k not in args}
  return args, kwargs


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"q": np.zeros((2, 5, 4))}, r"q: expected rank 4 \[B, T, H, K\], got shape \(2, 5, 4\)"),
    ({"k": np.zeros((2, 5, 3, 5))}, r"k: expected shape \(2, 5, 3, 4\)"),
    ({"v": np.zeros((2, 4, 3, 6))}, r"v: expected shape \(2, 5, 3, 6\)"),
    ({"i_gate": np.zeros((2, 5, 3, 1))}, r"i_gate: expected shape \(2, 5, 3\) \[B, T, H\]"),
    ({"f_gate": np.zeros((2, 5), np.float32)}, r"f_gate: expected shape \(2, 5, 3\)"),
    ({"f_gate": np.zeros((2, 5, 3), np.int32)}, r"f_gate: expected a floating dtype, got int32"),
    ({"method": "fast"}, r"method: expected one of .*got 'fast'"),
    ({"chunk_size": 48}, r"chunk_size: expected a positive power of two, got 48"),
    ({"eps": -1.0}, r"eps: expected a non-negative number, got -1.0"),
    ({"initial_state": (np.zeros((2, 3, 4, 6)),)}, r"initial_state: expected an MLSTMState"),
    (
      {"initial_state": MLSTMState(np.zeros((2, 3, 4, 6)), np.zeros((2, 3, 4)), np.zeros((2,)))},
      r"initial_state.m: expected shape \(2, 3\) \[B, H\], got \(2,\)",
    ),
    ({"segment_ids": np.zeros((2, 4), np.int32)}, r"segment_ids: expected shape \(2, 5\)"),
  ],
)
def test_validation_errors(overrides, match):
  args, kwargs = _bad(**overrides)
  with pytest.raises(ValueError, match=match):
    mlstm(**args, **kwargs)


def test_step_validation_errors():
  state = MLSTMState(np.zeros((2, 3, 4, 6)), np.zeros((2, 3, 4)), np.zeros((2, 3)))
  args = dict(
    q=np.zeros((2, 3, 4)), k=np.zeros((2, 3, 4)), v=np.zeros((2, 3, 6)), i_gate=np.zeros((2, 3))
  )
  with pytest.raises(ValueError, match=r"f_gate: expected shape \(2, 3\) \[B, H\]"):
    mlstm_step(**args, f_gate=np.zeros((2, 3, 1)), state=state)
  with pytest.raises(ValueError, match=r"state.c: expected shape \(2, 3, 4, 6\)"):
    mlstm_step(**args, f_gate=np.zeros((2, 3)), state=state._replace(c=np.zeros((2, 3, 6, 4))))
