"""xLSTM 7B (Beck et al. 2025): its configuration and its published weights, as a jaxrec ``LM``.

The architecture is ``LM`` with the ``"mlstm"`` mixer (``jaxrec.layers.MLSTM``), an untied head
and soft-capped logits: the published blocks are the same pre-norm pair of mLSTM layer and SwiGLU
feed-forward (preset ``"xlstm_7b"``). ``load_xlstm`` reads a checkpoint in the layout of
``NX-AI/xLSTM-7b`` (transformers' ``xLSTMForCausalLM``): a directory with ``config.json`` and
``*.safetensors`` files, sharded with a ``model.safetensors.index.json`` or not; ``save_xlstm``
writes one (for a model built here, or to hand weights to the ``xlstm`` package). Each tensor is
read on its own with ``safetensors``' numpy API, rearranged into jaxrec's layout (head axes kept
separate, kernels ``[in, out]``) and placed straight into its target sharding with
``jax.make_array_from_callback``: no device ever holds more than its shard, and the host holds one
parameter at a time.

Published name → jaxrec parameter (``{i}`` the block; with ``scan_layers`` the blocks are stacked
on the leading axis of ``layers.blocks[0]``)::

  backbone.embeddings.weight [V, D]                 embedding [V, D]
  backbone.blocks.{i}.norm_mlstm.weight [D]         layers[i].mixer_norm.scale
  ....mlstm_layer.{q,k,v,ogate_preact}.weight       layers[i].mixer.{q_proj,k_proj,v_proj,o_gate}
    [H·K or H·V, D]                                   .kernel [D, H, K or V]
  ....mlstm_layer.{i,f}gate_preact.{weight,bias}    layers[i].mixer.{i,f}_gate.kernel [D, H],
                                                      layers[i].mixer.{i,f}_bias [H]
  ....mlstm_layer.multihead_norm.weight [H·V]       layers[i].mixer.out_norm.scale [H, V]
  ....mlstm_layer.out_proj.weight [D, H·V]          layers[i].mixer.out_proj.kernel [H, V, D]
  backbone.blocks.{i}.norm_ffn.weight [D]           layers[i].mlp_norm.scale
  ....ffn.{proj_up_gate,proj_up,proj_down}.weight   layers[i].mlp.{gate,up,down}.kernel
  backbone.out_norm.weight [D]                      final_norm.scale
  lm_head.weight [V, D]                             head.kernel [D, V]
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrec.models.config import LMConfig
from jaxrec.models.lm import LM
from jaxrec.sharding import tree_shardings

INDEX = "model.safetensors.index.json"

# config.json fields whose other values the architecture does not have, with the value it needs.
_REQUIRED = {"use_bias": False, "weight_mode": "single", "add_out_norm": True}


def config_from_xlstm(config: Mapping, **overrides) -> LMConfig:
  """The ``LMConfig`` of a published xLSTM ``config.json`` (transformers' ``xLSTMConfig`` keys).

  Args:
    config: the parsed ``config.json``.
    **overrides: ``LMConfig`` fields to set besides (``dtype``, ``scan_layers``, ``remat``,
      ``max_seq_len``, ...; ``LMConfig.replace``, so ``mlstm={"chunk_size": 32}`` too).

  Raises:
    ValueError: naming the ``config.json`` field that is missing or has a value jaxrec's xLSTM
      does not implement.
  """

  def get(*names, default=None):
    for name in names:
      if config.get(name) is not None:
        return config[name]
    if default is None:
      raise ValueError(f"config.json: expected the field {names[0]!r}, which is missing")
    return default

  for name, want in _REQUIRED.items():
    if config.get(name, want) != want:
      raise ValueError(
        f"config.json: {name}: expected {json.dumps(want)} (the published xLSTM 7B), got "
        f"{json.dumps(config[name])}"
      )
  d_model = get("hidden_size", "embedding_dim")
  multiple = get("ffn_round_up_to_multiple_of", default=64)
  # The published rounding, round_up_to_next_multiple_of(d · factor, multiple).
  mlp_hidden = int((d_model * get("ffn_proj_factor", default=2.667) + multiple - 1) // multiple)
  fields = dict(
    vocab_size=get("vocab_size"),
    d_model=d_model,
    num_layers=get("num_blocks", "num_hidden_layers"),
    mixer_pattern=("mlstm",),
    num_heads=get("num_heads"),
    mlp_hidden=mlp_hidden * multiple,
    max_seq_len=8192,
    norm_eps=get("norm_eps", default=1e-6),
    tie_embeddings=bool(get("tie_word_embeddings", default=False)),
    logit_soft_cap=config.get("output_logit_soft_cap", 30.0),
  )
  mlstm = dict(
    qk_dim_factor=get("qk_dim_factor", default=0.5),
    v_dim_factor=get("v_dim_factor", default=1.0),
    gate_soft_cap=config.get("gate_soft_cap", 15.0),
    chunk_size=get("chunk_size", default=64),
    eps=get("eps", default=1e-6),
  )
  return LMConfig(**fields, mixer_options={"mlstm": mlstm}).replace(**overrides)


def load_xlstm(path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides) -> LM:
  """An ``LM`` with the weights of a published xLSTM checkpoint directory.

  Args:
    path: a directory with ``config.json`` and either ``model.safetensors.index.json`` and the
      shards it names, or ``*.safetensors`` files.
    mesh: place every parameter in its sharding on this mesh (the rules of
      ``jaxrec.sharding``); ``None`` puts the model on the default device.
    **overrides: ``LMConfig`` fields to set besides the checkpoint's (``dtype="bfloat16"``,
      ``param_dtype``, ``scan_layers``, ``remat``, ``max_seq_len``, ...). Tensors are cast to
      ``param_dtype``.

  Returns:
    the model; ``model.cfg`` is its configuration.

  Raises:
    ValueError: naming the tensor when one the architecture needs is missing, has another
      shape, or when the checkpoint holds one it does not use; naming the ``config.json`` field
      that it cannot implement.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise ValueError(f"path: expected a checkpoint directory with a config.json, got {path!r}")
  with open(config_file) as f:
    cfg = config_from_xlstm(json.load(f), **overrides)
  reader = _Reader(path)
  abstract = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = _shardings(state, mesh)
  used = set()

  def load(key_path, variable, sharding):
    rule, stacked = _rule(key_path, cfg)
    names = rule.names(cfg.num_layers) if stacked else [rule.name]
    used.update(names)
    value = _assemble(reader, names, rule, variable, stacked)
    sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
    return variable.replace(
      jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    )

  state = jax.tree_util.tree_map_with_path(
    load, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  unused = sorted(set(reader.names) - used)
  if unused:
    raise ValueError(
      f"{unused[0]}: a tensor of the checkpoint that the xLSTM architecture does not have "
      f"({len(unused)} such tensors in {path})"
    )
  return nnx.merge(graphdef, state)


def save_xlstm(model: LM, path: str | os.PathLike) -> list[str]:
  """Writes ``model`` as an xLSTM checkpoint in the published layout: ``config.json``
  (transformers' ``xLSTMConfig`` keys) and ``model.safetensors``. ``load_xlstm`` of the result
  gives the same parameters, bit for bit; a checkpoint read by ``load_xlstm`` is written back with
  the same tensors.

  Args:
    model: an ``LM`` of ``"mlstm"`` layers only (``config_from_xlstm``'s architecture), with or
      without ``scan_layers``.
    path: a new or empty directory.

  Returns:
    The files written, relative to ``path``.

  Raises:
    ValueError: a model the published architecture cannot express (naming the field).
    FileExistsError: ``path`` already holds a checkpoint.
  """
  cfg = model.cfg
  if set(cfg.layer_mixers) != {"mlstm"}:
    raise ValueError(f"model: expected only 'mlstm' layers, got {cfg.layer_mixers}")
  config = _xlstm_config(cfg)
  # What config.json cannot say: the compute setup, and the initialization of the input gate.
  kept = {
    f: getattr(cfg, f) for f in ("max_seq_len", "dtype", "param_dtype", "scan_layers", "remat")
  }
  kept["mlstm"] = {"igate_bias_init": cfg.options("mlstm").igate_bias_init}
  back = config_from_xlstm(config, **kept)
  differ = [
    f.name
    for f in dataclasses.fields(cfg)
    if f.name not in ("mlp_hidden", "mlp_ratio", "init_std")
    and getattr(back, f.name) != getattr(cfg, f.name)
  ]
  if back.mlp_dim != cfg.mlp_dim:
    differ.append("mlp_hidden")
  if differ:
    raise ValueError(
      f"model: the published xLSTM architecture cannot express its {differ} "
      f"({', '.join(f'{n}={getattr(cfg, n)!r}' for n in differ[:3])})"
    )
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, "config.json")) or os.path.exists(os.path.join(path, INDEX)):
    raise FileExistsError(f"path: {path} already holds a checkpoint; expected a new directory")
  tensors = {}
  for key_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    rule, stacked = _rule(key_path, cfg)  # flat-state keys are the plain names
    value = np.asarray(jax.device_get(variable[...]))
    names = rule.names(cfg.num_layers) if stacked else [rule.name]
    for name, part in zip(names, value if stacked else [value], strict=True):
      tensors[name] = _published(part, rule)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return ["model.safetensors", "config.json"]


def _published(value: np.ndarray, rule: "_Rule") -> np.ndarray:
  """A jaxrec parameter in the published layout (``_rearranged`` backwards)."""
  if rule.same_shape:
    return np.ascontiguousarray(value)
  if rule.num_in is None:
    return np.ascontiguousarray(value.reshape(-1))
  matrix = value.reshape(math.prod(value.shape[: rule.num_in]), -1)
  return np.ascontiguousarray(matrix.T)


def _xlstm_config(cfg: LMConfig) -> dict:
  """The ``config.json`` that ``config_from_xlstm`` reads back as ``cfg``'s architecture."""
  mlstm = cfg.options("mlstm")
  # The published FFN width is round_up(d · 2.667, multiple); any other width is written as its
  # own multiple.
  factor, multiple = next(
    ((2.667, m) for m in (64, 16) if int((cfg.d_model * 2.667 + m - 1) // m) * m == cfg.mlp_dim),
    (cfg.mlp_dim / cfg.d_model, cfg.mlp_dim),
  )
  return {
    "architectures": ["xLSTMForCausalLM"],
    "model_type": "xlstm",
    "vocab_size": cfg.vocab_size,
    "embedding_dim": cfg.d_model,
    "hidden_size": cfg.d_model,
    "num_blocks": cfg.num_layers,
    "num_hidden_layers": cfg.num_layers,
    "num_heads": cfg.num_heads,
    "use_bias": False,
    "norm_eps": cfg.norm_eps,
    "add_out_norm": True,
    "qk_dim_factor": mlstm.qk_dim_factor,
    "v_dim_factor": mlstm.v_dim_factor,
    "chunk_size": mlstm.chunk_size,
    "eps": mlstm.eps,
    "ffn_proj_factor": factor,
    "ffn_round_up_to_multiple_of": multiple,
    "gate_soft_cap": mlstm.gate_soft_cap,
    "output_logit_soft_cap": cfg.logit_soft_cap,
    "weight_mode": "single",
    "tie_word_embeddings": cfg.tie_embeddings,
    "torch_dtype": str(np.dtype(cfg.param_dtype)),
  }


# ----------------------------------------------------------------------------------------------
# Name mapping.


class _Rule(NamedTuple):
  """Where a parameter comes from: the published tensor ``name`` (``{i}`` for the block index)
  and, for a kernel, how many leading axes of the jaxrec kernel are input axes (``num_in``; the
  published ``[out, in]`` matrix is transposed and split). ``num_in=None``: a published vector
  split into the parameter's shape, or with ``same_shape`` a tensor taken as it is."""

  name: str
  num_in: int | None
  same_shape: bool = False

  def names(self, num_blocks: int) -> list[str]:
    return [self.name.format(i=i) for i in range(num_blocks)]


_BLOCK = "backbone.blocks.{i}."
_MIXER = _BLOCK + "mlstm_layer."
_BLOCK_RULES = {
  "mixer_norm.scale": _Rule(_BLOCK + "norm_mlstm.weight", None),
  "mixer.q_proj.kernel": _Rule(_MIXER + "q.weight", 1),
  "mixer.k_proj.kernel": _Rule(_MIXER + "k.weight", 1),
  "mixer.v_proj.kernel": _Rule(_MIXER + "v.weight", 1),
  "mixer.o_gate.kernel": _Rule(_MIXER + "ogate_preact.weight", 1),
  "mixer.i_gate.kernel": _Rule(_MIXER + "igate_preact.weight", 1),
  "mixer.i_bias": _Rule(_MIXER + "igate_preact.bias", None),
  "mixer.f_gate.kernel": _Rule(_MIXER + "fgate_preact.weight", 1),
  "mixer.f_bias": _Rule(_MIXER + "fgate_preact.bias", None),
  "mixer.out_norm.scale": _Rule(_MIXER + "multihead_norm.weight", None),
  "mixer.out_proj.kernel": _Rule(_MIXER + "out_proj.weight", 2),
  "mlp_norm.scale": _Rule(_BLOCK + "norm_ffn.weight", None),
  "mlp.gate.kernel": _Rule(_BLOCK + "ffn.proj_up_gate.weight", 1),
  "mlp.up.kernel": _Rule(_BLOCK + "ffn.proj_up.weight", 1),
  "mlp.down.kernel": _Rule(_BLOCK + "ffn.proj_down.weight", 1),
}
_TOP_RULES = {
  "embedding": _Rule("backbone.embeddings.weight", None, same_shape=True),
  "final_norm.scale": _Rule("backbone.out_norm.weight", None),
  "head.kernel": _Rule("lm_head.weight", 1),
}


def _rule(key_path, cfg: LMConfig) -> tuple[_Rule, bool]:
  """The rule of the parameter at ``key_path``, and whether it stacks every block's tensor."""
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path]
  if keys[0] != "layers":
    return _TOP_RULES[".".join(keys)], False
  if cfg.scan_layers:  # layers.blocks.0.<...>: one mixer in the pattern, stacked over blocks
    return _BLOCK_RULES[".".join(keys[3:])], True
  rule = _BLOCK_RULES[".".join(keys[2:])]
  return rule._replace(name=rule.name.format(i=keys[1])), False


def _assemble(reader, names, rule: _Rule, variable, stacked: bool) -> np.ndarray:
  """The parameter's value from its published tensors (one, or one per block when stacked)."""
  shape = variable.shape[1:] if stacked else variable.shape
  dtype = variable.dtype
  parts = [_rearranged(reader, name, rule, shape, dtype) for name in names]
  return np.stack(parts) if stacked else parts[0]


def _rearranged(reader, name: str, rule: _Rule, shape, dtype) -> np.ndarray:
  if rule.same_shape:
    published = tuple(shape)
  elif rule.num_in is None:
    published = (math.prod(shape),)
  else:
    published = (math.prod(shape[rule.num_in :]), math.prod(shape[: rule.num_in]))
  got = reader.shape(name)
  if got != published:
    raise ValueError(
      f"{name}: expected shape {published} (jaxrec's {tuple(shape)}), got {got} in the checkpoint"
    )
  tensor = reader.read(name)
  if rule.num_in is not None:
    tensor = tensor.T
  return np.ascontiguousarray(tensor.reshape(shape).astype(dtype))


def _shardings(state, mesh):
  if mesh is None:
    single = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
      lambda v: v.replace(single), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
  return tree_shardings(state, mesh)


# ----------------------------------------------------------------------------------------------
# Reading.


class _Reader:
  """The tensors of a checkpoint directory, one at a time, as numpy arrays."""

  def __init__(self, path: str):
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    else:
      files = {}
      for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
          with safe_open(os.path.join(path, file), framework="numpy") as f:
            files.update(dict.fromkeys(f.keys(), os.path.join(path, file)))
      if not files:
        raise ValueError(f"path: expected {INDEX} or *.safetensors files in {path!r}, found none")
    self.files = files
    self.names = tuple(files)

  def _open(self, name):
    if name not in self.files:
      raise ValueError(
        f"{name}: a tensor the xLSTM architecture needs, missing from the checkpoint"
      )
    return safe_open(self.files[name], framework="numpy")

  def shape(self, name) -> tuple[int, ...]:
    with self._open(name) as f:
      return tuple(f.get_slice(name).get_shape())

  def read(self, name) -> np.ndarray:
    with self._open(name) as f:
      if f.get_slice(name).get_dtype() != "BF16":
        return f.get_tensor(name)
    return _read_bf16(self.files[name], name)


def _read_bf16(file: str, name: str) -> np.ndarray:
  """A bfloat16 tensor, which numpy (and so safetensors' numpy API) has no dtype for: read from
  the file's own layout (an 8-byte header length, a JSON header of offsets, then the data)."""
  with open(file, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_len))[name]
    begin, end = entry["data_offsets"]
    f.seek(8 + header_len + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, ml_dtypes.bfloat16).reshape(entry["shape"])
