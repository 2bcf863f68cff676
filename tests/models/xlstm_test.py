"""xLSTM 7B in jaxrec: the preset's size against the published configuration, the weight import
against the logits that the ``xlstm`` package computed for the same checkpoint
(tests/fixtures/make_xlstm_fixtures.py), its errors, and decoding with the O(1) state
(``jaxrec.generate`` on this checkpoint: tests/colabs/xlstm_test.py)."""

import json
import pathlib
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from testing_utils import assert_close, lm_logits_atol, max_abs, mlstm_exponent_terms, rounding_atol

import jaxrec.layers.mlstm
from jaxrec.models import LM, config_from_xlstm, get_preset, load_xlstm, param_count, save_xlstm
from jaxrec.sharding import make_mesh

CHECKPOINT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "xlstm" / "checkpoint"
LOGITS = CHECKPOINT.parent / "logits.npz"

# NX-AI/xLSTM-7b's config.json, the fields that set the parameter count.
PUBLISHED_7B = {
  "vocab_size": 50304,
  "embedding_dim": 4096,
  "num_blocks": 32,
  "num_heads": 8,
  "qk_dim_factor": 0.5,
  "v_dim_factor": 1.0,
  "ffn_proj_factor": 2.667,
  "ffn_round_up_to_multiple_of": 64,
  "use_bias": False,
  "add_out_norm": True,
  "tie_word_embeddings": False,
  "weight_mode": "single",
}


def _published_param_count(c) -> int:
  """The parameters of xlstm_large / transformers' xLSTMForCausalLM, counted from the config."""
  d, h = c["embedding_dim"], c["num_heads"]
  qk, v = int(d * c["qk_dim_factor"]), int(d * c["v_dim_factor"])
  multiple = c["ffn_round_up_to_multiple_of"]
  ffn = int((d * c["ffn_proj_factor"] + multiple - 1) // multiple * multiple)
  mlstm = d * (2 * qk + 2 * v) + 2 * (d * h + h) + v + v * d  # q k v o, i f (+ bias), norm, out
  block = d + mlstm + d + 3 * d * ffn  # two RMSNorms, the SwiGLU
  heads = 1 if c["tie_word_embeddings"] else 2
  return heads * c["vocab_size"] * d + c["num_blocks"] * block + d


def test_7b_preset_has_the_published_parameter_count():
  want = _published_param_count(PUBLISHED_7B)
  assert want == 6_865_424_896
  assert param_count(get_preset("xlstm_7b")) == want
  # scan_layers only stacks the blocks (one abstract block to build instead of 32).
  assert param_count(config_from_xlstm(PUBLISHED_7B, scan_layers=True)) == want


@pytest.fixture(scope="module")
def model():
  return load_xlstm(CHECKPOINT)


def _exponent_terms(model, tokens, methods):
  """What the mLSTM's exponents add (``mlstm_exponent_terms``) for the gates this model produces
  on ``tokens``, summed over ``methods`` (the forms of the two runs compared), the largest over
  blocks: the gates are read by running the model once with the op wrapped."""
  gates, op = [], jaxrec.layers.mlstm.mlstm

  def recording(q, k, v, i_gate, f_gate, **kw):
    jax.debug.callback(lambda i, f: gates.append((np.asarray(i), np.asarray(f))), i_gate, f_gate)
    return op(q, k, v, i_gate, f_gate, **kw)

  with mock.patch.object(jaxrec.layers.mlstm, "mlstm", recording):
    model(tokens)
    jax.effects_barrier()
  chunk = model.cfg.options("mlstm").chunk_size
  return max(sum(mlstm_exponent_terms(m, i, f, None, chunk) for m in methods) for i, f in gates)


def _assert_logits(model, lengths=(1, 5, 40)):
  """Prompts of one step, shorter than a chunk (16), and across chunks: two fp32 runs (this
  model's chunkwise form, the package's chunkwise kernel of the same chunk size)."""
  recorded = np.load(LOGITS)
  for n in lengths:
    tokens = recorded[f"prompt_{n}"]
    logits, _ = jax.jit(lambda m, t: m(t))(model, tokens)
    want = recorded[f"logits_{n}"]
    extra = _exponent_terms(model, tokens, ("chunk", "chunk")) / 2
    atol = lm_logits_atol(want, model.cfg, n, extra=extra)
    assert_close(logits, want, rtol=0.0, atol=atol, err_msg=f"T={n}")


def test_logits_match_the_xlstm_package(model):
  assert model.cfg.mlp_dim == 96 and model.cfg.logit_soft_cap == 30.0
  _assert_logits(model)


def test_single_file_checkpoint_scanned_onto_a_mesh(tmp_path):
  """One model.safetensors instead of shards, blocks stacked for lax.scan, parameters placed in
  their shardings on a (data, fsdp, tensor) = (2, 2, 2) mesh."""
  tensors = {}
  for file in sorted(CHECKPOINT.glob("*.safetensors")):
    tensors |= load_file(file)
  save_file(tensors, tmp_path / "model.safetensors")
  shutil.copy(CHECKPOINT / "config.json", tmp_path)
  mesh = make_mesh((2, 2, 2))
  model = load_xlstm(tmp_path, mesh=mesh, scan_layers=True)
  kernel = model.layers.blocks[0].mlp.gate.kernel[...]
  assert kernel.shape == (2, 32, 96)
  assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.mesh == mesh
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  _assert_logits(model, lengths=(40,))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_save_writes_the_published_checkpoint_back(tmp_path, scan_layers):
  """The xlstm package's checkpoint, read and written by jaxrec: every tensor equal to its file,
  bit for bit (the published names, shapes and [out, in] layout), and a config.json that
  ``config_from_xlstm`` reads as the same architecture."""
  model = load_xlstm(CHECKPOINT, scan_layers=scan_layers)
  written = save_xlstm(model, tmp_path / "out")
  assert sorted(written) == ["config.json", "model.safetensors"]
  want = {}
  for file in sorted(CHECKPOINT.glob("*.safetensors")):
    want |= load_file(file)
  got = load_file(tmp_path / "out" / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, tensor in want.items():
    assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
    np.testing.assert_array_equal(got[name], tensor, err_msg=name)
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  published = json.loads((CHECKPOINT / "config.json").read_text())
  assert config_from_xlstm(saved) == config_from_xlstm(published)
  for field in ("ffn_proj_factor", "ffn_round_up_to_multiple_of", "num_blocks", "chunk_size"):
    assert saved[field] == published[field], field
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    save_xlstm(model, tmp_path / "out")


def test_save_refuses_what_the_published_architecture_cannot_say(tmp_path):
  base = config_from_xlstm(json.loads((CHECKPOINT / "config.json").read_text()))
  for cfg, message in (
    (base.replace(mixer_pattern=("mlstm", "attention")), "expected only 'mlstm' layers"),
    (base.replace(qkv_bias=True), r"cannot express its \['qkv_bias'\]"),
  ):
    with pytest.raises(ValueError, match=message):
      save_xlstm(LM(cfg, rngs=nnx.Rngs(0)), tmp_path / "never")
  assert not (tmp_path / "never").exists()
  # Any SwiGLU width is expressible: written as its own rounding multiple.
  save_xlstm(LM(base.replace(mlp_hidden=100), rngs=nnx.Rngs(0)), tmp_path / "wide")
  assert load_xlstm(tmp_path / "wide").cfg.mlp_dim == 100


def test_token_by_token_decoding_equals_the_full_forward(model):
  tokens = np.load(LOGITS)["prompt_40"][:, :24]
  full, _ = jax.jit(lambda m, t: m(t))(model, tokens)

  @jax.jit
  def decode(model, tokens):
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    prefill, cache = model(tokens[:, :5], cache=cache)  # a prefill, then one token at a time

    def step(cache, token):
      logits, cache = model(token[:, None], cache=cache)
      return cache, logits[:, 0]

    _, steps = jax.lax.scan(step, cache, tokens[:, 5:].T)
    return jnp.concatenate([prefill, jnp.swapaxes(steps, 0, 1)], axis=1)

  # Two fp32 runs (a chunkwise prefill and steps): the LM's chain each, and the exponents of both
  # forms for the gates this checkpoint produces.
  extra = _exponent_terms(model, tokens, ("chunk", "sequential")) / 2
  atol = lm_logits_atol(full, model.cfg, tokens.shape[1], extra=extra)
  assert_close(decode(model, tokens), full, rtol=0.0, atol=atol)


def _broken_copy(tmp_path, edit):
  directory = tmp_path / "broken"
  shutil.copytree(CHECKPOINT, directory)
  file = directory / "model-00001-of-00002.safetensors"
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file)
  index = json.loads((directory / "model.safetensors.index.json").read_text())
  index["weight_map"] = dict.fromkeys(tensors, file.name) | {
    k: v for k, v in index["weight_map"].items() if v != file.name
  }
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  return directory


def test_mismatched_tensors_are_named(tmp_path):
  name = "backbone.blocks.0.mlstm_layer.q.weight"
  assert name in load_file(CHECKPOINT / "model-00001-of-00002.safetensors")

  def reshape(t):
    t[name] = np.zeros((8, 32), np.float32)

  with pytest.raises(ValueError, match=rf"{name}: expected shape \(16, 32\).*got \(8, 32\)"):
    load_xlstm(_broken_copy(tmp_path / "a", reshape))
  with pytest.raises(ValueError, match=rf"{name}: a tensor the xLSTM architecture needs, missing"):
    load_xlstm(_broken_copy(tmp_path / "b", lambda t: t.pop(name)))

  def rename(t):
    t["backbone.blocks.0.mlstm_layer.query.weight"] = t.pop(name)

  with pytest.raises(ValueError, match=rf"{name}: a tensor the xLSTM architecture needs"):
    load_xlstm(_broken_copy(tmp_path / "c", rename))

  def extra(t):
    t["backbone.blocks.0.mlstm_layer.q.bias"] = np.zeros((16,), np.float32)

  with pytest.raises(ValueError, match=r"mlstm_layer.q.bias: a tensor of the checkpoint that the"):
    load_xlstm(_broken_copy(tmp_path / "d", extra))


def test_soft_capped_logits_and_mlstm_config_errors():
  """``logit_soft_cap=c`` turns the logits ``z`` of the same parameters into ``c·tanh(z/c)``."""
  small = dict(num_layers=1, d_model=32, num_heads=2, vocab_size=32, init_std=1.0)
  tokens = np.arange(8, dtype=np.int32)[None]
  forward = jax.jit(lambda m, t: m(t)[0])
  capped = forward(
    LM(get_preset("xlstm_tiny", logit_soft_cap=2.0, **small), rngs=nnx.Rngs(0)), tokens
  )
  plain = forward(
    LM(get_preset("xlstm_tiny", logit_soft_cap=None, **small), rngs=nnx.Rngs(0)), tokens
  )
  assert max_abs(plain) > 4.0  # the cap is far from the identity here
  want = 2.0 * np.tanh(np.asarray(plain, np.float64) / 2.0)
  # The cap's own roundings (divide, tanh, multiply); the two models' logits before it may round
  # differently (two compilations), which the cap carries with a slope <= 1.
  cfg = get_preset("xlstm_tiny", **small)
  atol = rounding_atol(np.abs(want), terms=4) + lm_logits_atol(plain, cfg, 8)
  assert_close(capped, want, rtol=0, atol=atol)
  with pytest.raises(ValueError, match=r"logit_soft_cap: expected a positive number or None"):
    get_preset("xlstm_tiny", logit_soft_cap=0.0)
  with pytest.raises(ValueError, match=r"mlstm\.chunk_size: expected a power of two, got 48"):
    get_preset("xlstm_tiny", mlstm={"chunk_size": 48})
  with pytest.raises(ValueError, match=r"mlstm\.qk_dim_factor: expected qk_dim_factor \* "):
    get_preset("xlstm_tiny", mlstm={"qk_dim_factor": 0.01})


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config.json: use_bias: expected false .*got true"):
    config_from_xlstm(PUBLISHED_7B | {"use_bias": True})
  with pytest.raises(ValueError, match=r"config.json: expected the field 'num_heads'"):
    config_from_xlstm({k: v for k, v in PUBLISHED_7B.items() if k != "num_heads"})
  with pytest.raises(ValueError, match=r"path: expected a checkpoint directory with a config"):
    load_xlstm(tmp_path)
