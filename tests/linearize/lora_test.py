"""LoRA: the update's formula on head-axis projections, zero ``B`` changing nothing, merging
reproducing the unmerged model (and exporting it), and training through ``jaxrec.train`` with
only the LoRA factors in the gradients and the optimizer state."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from testing_utils import assert_close, lm_logits_atol, max_abs, rounding_atol

from jaxrec import layers, sharding, train
from jaxrec.linearize import LoRADense, apply_lora, liger, merge_lora
from jaxrec.models import LM, LMConfig, load_pretrained, save_pretrained

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=2,
  mixer_pattern=("attention",),
  num_heads=4,
  num_kv_heads=2,
  qkv_bias=True,
  init_std=0.5,
  mixer_options={"liger": {"window": 3, "chunk_size": 8}},
)
TOKENS = np.random.default_rng(0).integers(0, 32, (4, 9)).astype(np.int32)


def _randomize_b(model, seed=1):
  """Random ``B`` factors (they start at zero), so the updates are not all zero."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, LoRADense):
      b = node.lora.lora_b
      b[...] = rng.standard_normal(b.shape).astype(np.float32)


@jax.jit
def _logits(model, tokens):
  return model(tokens)[0]


def test_lora_dense_adds_the_scaled_low_rank_update_across_head_axes():
  x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
  kw = dict(std=0.5, rngs=nnx.Rngs(0))
  q = layers.Dense(16, (4, 4), ("embed", "heads", "head_dim"), **kw)
  o = layers.Dense((4, 4), 16, ("heads", "head_dim", "embed"), **kw)
  for base, inputs in ((q, x), (o, x.reshape(3, 4, 4))):
    lora = LoRADense(base, rank=2, alpha=6.0, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(lora(inputs), base(inputs))  # B = 0
    _randomize_b(lora)
    a, b = np.asarray(lora.lora.lora_a[...]), np.asarray(lora.lora.lora_b[...])
    flat = inputs.reshape(3, -1)
    kernel = np.asarray(base.kernel[...]).reshape(flat.shape[1], -1)
    want = flat @ kernel + 3.0 * flat @ a @ b
    # The base product (16 long), the low-rank one (16, then 2) and its scale, and the add.
    magnitude = np.abs(flat) @ np.abs(kernel) + 3.0 * np.abs(flat) @ np.abs(a) @ np.abs(b)
    atol = rounding_atol(magnitude, terms=16 + 2 + 2 + 1)
    assert_close(lora(inputs).reshape(3, -1), want, rtol=0, atol=atol)
    assert a.shape == (16, 2) and lora.lora.lora_a.get_metadata()["out_sharding"][1] == "rank"


def test_zero_b_changes_nothing_and_merging_reproduces_the_unmerged_model(tmp_path):
  student = liger(LM(CFG, rngs=nnx.Rngs(0)))
  before = _logits(student, TOKENS)
  apply_lora(student, rank=4, alpha=8.0)
  np.testing.assert_array_equal(_logits(student, TOKENS), before)
  _randomize_b(student)
  unmerged = _logits(student, TOKENS)
  assert max_abs(unmerged - before) > 1e-2
  # Two runs of the model, and the merge's roundings (W + s·A·B: a rank-4 product, the scale and
  # the add).
  atol = lm_logits_atol(unmerged, CFG, 9, extra=6)
  merged = merge_lora(student)
  assert not any(isinstance(n, LoRADense) for _, n in nnx.iter_graph(merged))
  assert not nnx.state(merged, nnx.LoRAParam)
  assert_close(_logits(merged, TOKENS), unmerged, rtol=0, atol=atol)
  # The merged Liger model has Llama weights: it is written and read back as a checkpoint.
  save_pretrained(merged, tmp_path / "liger")
  again = load_pretrained(tmp_path / "liger")
  assert again.cfg == merged.cfg
  np.testing.assert_array_equal(_logits(again, TOKENS), _logits(merged, TOKENS))


def test_lora_trains_through_the_train_step_with_only_its_factors_in_the_optimizer():
  student = apply_lora(liger(LM(CFG, rngs=nnx.Rngs(0))), rank=4, alpha=4.0)
  mesh = sharding.make_mesh((1, 1, 1))
  schedule = optax.constant_schedule(3e-2)
  tx = train.make_optimizer(schedule, weight_decay=0.0)
  graphdef, abstract, state = train.train_state_from_model(
    student, tx, mesh, trainable=nnx.LoRAParam
  )
  n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.LoRAParam)))
  adam = state.opt_state[1][0]  # clip, then adamw's (scale_by_adam, ...)
  assert sum(x.size for x in jax.tree.leaves(adam.mu)) == n_lora
  frozen = jax.tree.map(np.asarray, state.rest)
  step = train.make_train_step(graphdef, tx, schedule, abstract, mesh)
  batch = {
    "inputs": TOKENS[:, :-1],
    "targets": TOKENS[:, 1:],
    "segment_ids": np.zeros((4, 8), np.int32),
    "weights": np.ones((4, 8), np.float32),
  }
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(4):
      state, metrics = step(state, train.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.rest), frozen)
  b = state.params["layers"][0]["mixer"]["q_proj"]["lora"]["lora_b"][...]
  assert max_abs(b) > 0


def test_bad_arguments_are_refused():
  model = LM(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank: expected a positive int"):
    apply_lora(model, rank=0)
  with pytest.raises(ValueError, match="targets: no Dense projection named"):
    apply_lora(model, targets=("qkv",))
  with pytest.raises(ValueError, match="targets: expected a sequence"):
    apply_lora(model, targets="q_proj")
  apply_lora(model, targets=("o_proj",))
  with pytest.raises(ValueError, match="model: already has LoRA"):
    apply_lora(model)
  with pytest.raises(
    ValueError, match=r"o_proj\.base\.kernel has no Hugging Face name .* merge LoRA first"
  ):
    save_pretrained(model, "/nonexistent/never-written")
