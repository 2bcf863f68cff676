"""Set-Based Prompting with per-row layouts (``set_based_rows`` + ``write_layout``): a batch of
prompts of different layouts, padded on either side, gives each row's prompt and decoding logits
of ``set_based`` with that row's layout alone (itself checked against the dense reference in
``set_based_test``); a row of shared tokens is the plain model; padding is seen by no token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, lm_logits_atol

from jaxrec.inference import longctx
from jaxrec.models import LM, LMConfig

NEW = 3
# (prefix, options, suffix, left padding) of each row; every row is padded to WIDTH.
ROWS = [(3, (2, 3, 4), 2, 0), (2, (4, 1), 3, 2), (4, (1, 2, 2), 1, 1)]
WIDTH = 16


@pytest.fixture(scope="module")
def model():
  cfg = LMConfig(
    vocab_size=32,
    d_model=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    init_std=0.5,
    mixer_pattern=("attention",),
  )
  return LM(cfg, rngs=nnx.Rngs(0))


def _batch(seed=0):
  """Tokens, groups and positions ``[B, WIDTH]`` of ROWS (padding: group -1, token 0) and each
  row's policy and tokens alone."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(ROWS), WIDTH), np.int32)
  groups = np.full((len(ROWS), WIDTH), -1, np.int32)
  positions = np.zeros((len(ROWS), WIDTH), np.int32)
  alone = []
  for b, (prefix, options, suffix, left) in enumerate(ROWS):
    policy = longctx.set_based(prefix, options, suffix)
    ids = rng.integers(1, 32, policy.length).astype(np.int32)
    g, p = policy.groups()
    span = slice(left, left + policy.length)
    tokens[b, span], groups[b, span], positions[b, span] = ids, g, p
    alone.append((policy, ids, span))
  return tokens, groups, positions, alone


def _run(model, tokens, cache, new):
  """Prompt logits, then the logits of each token of ``new [B, NEW]`` fed one at a time."""
  step = jax.jit(lambda t, c: model(t, cache=c))
  logits, cache = step(jnp.asarray(tokens), cache)
  rows = [logits]
  for i in range(new.shape[1]):
    logits, cache = step(jnp.asarray(new[:, i : i + 1]), cache)
    rows.append(logits)
  return np.concatenate(rows, axis=1)


def test_each_row_is_its_layout_alone(model):
  tokens, groups, positions, alone = _batch()
  new = np.random.default_rng(1).integers(1, 32, (len(ROWS), NEW)).astype(np.int32)
  rows_model = longctx.apply(model, longctx.set_based_rows())
  cache = longctx.write_layout(rows_model.init_cache(len(ROWS), WIDTH + NEW), groups, positions)
  got = _run(rows_model, tokens, cache, new)
  for b, (policy, ids, span) in enumerate(alone):
    one = longctx.apply(model, policy)
    want = _run(one, ids[None], one.init_cache(1, policy.length + NEW), new[b : b + 1])[0]
    # The right padding comes before the new tokens: the row's prompt, then its NEW tokens.
    mine = np.concatenate([got[b, span], got[b, WIDTH:]])
    atol = lm_logits_atol(want, model.cfg, WIDTH + NEW)
    assert_close(mine, want, rtol=0, atol=atol, err_msg=f"row {b}")


def test_shared_rows_are_the_plain_model(model):
  tokens = np.random.default_rng(2).integers(1, 32, (2, 10)).astype(np.int32)
  rows_model = longctx.apply(model, longctx.set_based_rows())
  layout = np.zeros_like(tokens), np.broadcast_to(np.arange(10, dtype=np.int32), tokens.shape)
  cache = longctx.write_layout(rows_model.init_cache(2, 12), *layout)
  new = tokens[:, :2]
  got = _run(rows_model, tokens, cache, new)
  want = _run(model, tokens, model.init_cache(2, 12), new)
  assert_close(got, want, rtol=0, atol=lm_logits_atol(want, model.cfg, 12))


def test_padding_is_seen_by_no_token(model):
  """Changing the padding tokens changes no logit of a real token (a model that read them
  would move)."""
  tokens, groups, positions, _ = _batch()
  rows_model = longctx.apply(model, longctx.set_based_rows())
  new = np.ones((len(ROWS), 1), np.int32)
  outs = []
  for pad in (0, 7):
    t = np.where(groups < 0, pad, tokens)
    cache = longctx.write_layout(rows_model.init_cache(len(ROWS), WIDTH + 1), groups, positions)
    outs.append(_run(rows_model, t, cache, new))
  real = np.concatenate([groups >= 0, np.ones_like(new, bool)], axis=1)
  np.testing.assert_array_equal(outs[0][real], outs[1][real])
  assert np.abs(outs[0] - outs[1]).max() > 1e-3  # the padding rows themselves do move


def test_bad_input_is_refused(model):
  rows_model = longctx.apply(model, longctx.set_based_rows())
  with pytest.raises(ValueError, match="cache: set_based_rows reads"):
    rows_model(jnp.zeros((1, 4), jnp.int32))
  cache = rows_model.init_cache(2, 8)
  with pytest.raises(ValueError, match="groups: expected"):
    longctx.write_layout(cache, np.zeros((3, 4)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="groups, positions: expected"):
    longctx.write_layout(cache, np.zeros((2, 4)), np.zeros((2, 5)))
