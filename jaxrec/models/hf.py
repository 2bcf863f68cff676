"""Hugging Face checkpoints of the Llama family: ``load_pretrained`` and ``save_pretrained``.

A checkpoint is a local directory: ``config.json`` (read by ``hf_config.config_from_hf``), the
weights as ``model.safetensors`` or as shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``, and optionally ``tokenizer.json``. Only safetensors files are
read, through the ``safetensors`` package's numpy API: nothing is unpickled or executed, and a
directory with only ``pytorch_model.bin`` is refused.

Loading is tensor by tensor into the parameters' shardings, each device's block read from the
file alone (``hf_layout``, whose table also names and lays out every tensor). No host copy of
the whole model is ever made. Before any tensor is read, every name and shape in
the files' headers is checked against the model ``config.json`` describes; a missing,
unexpected or misshapen tensor is an error that names it.

Ignored: ``rotary_emb.inv_freq`` buffers of old checkpoints (derived from the config) and an
``lm_head.weight`` stored next to tied embeddings.
"""

import contextlib
import functools
import glob
import json
import os
import shutil
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrec.data import HFTokenizer, load_tokenizer
from jaxrec.models import hf_config, hf_layout
from jaxrec.models.lm import LM

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
# What save_pretrained copies from the model's source directory; the first four describe the
# tokenizer, and a tokenizer given to save_pretrained writes its own instead.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
)
COPIED_FILES = (*TOKENIZER_FILES, GENERATION_CONFIG_FILE)
DEFAULT_SHARD_BYTES = 5 * 2**30


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
  shardings = hf_layout.shardings(state, mesh)
  with contextlib.ExitStack() as stack:
    files = _open_tensor_files(path, stack)
    names = {p: hf_layout.hf_name(p) for p, _ in flat}
    expected = {names[p][0]: names[p][1].hf_shape(v.shape) for p, v in flat}
    _check_names_and_shapes(path, files, expected, tied=cfg.tie_embeddings)
    loaded = []
    for p, v in flat:
      name, layout = names[p]
      read = functools.partial(hf_layout.read_block, files[name].get_slice(name), layout, v)
      loaded.append((p, v.replace(jax.make_array_from_callback(v.shape, shardings[p], read))))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(
  model: LM,
  path: str | os.PathLike,
  *,
  tokenizer: HFTokenizer | None = None,
  source: str | os.PathLike | None = None,
  max_shard_size: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
  """Writes ``model`` as a Hugging Face checkpoint: ``config.json`` and safetensors weights,
  sharded with ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes, and
  the tokenizer files when given one.

  Tensors are gathered to the host one shard file at a time. ``load_pretrained`` of the result
  gives the same parameters, bit for bit.

  Args:
    model: an ``LM`` whose layers are all ``"attention"`` (written as Llama, or Qwen2 with
      ``qkv_bias``) or ``"liger"`` (``"model_type": "jaxrec"``); LoRA merged.
    path: a new or empty directory (existing weights are never overwritten).
    tokenizer: the model's ``HFTokenizer`` (``load_gguf`` gives one): ``tokenizer.json`` and
      ``tokenizer_config.json`` (special tokens, chat template; ``HFTokenizer.save``) are
      written, its bos/eos/pad ids go into ``config.json``, and ``generation_config.json``
      holds them unless ``source`` has one. transformers' ``AutoTokenizer`` and
      ``load_pretrained_tokenizer`` read the directory back to the same tokenizer.
    source: the Hugging Face directory the model came from: its tokenizer and generation files
      (``COPIED_FILES``; the tokenizer's only without ``tokenizer``) are copied and its
      ``config.json``'s other fields (token ids, ...) kept.
    max_shard_size: the most bytes of tensors per file.

  Returns:
    The files written, relative to ``path``.

  Raises:
    ValueError: a parameter without a Hugging Face name, a config it cannot express, or a
      tokenizer that is not an ``HFTokenizer`` or has more ids than the model.
    FileExistsError: ``path`` already holds safetensors weights.
  """
  path = os.fspath(path)
  if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
    raise ValueError(f"max_shard_size: expected a positive number of bytes, got {max_shard_size!r}")
  base = {}
  if source is not None:
    with open(_require(os.fspath(source), CONFIG_FILE), encoding="utf-8") as f:
      base = json.load(f)
  token_ids = {}
  if tokenizer is not None:
    if not isinstance(tokenizer, HFTokenizer):
      raise ValueError(f"tokenizer: expected an HFTokenizer, got {tokenizer!r}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
      raise ValueError(
        f"tokenizer: expected at most the model's {model.cfg.vocab_size} ids, got {tokenizer!r}"
      )
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    token_ids = {f"{k}_token_id": i for k, i in ids.items() if i is not None}
  config = hf_config.hf_config_of(model.cfg, base | token_ids)
  params = sorted(
    ((*hf_layout.hf_name(p), v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))),
    key=lambda item: hf_layout.hf_order(item[0]),
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
    tensors = {params[j][0]: hf_layout.to_hf(params[j][2], params[j][1]) for j in members}
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    written.append(name)
  if len(shards) > 1:
    weight_map = {params[j][0]: written[i] for i, members in enumerate(shards) for j in members}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    _write_json(os.path.join(path, INDEX_FILE), index)
    written.append(INDEX_FILE)
  _write_json(os.path.join(path, CONFIG_FILE), config)
  written.append(CONFIG_FILE)
  copied = COPIED_FILES if tokenizer is None else (GENERATION_CONFIG_FILE,)
  for name in copied if source is not None else ():
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
      written.append(name)
  if tokenizer is not None:
    written += tokenizer.save(path, model_max_length=model.cfg.max_seq_len)
    if GENERATION_CONFIG_FILE not in written:
      _write_json(os.path.join(path, GENERATION_CONFIG_FILE), token_ids)
      written.append(GENERATION_CONFIG_FILE)
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
