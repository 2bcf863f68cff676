"""Where each ``LM`` parameter lives in a Hugging Face Llama-family checkpoint, and how the
block of it that one device holds is read: what ``hf`` (safetensors) and ``gguf`` (llama.cpp
files) loaders share.

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
each layout (``Layout``) is a reshape of the Hugging Face tensor followed by a transpose. Both
use RoPE's "rotate half" channel order, so no permutation of the query and key rows is needed.

Loading is tensor by tensor: each parameter is made with ``jax.make_array_from_callback`` in its
sharding (``shardings``: from the parameters' logical axes and
``jaxrec.sharding.LOGICAL_AXIS_RULES`` on a mesh, or one device), and the callback
(``read_block``) reads from the source only the rows of the block that one device holds.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxrec.sharding import tree_shardings


class Layout(NamedTuple):
  """jaxrec array ``= hf.reshape(view).transpose(perm)``; ``groups[i]`` consecutive view axes
  make Hugging Face axis ``i``."""

  groups: tuple[int, ...]
  perm: tuple[int, ...]

  def view(self, shape: Sequence[int]) -> tuple[int, ...]:
    inverse = np.argsort(self.perm)
    return tuple(shape[a] for a in inverse)

  def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The Hugging Face shape of a jaxrec array of ``shape``."""
    view, out, start = self.view(shape), [], 0
    for g in self.groups:
      out.append(math.prod(view[start : start + g]))
      start += g
    return tuple(out)


class Sliceable(Protocol):
  """A Hugging Face tensor that hands out blocks: ``tensor[slices]``, one slice per axis (a
  safetensors slice, or a GGUF tensor dequantized on demand)."""

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray: ...


_SAME_1D = Layout((1,), (0,))
_SAME_2D = Layout((1, 1), (0, 1))
_LINEAR = Layout((1, 1), (1, 0))  # [out, in] -> [in, out]
_HEADS_OUT = Layout((2, 1), (2, 0, 1))  # [H·K, D] -> [D, H, K]
_HEADS_BIAS = Layout((2,), (0, 1))  # [H·K] -> [H, K]
_HEADS_IN = Layout((1, 2), (1, 2, 0))  # [D, H·K] -> [H, K, D]

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


def hf_name(path: Sequence) -> tuple[str, Layout]:
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


def hf_order(name: str) -> tuple:
  """Embedding, blocks in order, final norm, head: the order Hugging Face writes."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), name)
  return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name)


def shardings(state: nnx.State, mesh: Mesh | None) -> dict:
  """``{parameter path: sharding}``: from the logical axis rules on ``mesh``, else one device."""
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return {p: device for p, _ in nnx.to_flat_state(state)}
  placed = tree_shardings(state, mesh)
  return {p: v.get_value() for p, v in nnx.to_flat_state(placed)}


def read_block(tensor: Sliceable, layout: Layout, target, index: tuple[slice, ...]) -> np.ndarray:
  """The block ``index`` of the jaxrec array ``target`` (its shape and dtype) read from the
  Hugging Face ``tensor``: along each fused axis the rows of the outer (head) slice, whole in the
  inner axes, which are then cut."""
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
  # Neither call copies a block already contiguous in the target dtype.
  return np.ascontiguousarray(block.transpose(layout.perm)).astype(target.dtype, copy=False)


def to_hf(array: jax.Array, layout: Layout) -> np.ndarray:
  """The Hugging Face tensor of a jaxrec parameter, gathered to the host."""
  if not array.is_fully_addressable:
    raise ValueError("model: save_pretrained writes from one process; its arrays span several")
  host = np.asarray(jax.device_get(array))
  return np.ascontiguousarray(
    host.transpose(np.argsort(layout.perm)).reshape(layout.hf_shape(host.shape))
  )
