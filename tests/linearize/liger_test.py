"""liger(): the converted LM reuses the teacher's arrays, follows the layer pattern asked for,
decodes like its full forward from a state of constant size, and refuses what it cannot convert."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import jaxrec
from jaxrec import layers
from jaxrec.linearize import liger
from jaxrec.models import LM, LMConfig

CFG = LMConfig(
  vocab_size=32,
  d_model=16,
  num_layers=4,
  mixer_pattern=("attention",),
  num_heads=4,
  num_kv_heads=2,
  tie_embeddings=False,
  init_std=0.5,
  mixer_options={"liger": {"chunk_size": 8}},
)


@pytest.fixture(scope="module")
def teacher():
  return LM(CFG, rngs=nnx.Rngs(0))


def _flat(model):
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_conversion_reuses_the_weights_in_the_layer_pattern(teacher):
  student = liger(teacher, variant="hgrn2", window=5, hybrid_every=2)
  assert student.cfg.mixer_pattern == ("liger", "attention", "liger", "attention")
  options = student.cfg.options("liger")
  assert (options.variant, options.window, options.chunk_size) == ("hgrn2", 5, 8)
  kinds = [type(block.mixer) for block in student.layers]
  assert kinds == [layers.LigerAttention, layers.Attention] * 2
  got, want = _flat(student), _flat(teacher)
  assert got.keys() == want.keys()  # no parameter added
  for path, param in want.items():
    assert got[path].get_value() is param.get_value(), path  # shared, not copied
  assert teacher.cfg == CFG and type(teacher.layers[0].mixer) is layers.Attention


def test_the_random_gate_ablation_adds_only_gate_projections(teacher):
  student = liger(teacher, gate_source="projection", seed=3)
  added = _flat(student).keys() - _flat(teacher).keys()
  assert added == {("layers", i, "mixer", "g_proj", "kernel") for i in range(4)}
  kernel = student.layers[0].mixer.g_proj.kernel[...]
  assert kernel.shape == (16, 2, 4) and np.std(np.asarray(kernel)) > 0.1


def _nbytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def test_converted_model_decodes_like_its_full_forward_past_the_window(teacher):
  student = liger(teacher, window=3)
  prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
  new = 6
  forward = jax.jit(lambda m, tokens: m(tokens)[0])
  want = np.zeros((2, prompt.shape[1] + new), np.int32)
  want[:, : prompt.shape[1]] = prompt
  for t in range(prompt.shape[1], want.shape[1]):
    want[:, t] = np.argmax(forward(student, want)[:, t - 1], axis=-1)
  np.testing.assert_array_equal(jaxrec.generate(student, prompt, new).tokens, want[:, -new:])
  # The decode state does not grow with the context; the teacher's KV caches do.
  assert _nbytes(student.init_cache(1, 16)) == _nbytes(student.init_cache(1, 4096))
  assert _nbytes(teacher.init_cache(1, 4096)) > _nbytes(teacher.init_cache(1, 16))


def test_what_cannot_be_converted_is_refused(teacher):
  with pytest.raises(ValueError, match="hybrid_every: expected an int >= 2"):
    liger(teacher, hybrid_every=1)
  with pytest.raises(ValueError, match=r"liger\.variant: expected one of"):
    liger(teacher, variant="mamba2")
  gla = nnx.eval_shape(
    lambda: LM(dataclasses.replace(CFG, mixer_pattern=("gla",)), rngs=nnx.Rngs(0))
  )
  with pytest.raises(ValueError, match="model: has no 'attention' layer"):
    liger(gla)
  with pytest.raises(ValueError, match=r"model: expected a jaxrec\.models\.LM"):
    liger(teacher.layers[0])
