"""The LM stack: shapes and dtypes, scanned vs looped layers, remat, what layers sow through both,
packed rows of a RAT model against its documents run alone, presets, config errors, logical axis
metadata."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, lm_logits_atol, max_abs, rounding_atol

from jaxrec.models import LM, Block, LMConfig, get_preset, param_count, param_count_of

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=4,
  mixer_pattern=("gla", "attention"),
  num_heads=2,
  init_std=0.3,
  max_seq_len=16,
  mixer_options={"gla": {"chunk_size": 16}},
)
LOGICAL_AXES = {
  "vocab",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "head_dim",
  "rank",
  "norm",
  "layers",
  "taps",
}


def _tokens(b=2, t=8, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)


@jax.jit
def _logits(model, tokens):
  return model(tokens)[0]


def test_forward_shapes_and_bf16_compute():
  cfg = dataclasses.replace(CFG, num_layers=2)
  tokens = _tokens()
  model = LM(cfg, rngs=nnx.Rngs(0))
  logits = _logits(model, tokens)
  assert logits.shape == (2, 8, CFG.vocab_size) and logits.dtype == jnp.float32
  # Same seed, same fp32 parameters; only the compute dtype differs.
  bf16 = LM(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  logits_bf16 = _logits(bf16, tokens)
  assert logits_bf16.dtype == jnp.float32
  assert np.isfinite(logits_bf16).all()
  # bf16 compute: every matmul operand (weights and activations) rounded to bf16, and the
  # activations between (norms, gates, probabilities): about ten roundings a block on a chain,
  # and the head's two; against the logits' scale (the rule for whole models, testing_utils).
  bf16_roundings = 10 * cfg.num_layers + 2
  atol = rounding_atol(max_abs(logits), terms=bf16_roundings, dtype=jnp.bfloat16)
  assert_close(logits_bf16, logits, rtol=0.0, atol=atol + lm_logits_atol(logits, cfg, 8))


def _to_scanned(pure, cfg):
  """Stacks the looped model's blocks into the scanned layout: group g, pattern slot p."""
  period = len(cfg.mixer_pattern)
  blocks = pure.pop("layers")
  groups = cfg.num_layers // period
  stacked = {
    p: jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[g * period + p] for g in range(groups)))
    for p in range(period)
  }
  return pure | {"layers": {"blocks": stacked}}


def _logits_and_grads(model, tokens):
  graphdef, state = nnx.split(model, nnx.Param)

  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(state)
  return logits, nnx.to_pure_dict(grads)


def test_scanned_layers_and_remat_match_the_plain_loop():
  """Same parameters: the looped model, the looped model with remat and the scanned model with
  remat give the same logits and gradients (untied head, so the head path is covered too)."""
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  tokens = _tokens(seed=1)
  loop = LM(cfg, rngs=nnx.Rngs(1))
  pure = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  remat = LM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(2))
  nnx.update(remat, nnx.state(loop))
  scanned = LM(dataclasses.replace(cfg, scan_layers=True, remat=True), rngs=nnx.Rngs(3))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, _to_scanned(dict(pure), cfg))
  nnx.update(scanned, state)

  want_logits, want_grads = _logits_and_grads(loop, tokens)
  close = dict(rtol=1e-5, atol=1e-6)
  for model in (remat, scanned):
    logits, grads = _logits_and_grads(model, tokens)
    assert_close(logits, want_logits, **close)
    if model is scanned:
      grads_want = _to_scanned(dict(want_grads), cfg)
    else:
      grads_want = want_grads
    jax.tree.map(lambda g, w: assert_close(g, w, **close), grads, grads_want)


def _newton_iterations(model, tokens):
  """``{layer path: newton/iterations}`` as the model's ParaRNN layers sow them."""
  _, sown = nnx.jit(lambda m: nnx.capture(lambda m: m(tokens), nnx.Intermediate)(m))(model)
  return {
    "/".join(map(str, path[:-1])): np.asarray(metrics["newton/iterations"])
    for path, variable in nnx.to_flat_state(sown)
    for metrics in variable.get_value()
  }


def test_what_the_layers_sow_comes_out_of_remat_and_scanned_layers():
  """A ParaGRU layer sows inside ``jax.checkpoint`` (remat) or ``lax.scan`` (scanned layers);
  the capture gets every layer's value as the plain loop does, stacked over the groups when
  scanned."""
  cfg = dataclasses.replace(CFG, mixer_pattern=("paragru", "attention"))
  tokens = _tokens(seed=2)
  loop = LM(cfg, rngs=nnx.Rngs(1))
  remat = LM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(2))
  nnx.update(remat, nnx.state(loop))
  scanned = LM(dataclasses.replace(cfg, scan_layers=True, remat=True), rngs=nnx.Rngs(3))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, _to_scanned(nnx.to_pure_dict(nnx.state(loop, nnx.Param)), cfg))
  nnx.update(scanned, state)

  want = _newton_iterations(loop, tokens)
  assert sorted(want) == ["layers/0/mixer", "layers/2/mixer"]
  assert all(1 <= v <= cfg.options("paragru").max_iters for v in want.values()), want
  got = _newton_iterations(remat, tokens)
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  stacked = _newton_iterations(scanned, tokens)
  assert list(stacked) == ["layers/blocks/0/mixer"]
  np.testing.assert_array_equal(stacked["layers/blocks/0/mixer"], list(want.values()))


def test_rat_lm_packed_row_equals_its_documents_alone():
  """Chunks follow each document: the logits of a packed row (cuts off the chunk grid) are those
  of each document run alone (issue 21: they differed by 0.02-0.05 when the grid ran over the
  row)."""
  cfg = CFG.replace(mixer_pattern=("rat",), num_layers=2, rat={"chunk_size": 4})
  model = LM(cfg, rngs=nnx.Rngs(0))
  lengths = (5, 1, 7, 3)
  starts = np.cumsum([0, *lengths[:-1]])
  tokens = _tokens(b=1, t=16, seed=3)
  segment_ids = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
  # Each document alone starts a row of its own; the tokens after it are filler (causal model).
  alone = _tokens(b=len(lengths), t=16, seed=4)
  for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
    alone[i, :n] = tokens[0, s : s + n]

  @jax.jit
  def logits(model, tokens, alone):
    return model(tokens, segment_ids=segment_ids)[0], model(alone)[0], model(tokens)[0]

  packed, want, unpacked = (np.asarray(x) for x in logits(model, tokens, alone))
  # The same fp32 arithmetic per document in another order of roundings (u = 6e-8) through two
  # blocks and the head: far inside 1e-5 of the logit scale.
  for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
    assert_close(packed[0, s : s + n], want[i, :n], rtol=1e-5, atol=1e-5 * max_abs(want))
  assert np.abs(packed - unpacked).max() > 1e-3


def test_tied_and_untied_heads():
  tied = nnx.eval_shape(lambda: LM(CFG, rngs=nnx.Rngs(0)))
  untied = nnx.eval_shape(
    lambda: LM(dataclasses.replace(CFG, tie_embeddings=False), rngs=nnx.Rngs(0))
  )
  assert tied.head is None and untied.head.kernel.shape == (CFG.d_model, CFG.vocab_size)
  assert param_count_of(untied) - param_count_of(tied) == CFG.d_model * CFG.vocab_size


def test_presets_abstract_parameter_counts():
  assert 0.9e9 <= param_count(get_preset("1b")) <= 1.6e9
  assert 0.5e6 <= param_count(get_preset("tiny")) <= 2e6
  assert 5e6 <= param_count(get_preset("small")) <= 20e6
  assert get_preset("tiny", vocab_size=260).vocab_size == 260
  with pytest.raises(ValueError, match="name: unknown preset 'huge'"):
    get_preset("huge")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axis_names(scan_layers):
  names = ("gla", "attention", "based", "baseconv", "pla")
  cfg = dataclasses.replace(
    CFG,
    scan_layers=scan_layers,
    tie_embeddings=False,
    mixer_pattern=names,
    num_layers=len(names),
  )
  model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = param.get_metadata()["out_sharding"]
    assert len(names) == len(param.shape), path
    assert set(names) <= LOGICAL_AXES, path
    assert (names[0] == "layers") == (scan_layers and path[0] == "layers"), path


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      dict(mixer_pattern=("gla", "lstm")),
      r"mixer_pattern: unknown mixer 'lstm'.*'attention', .*'gla'",
    ),
    (dict(mixer_pattern="gla"), "mixer_pattern: expected a tuple"),
    (dict(num_kv_heads=3), "num_kv_heads: expected a divisor of num_heads=2"),
    (dict(num_layers=3, scan_layers=True), "num_layers: scan_layers=True needs a multiple"),
    (dict(dtype="float8"), "dtype: expected"),
    (dict(d_model=0), "d_model: expected a positive int"),
    (
      dict(mixer_pattern=("paragru",), paragru={"heads": 3}),
      r"paragru\.heads: expected a divisor of d_model=16, got 3",
    ),
    (dict(paralstm={"max_iters": 0}), r"paralstm\.max_iters: expected a positive int"),
    (dict(liger={"variant": "gsa"}), r"liger\.variant: expected one of \('gla', 'hgrn2'\)"),
    (dict(liger={"window": 0}), r"liger\.window: expected a positive int"),
    (dict(liger={"gate_source": "value"}), r"liger\.gate_source: expected one of"),
    (dict(attention={"window": 0}), r"attention\.window: expected a positive int"),
    (dict(gla={"chunk": 8}), r"gla\.chunk: unknown option; gla has options \('expand_k'"),
    (dict(gla=3), r"gla: expected a GLAOptions or a mapping of its options, got 3"),
    (dict(lstm={"chunk_size": 8}), r"lstm: expected an LMConfig field or a registered mixer"),
    (dict(mixer_options={"lstm": {}}), r"mixer_options: unknown mixer 'lstm'"),
    (dict(qkv_bias=1), "qkv_bias: expected True or False"),
    (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling: expected a positive number"),
    (dict(rope_scaling=[1, 2]), "rope_scaling: expected a mapping"),
    (dict(based={"feature_dim": 0}), r"based\.feature_dim: expected a positive int"),
    (dict(baseconv={"kernel_size": 0}), r"baseconv\.kernel_size: expected a positive int"),
    (dict(pla={"prefix_len": -1}), r"pla\.prefix_len: expected an int >= 0, got -1"),
    (dict(mixer_pattern=("based",), num_heads=3), "num_heads: Based needs a divisor of d_model"),
    (dict(mixer_pattern=("rat",), rat={"qk_groups": 4}), r"rat\.qk_groups: expected a divisor"),
    (dict(gla={"expand_k": 0.1}), r"gla\.expand_k: expected expand_k \* d_model"),
  ],
)
def test_config_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    CFG.replace(**overrides)


def test_bad_tokens_name_the_argument():
  model = LM(dataclasses.replace(CFG, num_layers=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens: expected an integer"):
    model(np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="segment_ids: expected an integer array of shape"):
    model(_tokens(t=4), segment_ids=np.zeros((2, 5), np.int32))


def test_the_model_and_its_blocks_take_no_feature_arguments():
  """A feature plugs in as a module (a long-context policy by ``jaxrec.inference.longctx.apply``),
  not as one more call argument: the model's call takes tokens, segment ids and a cache and
  returns a pair; a block's call takes its carry, segment ids and cache."""
  parameters = lambda f: list(inspect.signature(f).parameters)
  assert parameters(LM.__call__) == ["self", "tokens", "segment_ids", "cache"]
  assert parameters(LM.init_cache) == ["self", "batch_size", "max_length", "dtype"]
  assert parameters(Block.__call__) == ["self", "carry", "segment_ids", "cache"]
  assert parameters(Block.init_cache) == ["self", "batch_size", "max_length", "dtype"]
  model = LM(dataclasses.replace(CFG, num_layers=2), rngs=nnx.Rngs(0))
  out = model(_tokens(t=4))
  assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, 4, 32) and out[1] is None


def test_blocks_without_a_feed_forward_are_the_mixers_alone():
  """``ffn="none"`` (JRT's synthetic-task layout): the same model as ``ffn="mlp"`` whose MLPs
  output zero (their down projections zeroed), with the same other parameters; and none of the
  MLP's or its norm's parameters."""
  base = LMConfig(
    vocab_size=33,
    d_model=16,
    num_layers=4,
    mixer_pattern=("baseconv", "based"),
    num_heads=2,
    init_std=0.5,
    max_seq_len=16,
  )
  bare_cfg = dataclasses.replace(base, ffn="none")
  with_mlp, bare = LM(base, rngs=nnx.Rngs(0)), LM(bare_cfg, rngs=nnx.Rngs(1))
  per_block = param_count_of(with_mlp.layers[0].mlp) + param_count_of(with_mlp.layers[0].mlp_norm)
  assert param_count(bare_cfg) == param_count(base) - base.num_layers * per_block
  pure = nnx.to_pure_dict(nnx.state(with_mlp, nnx.Param))
  for block in pure["layers"].values():
    block["mlp"]["down"]["kernel"] = np.zeros_like(block["mlp"]["down"]["kernel"])
  state = nnx.state(with_mlp, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(with_mlp, state)
  kept = {k: v for k, v in pure.items() if k != "layers"}
  kept["layers"] = {
    i: {k: v for k, v in block.items() if k not in ("mlp", "mlp_norm")}
    for i, block in pure["layers"].items()
  }
  state = nnx.state(bare, nnx.Param)
  nnx.replace_by_pure_dict(state, kept)
  nnx.update(bare, state)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 33, (2, 12)), jnp.int32)
  # The zeroed MLP adds exact zeros: the two forwards are the same arithmetic.
  np.testing.assert_array_equal(bare(tokens)[0], with_mlp(tokens)[0])
