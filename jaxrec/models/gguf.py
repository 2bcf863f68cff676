"""GGUF files (llama.cpp's format) of the Llama family: ``load_gguf`` gives the ``LM`` and its
tokenizer, with no torch and no transformers.

The file is read with the ``gguf`` package (llama.cpp's own reader, numpy only): its metadata
gives the ``LMConfig`` (``config_from_gguf``) and the tokenizer
(``jaxrec.data.tokenizer_from_gguf``); its tensors, quantized or not, become the parameters.

Names and layouts. llama.cpp's converter renames every Hugging Face tensor
(``gguf.TensorNameMap``: ``model.layers.0.self_attn.q_proj.weight`` is ``blk.0.attn_q.weight``,
``model.embed_tokens.weight`` is ``token_embd.weight``, ...) and keeps its ``[out, in]`` layout
(GGUF lists the dimensions innermost first, ``[in, out]``; numpy sees ``[out, in]``). So each
GGUF tensor is read as the Hugging Face tensor of the same role and placed with ``hf_layout``,
like a safetensors checkpoint, except for one permutation: llama.cpp runs Llama's RoPE on
adjacent channel pairs ``(2i, 2i + 1)`` where Hugging Face rotates ``(i, i + K/2)``, and its
converter reorders the rows of each query and key head to match (``permute``: head row
``j·K/2 + i`` moves to ``2i + j``). The loader undoes that, so the ``LM`` has Hugging Face's
RoPE. Qwen2 is converted without the reordering (llama.cpp runs it with "NeoX" RoPE, which is
Hugging Face's), so nothing is undone there.

Memory. Each tensor is dequantized (``gguf.quants.dequantize``: F32, F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, the K-quants Q2_K to Q6_K, ...) when its parameter is placed, a few rows at a
time, read with ordinary file reads (not the reader's memory map, whose touched pages would stay
resident), straight into the block that one device holds of its sharding. The peak beyond the
loaded model is one tensor in the target dtype and one chunk of rows.
"""

import dataclasses
import functools
import importlib.metadata
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrec.data import HFTokenizer, tokenizer_from_gguf
from jaxrec.models import hf_layout
from jaxrec.models.config import LMConfig
from jaxrec.models.lm import LM

ARCHITECTURES = ("llama", "qwen2")
# Elements dequantized at a time (4 MiB of float32), bounding the temporary copies.
_CHUNK_ELEMENTS = 1 << 20


def load_gguf(
  path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[LM, HFTokenizer]:
  """The ``LM`` and tokenizer of a Llama-family GGUF file.

  Args:
    path: the ``.gguf`` file (``general.architecture`` ``"llama"`` or ``"qwen2"``).
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for parameters and compute; ``None``
      is float32, which holds every dequantized value exactly.
    mesh: place each parameter in its sharding on this mesh; ``None``: on the default device.

  Returns:
    ``(model, tokenizer)``: ``model(tokens)`` gives ``(logits, cache)``; the tokenizer (an
    ``HFTokenizer``) encodes chat markup as single ids and renders the chat template.
    ``jaxrec.models.save_pretrained(model, dir, tokenizer=tokenizer)`` writes both as a
    Hugging Face checkpoint.

  Raises:
    ImportError: the ``gguf`` package is not installed.
    ValueError: naming the metadata key or the tensor: an architecture outside the Llama family,
      a setting the ``LM`` cannot express, a tensor missing, unexpected, misshapen or in a
      quantization type ``gguf`` cannot dequantize.
  """
  gguf = _import_gguf()
  path = os.fspath(path)
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, KeyError) as e:
    raise ValueError(f"path: {path} is not a GGUF file that gguf can read: {e}") from e
  metadata = {name: field.contents() for name, field in reader.fields.items()}
  tensors = {t.name: _TensorInfo.of(t) for t in reader.tensors}
  del reader  # drops the memory map; tensors are read with plain file reads below
  cfg = config_from_gguf(metadata, tensors, dtype=dtype)
  tokenizer = tokenizer_from_gguf(metadata)
  if tokenizer.vocab_size != cfg.vocab_size:
    raise ValueError(
      f"path: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens; the model's vocabulary "
      f"({cfg.vocab_size}) differs"
    )
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
  flat = list(nnx.to_flat_state(state))
  shardings = hf_layout.shardings(state, mesh)
  arch = metadata["general.architecture"]
  name_map = gguf.get_tensor_name_map(_model_arch(gguf, arch), cfg.num_layers)
  sources = {}  # parameter path -> (GGUF name, layout, heads whose rows llama.cpp reordered)
  for p, v in flat:
    hf_name, layout = hf_layout.hf_name(p)
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    heads = None
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = cfg.num_heads if hf_name.endswith("q_proj.weight") else cfg.kv_heads
    sources[p] = (name, layout, heads)
    _check_tensor(gguf, path, tensors, name, layout.hf_shape(v.shape))
  expected = {name for name, _, _ in sources.values()}
  for name in tensors:
    if name not in expected:
      raise ValueError(
        f"path: unexpected tensor {name!r} in {path} (not in the model its metadata describes"
        + ("; Llama 3 frequency factors are not supported" if name.startswith("rope_freqs") else "")
        + ")"
      )
  loaded = []
  with open(path, "rb") as file:
    for p, v in flat:
      name, layout, heads = sources[p]
      tensor = _GGUFTensor(gguf, file, tensors[name], dtype=v.dtype, heads=heads)
      read = functools.partial(hf_layout.read_block, tensor, layout, v)
      loaded.append((p, v.replace(jax.make_array_from_callback(v.shape, shardings[p], read))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded)), tokenizer


def config_from_gguf(
  metadata: Mapping[str, Any], tensor_names: Collection[str], *, dtype: str | None = None
) -> LMConfig:
  """The ``LMConfig`` of a Llama-family GGUF file's metadata (its keys prefixed by the
  architecture, ``llama.`` or ``qwen2.``):

  ====================================  =====================================================
  GGUF                                  ``LMConfig``
  ====================================  =====================================================
  ``{arch}.block_count``                ``num_layers``
  ``{arch}.embedding_length``           ``d_model``
  ``{arch}.feed_forward_length``        ``mlp_hidden``
  ``{arch}.attention.head_count``       ``num_heads``
  ``{arch}.attention.head_count_kv``    ``num_kv_heads`` (default: ``head_count``)
  ``{arch}.attention.key_length``       ``head_dim`` (default: ``embedding_length / heads``)
  ``{arch}.rope.freq_base``             ``rope_theta`` (default 10000)
  ``{arch}.attention.layer_norm_rms_epsilon``  ``norm_eps``
  ``{arch}.context_length``             ``max_seq_len``
  ``{arch}.vocab_size``                 ``vocab_size`` (default: the number of tokens)
  no ``output.weight`` tensor           ``tie_embeddings``
  ``qwen2``                             ``qkv_bias``
  ====================================  =====================================================

  Refused, with the key named: another architecture, experts, a sliding window, RoPE on part of
  the head (``rope.dimension_count``), RoPE scaling, values wider or narrower than keys.

  Args:
    metadata: the file's key-value metadata as plain Python values.
    tensor_names: the names of the file's tensors (the head is tied when ``output.weight`` is
      absent).
    dtype: compute and parameter dtype; ``None`` is float32.
  """
  arch = metadata.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(
      f"metadata: general.architecture: expected one of {ARCHITECTURES} (the Llama family), "
      f"got {arch!r}"
    )

  def get(key, default=None, *, required=False):
    full = f"{arch}.{key}"
    if full not in metadata:
      if required:
        raise ValueError(f"metadata: {full}: missing (the model's shape needs it)")
      return default
    value = metadata[full]
    if isinstance(value, list):
      raise ValueError(
        f"metadata: {full}: expected one value (the same in every layer), got {value!r}"
      )
    return value

  for key, fine in (
    ("expert_count", lambda v: not v),
    ("attention.sliding_window", lambda v: not v),
    ("rope.scaling.type", lambda v: v in (None, "none", "")),
  ):
    if not fine(get(key)):
      raise ValueError(
        f"metadata: {arch}.{key}: the LM has no such option (expected none), got {get(key)!r}"
      )
  d_model = int(get("embedding_length", required=True))
  heads = int(get("attention.head_count", required=True))
  head_dim = int(get("attention.key_length", d_model // heads))
  for key in ("attention.value_length", "rope.dimension_count"):
    if int(get(key, head_dim)) != head_dim:
      raise ValueError(
        f"metadata: {arch}.{key}: expected the key width {head_dim} (values as wide as keys, "
        f"RoPE on the whole head), got {get(key)}"
      )
  tokens = metadata.get("tokenizer.ggml.tokens") or ()
  vocab = get("vocab_size", len(tokens))
  if not vocab:
    raise ValueError(f"metadata: {arch}.vocab_size: missing, and no tokenizer.ggml.tokens")
  return LMConfig(
    vocab_size=int(vocab),
    d_model=d_model,
    num_layers=int(get("block_count", required=True)),
    mixer_pattern=("attention",),
    num_heads=heads,
    num_kv_heads=int(get("attention.head_count_kv", heads)),
    head_dim=head_dim,
    mlp_hidden=int(get("feed_forward_length", required=True)),
    rope_theta=_float32_decimal(get("rope.freq_base", 10_000.0)),
    qkv_bias=arch == "qwen2",
    max_seq_len=int(get("context_length", required=True)),
    norm_eps=_float32_decimal(get("attention.layer_norm_rms_epsilon", required=True)),
    tie_embeddings="output.weight" not in tensor_names,
    dtype="float32" if dtype is None else dtype,
    param_dtype="float32" if dtype is None else dtype,
  )


def _float32_decimal(value) -> float:
  """The shortest decimal of a float32 metadata value (``1e-05``, not ``9.9999997e-06``): the
  number the source config held, and the same float32 in every computation."""
  return float(str(np.float32(value)))


# ----------------------------------------------------------------------------------------------
# Tensors.


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  """Where a tensor's bytes are: numpy shape (outermost first), quantization, file offset."""

  name: str
  shape: tuple[int, ...]
  qtype: Any  # gguf.GGMLQuantizationType
  offset: int

  @classmethod
  def of(cls, tensor) -> "_TensorInfo":
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return cls(tensor.name, shape, tensor.tensor_type, int(tensor.data_offset))


def _check_tensor(gguf, path: str, tensors: Mapping, name: str, shape: tuple[int, ...]) -> None:
  if name not in tensors:
    raise ValueError(f"path: tensor {name!r} is missing from {path} (its metadata needs it)")
  info = tensors[name]
  if info.shape != tuple(shape):
    raise ValueError(
      f"path: tensor {name!r} in {path} has shape {info.shape}; its metadata needs {tuple(shape)}"
    )
  _, size = gguf.GGML_QUANT_SIZES[info.qtype]
  try:
    gguf.quants.dequantize(np.zeros((1, size), np.uint8), info.qtype)
  except NotImplementedError as e:
    raise ValueError(
      f"path: tensor {name!r} in {path} is quantized as {info.qtype.name}, which gguf "
      f"{importlib.metadata.version('gguf')} cannot dequantize"
    ) from e


class _GGUFTensor:
  """A GGUF tensor in its Hugging Face row order that dequantizes the rows asked for
  (``hf_layout.Sliceable``), ``_CHUNK_ELEMENTS`` at a time, into an array of ``dtype``.

  ``heads``: the tensor is a query or key projection whose rows llama.cpp reordered within each
  of ``heads`` heads; Hugging Face row ``h·K + j·K/2 + i`` is GGUF row ``h·K + 2i + j``."""

  def __init__(self, gguf, file, info: _TensorInfo, *, dtype, heads: int | None):
    self._gguf, self._file, self._info, self._dtype = gguf, file, info, np.dtype(dtype)
    rows, self._cols = math.prod(info.shape[:-1]), info.shape[-1]
    block, size = gguf.GGML_QUANT_SIZES[info.qtype]
    self._row_bytes = self._cols // block * size
    self._source_rows = np.arange(rows)
    if heads is not None:
      h, j, i = np.unravel_index(np.arange(rows), (heads, 2, rows // heads // 2))
      self._source_rows = h * (rows // heads) + 2 * i + j

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    shape = self._info.shape
    if len(shape) == 1:
      return self._rows(np.zeros(1, np.int64), index[0])[0]
    assert len(shape) == 2, shape  # every Llama-family tensor is a vector or a matrix
    source = self._source_rows[index[0]]
    cols = range(self._cols)[index[1]]
    out = np.empty((len(source), len(cols)), self._dtype)
    step = max(1, _CHUNK_ELEMENTS // self._cols)
    for start in range(0, len(source), step):
      out[start : start + step] = self._rows(source[start : start + step], index[1])
    return out

  def _rows(self, rows: np.ndarray, cols: slice) -> np.ndarray:
    """The GGUF rows ``rows`` (nearly consecutive), dequantized, columns ``cols``."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    self._file.seek(self._info.offset + lo * self._row_bytes)
    raw = np.frombuffer(self._file.read((hi - lo) * self._row_bytes), np.uint8)
    values = self._gguf.quants.dequantize(raw.reshape(hi - lo, self._row_bytes), self._info.qtype)
    return values[rows - lo][:, cols].astype(self._dtype, copy=False)


def _import_gguf():
  try:
    import gguf  # optional dependency, imported only for this path
  except ImportError as e:
    raise ImportError(
      "path: loading a GGUF file needs the gguf package; install it with "
      '`pip install "jaxrec[real]"`'
    ) from e
  return gguf


def _model_arch(gguf, arch: str):
  return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
