"""The test toolkit (on sys.path via setup.cfg's pythonpath): one closeness check, and the
independent reference forms that several test files compare against, written once.

The references are deliberately plain: one step at a time, a ``lax.scan`` or a float64 numpy
loop, with segment resets derived here from ``segment_ids`` rather than by the library.
"""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def assert_close(actual, desired, *, rtol: float, atol: float = 0.0, err_msg: str = "") -> None:
  """Asserts ``|actual - desired| <= atol + rtol * |desired|`` elementwise (numpy's metric).

  Both sides are compared in float64 and must have the same shape. A NaN never passes; an
  infinity passes only against the same infinity. On failure the message reports the worst
  absolute error and the worst error relative to ``|desired|``.

  For a tolerance relative to the scale of the whole reference, pass
  ``atol=tol * max_abs(desired)``.
  """
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, f"{err_msg}: shape {actual.shape} != {desired.shape}"
  np.testing.assert_allclose(
    actual, desired, rtol=rtol, atol=atol, equal_nan=False, err_msg=err_msg
  )


def max_abs(x) -> float:
  """``max |x|`` in float64: the scale of a reference, for ``atol``."""
  return float(np.max(np.abs(np.asarray(x, np.float64))))


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


def sequential_rnn(cell, params, xs, h0):
  """``h_t = cell(params, h_{t-1}, x_t)`` one sequence at a time by ``lax.scan``: the reference
  for every Newton solve. ``xs [B, T, ...]``, ``h0 [B, D]`` -> ``h [B, T, D]``."""

  def one(x, h):
    def step(h, x_t):
      h = cell(params, h, x_t)
      return h, h

    return jax.lax.scan(step, h, x)[1]

  return jax.vmap(one)(xs, h0)


def assert_rnn_grads_match(solve, cell, params, xs, h0, weights, *, rtol=1e-4):
  """Gradients w.r.t. ``params``, ``xs`` and ``h0`` of ``sum(weights * sin(h))`` with
  ``h = solve(params, xs, h0)`` against ``jax.grad`` through ``sequential_rnn``: every leaf
  within ``rtol``, with ``atol = rtol * max |reference leaf|``."""

  def grads(f):
    loss = lambda p, x, h: jnp.sum(weights * jnp.sin(f(p, x, h)))
    return jax.jit(jax.grad(loss, (0, 1, 2)))(params, xs, h0)

  got = grads(solve)
  want = grads(lambda p, x, h: sequential_rnn(cell, p, x, h))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(g, w, rtol=rtol, atol=rtol * max_abs(w))


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
  q, k, v, k_enc=None, v_enc=None, prefix_len=0, segment_ids=None, h0=None, eps=1e-12
):
  """Normalized linear attention with the Taylor map, written as explicit weights in float64:
  ``y_i = Σ_j w_ij v_j / Σ_j w_ij`` with ``w_ij = φ(q_i)·φ(k_j)`` for the earlier tokens of the
  same document, plus ``φ(q_i)·φ(k_enc,j)`` (values ``v_enc``) for the first ``prefix_len`` tokens
  of that document, before or after ``i``. ``h0 [B, H, F', V + 1]`` (numerator columns, then the
  normalizer) feeds the first document. Based is ``prefix_len=0``."""
  phi_q, phi_k = numpy_taylor_features(q), numpy_taylor_features(k)
  v = np.asarray(v, np.float64)
  batch, t, heads, _ = q.shape
  doc = np.zeros((batch, t), int) if segment_ids is None else np.asarray(segment_ids)
  y = np.zeros(v.shape)
  for b in range(batch):
    starts = [0] + [i for i in range(1, t) if doc[b, i] != doc[b, i - 1]]
    run = np.searchsorted(starts, np.arange(t), side="right") - 1
    offset = np.arange(t) - np.asarray(starts)[run]
    for i in range(t):
      for h in range(heads):
        num, den = np.zeros(v.shape[-1]), 0.0
        if h0 is not None and run[i] == 0:
          s0 = np.asarray(h0[b, h], np.float64)
          num, den = phi_q[b, i, h] @ s0[:, :-1], phi_q[b, i, h] @ s0[:, -1]
        for j in range(t):
          if run[j] != run[i]:
            continue
          if j <= i:
            w = phi_q[b, i, h] @ phi_k[b, j, h]
            num, den = num + w * v[b, j, h], den + w
          if offset[j] < prefix_len:
            w = phi_q[b, i, h] @ numpy_taylor_features(k_enc[b, j, h])
            num, den = num + w * np.asarray(v_enc[b, j, h], np.float64), den + w
        y[b, i, h] = num / (den + eps)
  return y


def numpy_mlstm(q, k, v, i_gate, f_gate, state=None, segment_ids=None, eps=1e-6):
  """The stabilized mLSTM (``jaxrec.ops.mlstm``'s docstring) in float64, one step at a time; the
  forget gate is shut where ``segment_ids`` changes. ``[B, T, H, ...]`` inputs, ``state`` a
  ``(C, n, m)`` tuple (zeros when ``None``); returns ``(h, (C, n, m))``."""
  q, k, v, i_gate, f_gate = (np.asarray(x, np.float64) for x in (q, k, v, i_gate, f_gate))
  batch, t, heads, key_dim = q.shape
  if state is None:
    c = np.zeros((batch, heads, key_dim, v.shape[-1]))
    n, m = np.zeros((batch, heads, key_dim)), np.zeros((batch, heads))
  else:
    c, n, m = (np.array(x, np.float64) for x in state)
  log_f = -np.logaddexp(0.0, -f_gate)
  h = np.zeros(v.shape)
  for s in range(t):
    carried = log_f[:, s] + m
    if segment_ids is not None and s > 0:
      carried[np.asarray(segment_ids)[:, s] != np.asarray(segment_ids)[:, s - 1]] = -np.inf
    m_new = np.maximum(carried, i_gate[:, s])
    decay, gain = np.exp(carried - m_new), np.exp(i_gate[:, s] - m_new)
    c = decay[..., None, None] * c + gain[..., None, None] * k[:, s, ..., None] * v[:, s, :, None]
    n = decay[..., None] * n + gain[..., None] * k[:, s]
    qs = q[:, s] * key_dim**-0.5
    den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", qs, n)), np.exp(-m_new)) + eps
    h[:, s] = np.einsum("bhk,bhkv->bhv", qs, c) / den[..., None]
    m = m_new
  return h, (c, n, m)


def scan_mlstm(q, k, v, i_gate, f_gate, state, segment_ids=None, eps=1e-6):
  """The same recurrence as a plain ``lax.scan`` in fp32, for ``jax.grad`` references. The
  stabilizer ``m`` is a constant under differentiation (``stop_gradient``), the convention of
  every form of ``jaxrec.ops.mlstm``; the given initial ``m`` keeps its gradient."""
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
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_new)) + eps)[..., None]
    return (c, n, m_new), h

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, i_gate, f_gate, reset))
  final, h = jax.lax.scan(step, tuple(jnp.asarray(x, jnp.float32) for x in state), xs)
  return jnp.moveaxis(h, 0, 1), final


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
