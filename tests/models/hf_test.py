"""Hugging Face checkpoints: the transformers fixtures' logits and greedy tokens, export and
reload bit for bit, loading into mesh shardings, and checkpoints that do not match their config.

The fixtures (``tests/fixtures/llama``) were written by ``tests/fixtures/make_llama_fixtures.py``
with PyTorch and transformers, which the tests never import.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from testing_utils import assert_close, lm_logits_atol, rounding_atol

import jaxrec
from jaxrec import sharding
from jaxrec.layers import rope_frequencies
from jaxrec.models import (
  config_from_hf,
  hf_config_of,
  load_pretrained,
  load_pretrained_tokenizer,
  save_pretrained,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "llama"
NAMES = ("llama", "qwen2")


def _expected(name):
  folder = FIXTURES / name
  return json.loads((folder / "expected.json").read_text()), np.load(folder / "logits.npy")


@jax.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def models():
  return {name: load_pretrained(FIXTURES / name, dtype="float32") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_match_transformers(models, name):
  expected, want = _expected(name)
  model = models[name]
  prompts = np.array(expected["prompts"], np.int32)
  # Two fp32 runs (this model, transformers'): the logits' scale times both chains.
  atol = lm_logits_atol(want, model.cfg, prompts.shape[1])
  assert_close(_logits(model, prompts), want, rtol=0, atol=atol)
  tokens = jaxrec.generate(model, prompts, len(expected["greedy"][0])).tokens
  assert tokens.tolist() == expected["greedy"]
  tokenizer = load_pretrained_tokenizer(FIXTURES / name)
  assert [[tokenizer.bos_id, *tokenizer.encode(t)] for t in expected["prompt_texts"]] == (
    expected["prompts"]
  )
  cfg = model.cfg
  got = rope_frequencies(cfg.attn_head_dim, cfg.rope_theta, cfg.rope_scaling)
  # Ours: float64 rounded to fp32 once. Transformers' in fp32: the exponent i/d rounded, which
  # theta^x amplifies by |x log theta| <= log theta, the power's own, and the Llama 3 smoothing's
  # few operations.
  want = np.asarray(expected["rope_frequencies"], np.float64)
  terms = 1 + 1 + np.log(cfg.rope_theta) + 2 + 5
  assert_close(got, want, rtol=0, atol=rounding_atol(np.abs(want), terms=terms))


def test_llama_fixture_exercises_the_options():
  """The fixtures cover what they claim: Llama 3 scaling in all three regimes, GQA, untied head;
  Qwen2 biases, tied head, sharded files."""
  llama = load_pretrained(FIXTURES / "llama")
  assert llama.cfg.dtype == "bfloat16"  # the checkpoint's own dtype by default
  assert (llama.cfg.num_heads, llama.cfg.kv_heads, llama.cfg.tie_embeddings) == (4, 2, False)
  plain = rope_frequencies(16, 10_000.0)
  scaled = rope_frequencies(16, 10_000.0, llama.cfg.rope_scaling)
  assert scaled[0] == plain[0] and scaled[-1] == plain[-1] / 4  # short and long waves
  assert plain[1] / 4 < scaled[1] < plain[1]  # a medium one, interpolated
  qwen2 = FIXTURES / "qwen2"
  assert len(list(qwen2.glob("model-*.safetensors"))) > 1
  cfg = config_from_hf(json.loads((qwen2 / "config.json").read_text()))
  assert cfg.qkv_bias and cfg.tie_embeddings


def test_export_then_reload_round_trips_exactly(models, tmp_path):
  for name, max_shard_size in (("llama", 10**9), ("qwen2", 30_000)):
    model = models[name]
    files = save_pretrained(
      model, tmp_path / name, source=FIXTURES / name, max_shard_size=max_shard_size
    )
    assert ("model.safetensors.index.json" in files) == (name == "qwen2"), files
    assert "tokenizer.json" in files
    again = load_pretrained(tmp_path / name)
    assert again.cfg == model.cfg
    got, want = _params(again), _params(model)
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    written = json.loads((tmp_path / name / "config.json").read_text())
    assert written["bos_token_id"] == 0 and written["model_type"] == name
  with pytest.raises(FileExistsError, match="already holds weights"):
    save_pretrained(models["llama"], tmp_path / "llama")


def test_bfloat16_checkpoint_loads_and_round_trips_in_bfloat16(models, tmp_path):
  model = load_pretrained(FIXTURES / "llama")
  params = _params(model)
  assert all(p.dtype == jax.numpy.bfloat16 for p in params.values())
  # The fixture's weights are bf16 values: upcast, they are exactly the fp32 model's.
  for path, value in _params(models["llama"]).items():
    np.testing.assert_array_equal(params[path].astype(np.float32), value)
  save_pretrained(model, tmp_path / "bf16")
  with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  again = _params(load_pretrained(tmp_path / "bf16"))
  for path, value in params.items():
    np.testing.assert_array_equal(again[path], value, err_msg=str(path))


def test_loading_onto_a_mesh_places_every_tensor_in_its_sharding(models):
  mesh = sharding.make_mesh((2, 2, 2))
  model = load_pretrained(FIXTURES / "llama", dtype="float32", mesh=mesh)
  state = nnx.state(model, nnx.Param)
  want = sharding.tree_shardings(state, mesh)
  for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want), strict=True):
    assert v[...].sharding.is_equivalent_to(s.get_value(), v.ndim), path
  q = model.layers[0].mixer.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  expected, want_logits = _expected("llama")
  with jax.set_mesh(mesh):
    logits = _logits(model, np.array(expected["prompts"], np.int32))
  atol = lm_logits_atol(want_logits, model.cfg, len(expected["prompts"][0]))
  assert_close(logits, want_logits, rtol=0, atol=atol)


def _copy_fixture(tmp_path, name="llama"):
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  return folder


def _rewrite(folder, change):
  """Applies ``change(tensors) -> tensors`` to the single weights file of ``folder``."""
  file = folder / "model.safetensors"
  with safe_open(file, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
  save_file(change(tensors), file, metadata={"format": "pt"})


def test_checkpoints_that_do_not_match_their_config_name_the_tensor(tmp_path):
  name = "model.layers.1.self_attn.k_proj.weight"
  renamed = _copy_fixture(tmp_path / "renamed")
  _rewrite(renamed, lambda t: {k.replace(name, name + "_renamed"): v for k, v in t.items()})
  with pytest.raises(ValueError, match=f"tensor '{name}' is missing"):
    load_pretrained(renamed)
  reshaped = _copy_fixture(tmp_path / "reshaped")
  _rewrite(reshaped, lambda t: t | {name: t[name][:16]})
  with pytest.raises(ValueError, match=rf"tensor '{name}' .* has shape \(16, 64\); .* \(32, 64\)"):
    load_pretrained(reshaped)
  extra = _copy_fixture(tmp_path / "extra")
  _rewrite(extra, lambda t: t | {"model.layers.2.mlp.up_proj.weight": t[name]})
  with pytest.raises(
    ValueError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"
  ):
    load_pretrained(extra)
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  shutil.copy(FIXTURES / "llama" / "config.json", pickled)
  (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
  with pytest.raises(FileNotFoundError, match=r"only pytorch_model\.bin: pickled weights"):
    load_pretrained(pickled)


def test_config_from_hf_reads_transformers_4_fields_and_refuses_the_rest():
  hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
  v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
  v4["rope_theta"] = 10_000.0
  v4["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
  assert config_from_hf(v4) == config_from_hf(hf)
  assert config_from_hf(hf_config_of(config_from_hf(hf))) == config_from_hf(hf)
  for field, value, match in (
    ("model_type", "mistral", "model_type: expected one of"),
    ("hidden_act", "gelu", "hidden_act: expected 'silu'"),
    ("attention_bias", True, "attention_bias: expected false"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope_scaling: expected Llama 3"),
  ):
    with pytest.raises(ValueError, match=f"config.json: {match}"):
      config_from_hf(hf | {field: value})
