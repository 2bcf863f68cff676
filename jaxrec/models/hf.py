"""Hugging Face checkpoints of the Llama family: ``load_pretrained`` and ``save_pretrained``.

A checkpoint is a local directory: ``config.json`` (read by ``hf_config.config_from_hf``), the
weights as ``model.safetensors`` or as shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``, and optionally ``tokenizer.json``. Only safetensors files are
read, through the ``safetensors`` package's numpy API: nothing is unpickled or executed, and a
directory with only ``pytorch_model.bin`` is refused.

Loading is tensor by tensor: each parameter is made with ``jax.make_array_from_callback`` in its
sharding (from the parameters' logical axes and ``jaxrec.train.LOGICAL_AXIS_RULES`` on ``mesh``,
or one device), and the callback reads from the file only the block that one device holds. No
host copy of the whole model is ever made. Before any tensor is read, every name and shape in
the files' headers is checked against the model ``config.json`` describes; a missing,
unexpected or misshapen tensor is an error that names it.

The names, one table (``_TOP`` and ``_BLOCK``), Hugging Face ``[out, in]`` matrices against
jaxrec's ``[in, out]`` kernels whose head axes stay separate (``D`` model width, ``F`` MLP width,
``H`` query and ``G`` key/value heads, ``K`` head width, ``V`` vocabulary)::

  model.embed_tokens.weight                [V, D]     embedding                  [V, D]
  model.layers.{i}.input_layernorm.weight  [D]        layers.{i}.mixer_norm.scale [D]
  ...self_attn.q_proj.weight               [H·K, D]   ...mixer.q_proj.kernel     [D, H, K]
  ...self_attn.{k,v}_proj.weight           [G·K, D]   ...mixer.{k,v}_proj.kernel [D, G, K]
  ...self_attn.{q,k,v}_proj.bias (Qwen2)   [H·K]      ...mixer.{q,k,v}_proj.bias [H, K]
  ...self_attn.o_proj.weight               [D, H·K]   ...mixer.o_proj.kernel     [H, K, D]
  ...post_attention_layernorm.weight       [D]        layers.{i}.mlp_norm.scale  [D]
  ...mlp.{gate,up}_proj.weight             [F, D]     ...mlp.{gate,up}.kernel    [D, F]
  ...mlp.down_proj.weight                  [D, F]     ...mlp.down.kernel         [F, D]
  model.norm.weight                        [D]        final_norm.scale           [D]
  lm_head.weight (untied)                  [V, D]     head.kernel                [D, V]

A row ``h·K + k`` of a fused head axis is head ``h``, channel ``k``: the row-major reshape, so
each layout is a reshape of the Hugging Face tensor followed by a transpose. Both use RoPE's
"rotate half" channel order, so no permutation of the query and key rows is needed. Ignored:
``rotary_emb.inv_freq`` buffers of old checkpoints (derived from the config) and an
``lm_head.weight`` stored next to tied embeddings.
"""

import contextlib
import functools
import glob
import json
import math
import os
import shutil
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrec.data import HFTokenizer, load_tokenizer
from jaxrec.models import hf_config
from jaxrec.models.lm import LM

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What save_pretrained copies from the model's source directory.
COPIED_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)
DEFAULT_SHARD_BYTES = 5 * 2**30


class _Layout(NamedTuple):
  """jaxrec array ``= hf.reshape(view).transpose(perm)``; ``groups[i]`` consecutive view axes
  make Hugging Face axis ``i``."""

  groups: tuple[int, ...]
  perm: tuple[int, ...]

  def view(self, shape: Sequence[int]) -> tuple[int, ...]:
    inverse = np.argsort(self.perm)
    return tuple(shape[a] for a in inverse)

  def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    view, out, start = self.view(shape), [], 0
    for g in self.groups:
      out.append(math.prod(view[start : start + g]))
      start += g
    return tuple(out)


_SAME_1D = _Layout((1,), (0,))
_SAME_2D = _Layout((1, 1), (0, 1))
_LINEAR = _Layout((1, 1), (1, 0))  # [out, in] -> [in, out]
_HEADS_OUT = _Layout((2, 1), (2, 0, 1))  # [H·K, D] -> [D, H, K]
_HEADS_BIAS = _Layout((2,), (0, 1))  # [H·K] -> [H, K]
_HEADS_IN = _Layout((1, 2), (1, 2, 0))  # [D, H·K] -> [H, K, D]

_TOP = {
  ("embedding",): ("model.embed_tokens.weight", _SAME_2D),
  ("final_norm", "scale"): ("model.norm.weight", _SAME_1D),
  ("head", "kernel"): ("lm_head.weight", _LINEAR),
}
_BLOCK = {
  ("mixer_norm", "scale"): ("input_layernorm.weight", _SAME_1D),
  **{("mixer", f"{p}_proj", "kernel"): (f"self_attn.{p}_proj.weight", _HEADS_OUT) for p in "qkv"},
  **{("mixer", f"{p}_proj", "bias"): (f"self_attn.{p}_proj.bias", _HEADS_BIAS) for p in "qkv"},
  ("mixer", "o_proj", "kernel"): ("self_attn.o_proj.weight", _HEADS_IN),
  ("mlp_norm", "scale"): ("post_attention_layernorm.weight", _SAME_1D),
  ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", _LINEAR),
  ("mlp", "up", "kernel"): ("mlp.up_proj.weight", _LINEAR),
  ("mlp", "down", "kernel"): ("mlp.down_proj.weight", _LINEAR),
}


def hf_name(path: Sequence) -> tuple[str, _Layout]:
  """The Hugging Face name and layout of the parameter at ``path`` of an ``LM``.

  Raises:
    ValueError: the parameter has no Hugging Face name (a mixer other than attention, a LoRA
      factor not merged yet, stacked ``scan_layers`` blocks).
  """
  path = tuple(path)
  if path in _TOP:
    return _TOP[path]
  if len(path) > 2 and path[0] == "layers" and isinstance(path[1], int) and path[2:] in _BLOCK:
    name, layout = _BLOCK[path[2:]]
    return f"model.layers.{path[1]}.{name}", layout
  raise ValueError(
    f"model: parameter {'.'.join(map(str, path))} has no Hugging Face name (only Llama-family "
    "weights do; merge LoRA first with jaxrec.linearize.merge_lora)"
  )


def load_pretrained(
  path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None
) -> LM:
  """The ``LM`` of a Hugging Face Llama-family checkpoint directory.

  Args:
    path: the directory (``config.json`` and safetensors weights).
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for parameters and compute; ``None``
      takes the checkpoint's (``torch_dtype``).
    mesh: place each parameter in its sharding on this mesh; ``None``: on the default device.

  Returns:
    An ``LM``: ``model(tokens)`` gives ``(logits, cache)`` and ``jaxrec.generate`` decodes it.

  Raises:
    FileNotFoundError: no ``config.json`` or no safetensors weights.
    ValueError: a field of ``config.json`` the ``LM`` cannot express, or a tensor missing,
      unexpected or of the wrong shape (named).
  """
  path = os.fspath(path)
  with open(_require(path, CONFIG_FILE), encoding="utf-8") as f:
    cfg = hf_config.config_from_hf(json.load(f), dtype=dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
  flat = list(nnx.to_flat_state(state))
  shardings = _shardings(state, mesh)
  with contextlib.ExitStack() as stack:
    files = _open_tensor_files(path, stack)
    expected = {hf_name(p)[0]: hf_name(p)[1].hf_shape(v.shape) for p, v in flat}
    _check_names_and_shapes(path, files, expected, tied=cfg.tie_embeddings)
    loaded = []
    for p, v in flat:
      name, layout = hf_name(p)
      read = functools.partial(_read_block, files[name].get_slice(name), layout, v)
      loaded.append((p, v.replace(jax.make_array_from_callback(v.shape, shardings[p], read))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(
  model: LM,
  path: str | os.PathLike,
  *,
  source: str | os.PathLike | None = None,
  max_shard_size: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
  """Writes ``model`` as a Hugging Face checkpoint: ``config.json`` and safetensors weights,
  sharded with ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes.

  Tensors are gathered to the host one shard file at a time. ``load_pretrained`` of the result
  gives the same parameters, bit for bit.

  Args:
    model: an ``LM`` whose layers are all ``"attention"`` (written as Llama, or Qwen2 with
      ``qkv_bias``) or ``"liger"`` (``"model_type": "jaxrec"``); LoRA merged.
    path: a new or empty directory (existing weights are never overwritten).
    source: the Hugging Face directory the model came from: its tokenizer and generation files
      (``COPIED_FILES``) are copied and its ``config.json``'s other fields (token ids, ...) kept.
    max_shard_size: the most bytes of tensors per file.

  Returns:
    The files written, relative to ``path``.

  Raises:
    ValueError: a parameter without a Hugging Face name, or a config it cannot express.
    FileExistsError: ``path`` already holds safetensors weights.
  """
  path = os.fspath(path)
  if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
    raise ValueError(f"max_shard_size: expected a positive number of bytes, got {max_shard_size!r}")
  base = None
  if source is not None:
    with open(_require(os.fspath(source), CONFIG_FILE), encoding="utf-8") as f:
      base = json.load(f)
  config = hf_config.hf_config_of(model.cfg, base)
  params = sorted(
    ((*hf_name(p), v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))),
    key=lambda item: _hf_order(item[0]),
  )
  existing = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(
    os.path.join(path, INDEX_FILE)
  )
  if existing:
    raise FileExistsError(
      f"path: {path} already holds weights ({', '.join(sorted(existing)[:3])}); expected a new "
      "or empty directory"
    )
  os.makedirs(path, exist_ok=True)
  sizes = [x.size * x.dtype.itemsize for _, _, x in params]
  shards = _partition(sizes, max_shard_size)
  written = []
  for i, members in enumerate(shards):
    name = (
      SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    )
    # One shard's tensors on the host at a time.
    tensors = {params[j][0]: _to_hf(params[j][2], params[j][1]) for j in members}
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    written.append(name)
  if len(shards) > 1:
    weight_map = {params[j][0]: written[i] for i, members in enumerate(shards) for j in members}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    _write_json(os.path.join(path, INDEX_FILE), index)
    written.append(INDEX_FILE)
  _write_json(os.path.join(path, CONFIG_FILE), config)
  written.append(CONFIG_FILE)
  for name in COPIED_FILES if source is not None else ():
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
      written.append(name)
  return written


def load_pretrained_tokenizer(path: str | os.PathLike) -> HFTokenizer:
  """The ``tokenizer.json`` of a checkpoint directory, with the special tokens and chat template
  that its ``tokenizer_config.json`` / ``special_tokens_map.json`` name (``load_tokenizer``)."""
  return load_tokenizer(_require(os.fspath(path), "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# Files, names and blocks.


def _require(path: str, name: str) -> str:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"path: {path} has no {name}")
  return file


def _open_tensor_files(path: str, stack: contextlib.ExitStack) -> dict:
  """``{tensor name: open safetensors file}`` of the checkpoint's weights."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  else:
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
  if not names:
    pickles = [
      os.path.basename(p) for e in ("bin", "pt", "pth") for p in glob.glob(f"{path}/*.{e}")
    ]
    also = f" (only {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
    raise FileNotFoundError(f"path: {path} has no safetensors weights{also}")
  files = {}
  for name in names:
    handle = stack.enter_context(safe_open(_require(path, name), framework="numpy"))
    for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
      if key in files:
        raise ValueError(f"path: tensor {key!r} appears in two files of {path}")
      files[key] = handle
  return files


def _check_names_and_shapes(path, files, expected, *, tied: bool) -> None:
  """Every expected tensor present with its shape, and nothing else (from the headers)."""
  for name, shape in expected.items():
    if name not in files:
      raise ValueError(f"path: tensor {name!r} is missing from {path} (config.json needs it)")
    found = tuple(files[name].get_slice(name).get_shape())
    if found != tuple(shape):
      raise ValueError(
        f"path: tensor {name!r} in {path} has shape {found}; config.json needs {tuple(shape)}"
      )
  for name in files:
    ignored = name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")
    if name not in expected and not ignored:
      raise ValueError(
        f"path: unexpected tensor {name!r} in {path} (not in the model config.json describes)"
      )


def _shardings(state: nnx.State, mesh: Mesh | None) -> dict:
  """``{parameter path: sharding}``: from the logical axis rules on ``mesh``, else one device."""
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return {p: device for p, _ in nnx.to_flat_state(state)}
  # Deferred: jaxrec.train imports jaxrec.models.
  from jaxrec.train import sharding as sharding_lib

  placed = sharding_lib.tree_shardings(state, mesh)
  return {p: v.get_value() for p, v in nnx.to_flat_state(placed)}


def _read_block(tensor, layout: _Layout, target, index: tuple[slice, ...]) -> np.ndarray:
  """The block ``index`` of the jaxrec array read from the Hugging Face ``tensor``: along each
  fused axis the rows of the outer (head) slice, whole in the inner axes, which are then cut."""
  view = layout.view(target.shape)
  view_index = [slice(None)] * len(view)
  for axis, v_axis in enumerate(layout.perm):
    view_index[v_axis] = index[axis]
  rows, block_shape, inner, start = [], [], [], 0
  for g in layout.groups:
    axes = range(start, start + g)
    lo, hi, _ = view_index[start].indices(view[start])
    width = math.prod(view[a] for a in axes[1:])
    rows.append(slice(lo * width, hi * width))
    block_shape += [hi - lo, *(view[a] for a in axes[1:])]
    inner += [slice(None), *(view_index[a] for a in axes[1:])]
    start += g
  block = tensor[tuple(rows)].reshape(block_shape)[tuple(inner)]
  return np.ascontiguousarray(block.transpose(layout.perm)).astype(target.dtype)


def _to_hf(array: jax.Array, layout: _Layout) -> np.ndarray:
  if not array.is_fully_addressable:
    raise ValueError("model: save_pretrained writes from one process; its arrays span several")
  host = np.asarray(jax.device_get(array))
  return np.ascontiguousarray(
    host.transpose(np.argsort(layout.perm)).reshape(layout.hf_shape(host.shape))
  )


def _hf_order(name: str) -> tuple:
  """Embedding, blocks in order, final norm, head: the order Hugging Face writes."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), name)
  return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name)


def _partition(sizes: Sequence[int], limit: int) -> list[list[int]]:
  """Consecutive groups of indices whose sizes add up to at most ``limit`` (a larger tensor
  alone)."""
  shards, current, total = [], [], 0
  for i, size in enumerate(sizes):
    if current and total + size > limit:
      shards.append(current)
      current, total = [], 0
    current.append(i)
    total += size
  return [*shards, current] if current else shards


def _write_json(file: str, value) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
    f.write("\n")
