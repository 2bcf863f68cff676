"""Set-Based Prompting against a dense reference (2-D mask, restarted positions; prefill, cached
prefill, decoding); invariance of a model's suffix and generated logits under every order of 3
unequal options, broken by the mask alone or the positions alone; one option is the plain run."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from longctx_reference import (
  attend,
  attention_layer,
  layer_atol,
  output,
  projections,
  rope,
  under,
)
from testing_utils import assert_close, lm_logits_atol, max_abs, rounding_atol

import jaxrec
from jaxrec.inference import loglikelihood, longctx
from jaxrec.inference.longctx import set_based
from jaxrec.models import LM, LMConfig

PREFIX, OPTIONS, SUFFIX, NEW = 3, (2, 3, 4), 2, 3


def reference_layout(prefix, options, suffix, new=0):
  """Mask ``[T, T]`` and positions ``[T]`` written from the paper's rules, ``new`` generated
  tokens included."""
  owner, pos = [-1] * prefix, list(range(prefix))
  for a, n in enumerate(options):
    owner += [a] * n
    pos += [prefix + m for m in range(n)]
  owner += [-1] * (suffix + new)
  pos += [prefix + max(options) + m for m in range(suffix + new)]
  t = len(owner)
  mask = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(i + 1):
      mask[i, j] = owner[i] < 0 or owner[j] < 0 or owner[i] == owner[j]
  return mask, np.array(pos)


def test_prefill_and_decoding_match_the_dense_reference():
  attn = attention_layer()
  policy = set_based(PREFIX, OPTIONS, SUFFIX)
  t = policy.length
  x = np.random.default_rng(0).standard_normal((2, t + NEW, 16)).astype(np.float32)
  mask, pos = reference_layout(PREFIX, OPTIONS, SUFFIX, NEW)
  q, k, v = projections(attn, x)
  heads = []
  for b in range(2):
    s = np.einsum("thk,shk->hts", rope(q[b], pos), rope(k[b], pos)) / np.sqrt(8)
    heads.append(attend(s, np.broadcast_to(mask, s.shape), v[b]))
  want = output(attn, np.stack(heads))
  got = jax.jit(lambda x: under(attn, policy)(x)[0])(x[:, :t])
  assert_close(
    got, want[:, :t], rtol=0, atol=layer_atol(attn, x[:, :t]), err_msg="prefill, no cache"
  )
  step = jax.jit(lambda x, c: under(attn, policy)(x, cache=c))
  cache = under(attn, policy).init_cache(2, t + NEW, jnp.float32)
  outs = []
  for x_i in [x[:, :t]] + [x[:, i : i + 1] for i in range(t, t + NEW)]:
    y, cache = step(x_i, cache)
    outs.append(y)
  assert_close(np.concatenate(outs, 1), want, rtol=0, atol=layer_atol(attn, x), err_msg="cached")


@pytest.fixture(scope="module")
def model():
  cfg = LMConfig(
    vocab_size=32, d_model=16, num_layers=2, num_heads=2, init_std=0.5, mixer_pattern=("attention",)
  )
  return LM(cfg, rngs=nnx.Rngs(0))


@dataclasses.dataclass(frozen=True)
class MaskOnly(set_based):
  """Negative control: the 2-D mask with plain positions."""

  def layout(self):
    mask, positions = super().layout()
    return mask, np.arange(len(positions), dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class PositionsOnly(set_based):
  """Negative control: restarted positions with the causal mask."""

  def layout(self):
    mask, positions = super().layout()
    return np.tril(np.ones_like(mask)), positions


def _logits_of_orders(model, kind, new_tokens, orders=6):
  """Logits of the suffix and of ``new_tokens`` fed after it, for the first ``orders`` orders
  of the options."""
  rng = np.random.default_rng(2)
  prefix, suffix = rng.integers(0, 32, PREFIX), rng.integers(0, 32, SUFFIX)
  options = [rng.integers(0, 32, n) for n in OPTIONS]
  out = []
  for order in list(itertools.permutations(range(len(OPTIONS))))[:orders]:
    policy = kind(PREFIX, tuple(OPTIONS[a] for a in order), SUFFIX)
    tokens = np.concatenate([prefix, *(options[a] for a in order), suffix])[None]
    long_model = longctx.apply(model, policy)
    cache = long_model.init_cache(1, policy.length + len(new_tokens))
    logits, cache = long_model(jnp.asarray(tokens, jnp.int32), cache=cache)
    rows = [logits[0, -SUFFIX:]]
    for token in new_tokens:
      logits, cache = long_model(jnp.full((1, 1), token, jnp.int32), cache=cache)
      rows.append(logits[0])
    out.append(np.concatenate(rows))
  return tokens, np.stack(out)


def test_suffix_and_generated_logits_are_invariant_to_the_order_of_options(model):
  tokens, _ = _logits_of_orders(model, set_based, [])
  last = dict(prefix=PREFIX, options=(OPTIONS[2], OPTIONS[1], OPTIONS[0]), suffix=SUFFIX)
  generated = jaxrec.generate(longctx.apply(model, set_based(**last)), tokens, NEW).tokens[0]
  _, logits = _logits_of_orders(model, set_based, list(np.asarray(generated)))
  # Two runs of the model over the same tokens in another order: the logits' scale times both
  # chains (testing_utils' rule for whole models).
  atol = lm_logits_atol(logits, model.cfg, len(tokens[0]) + NEW)
  for other in logits[1:]:
    assert_close(other, logits[0], rtol=0, atol=atol)
    np.testing.assert_array_equal(other.argmax(-1), logits[0].argmax(-1))
  # Greedy decoding under the policy follows the argmax of the logits computed here.
  np.testing.assert_array_equal(generated, logits[-1][SUFFIX - 1 : -1].argmax(-1))
  for control in (MaskOnly, PositionsOnly):
    _, broken = _logits_of_orders(model, control, [], orders=2)
    assert np.abs(broken - broken[0]).max() > 1e-3, control.__name__


def test_one_option_is_the_plain_run(model):
  tokens = np.random.default_rng(3).integers(0, 32, (2, 9)).astype(np.int32)
  got = loglikelihood(longctx.apply(model, set_based(3, (4,), 1)), tokens)
  # A sum over the tokens of log-softmaxes, each moved by at most twice its logits' error (the
  # token's own logit and the normalizer, slopes <= 1), and the sum's own rounding.
  logits = model(jnp.asarray(tokens))[0]
  want = np.asarray(loglikelihood(model, tokens))
  atol = 2 * tokens.shape[1] * lm_logits_atol(logits, model.cfg, tokens.shape[1])
  atol = atol + rounding_atol(max_abs(want), terms=tokens.shape[1])
  assert_close(got, want, rtol=0, atol=atol)


def test_bad_settings_are_refused(model):
  with pytest.raises(ValueError, match="options: expected a non-empty tuple"):
    set_based(2, [], 1)
  with pytest.raises(ValueError, match="options: expected an int >= 1"):
    set_based(2, (3, 0), 1)
  with pytest.raises(ValueError, match="tokens: expected the prompt of prefix"):
    longctx.apply(model, set_based(2, (3, 1), 1))(jnp.zeros((1, 5), jnp.int32))
