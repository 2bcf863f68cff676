"""Train step: sharded equals single-device; loss, bits/byte, clipping and AdamW against numpy;
what the model sows joins the objective and the metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from testing_utils import assert_close, max_abs

from jaxrec import sharding
from jaxrec.data import ByteTokenizer
from jaxrec.layers import observe
from jaxrec.models import LM, get_preset
from jaxrec.train import distributed, metrics, optim
from jaxrec.train import step as step_lib

# Adam divides by sqrt(v): where a coordinate's gradients nearly cancel across steps, fp32
# reduction-order noise (~1e-7 relative, different on every mesh) is amplified by up to |g| / eps.
# EPS at the scale of the gradients bounds that, so the mesh comparison tests the sharding rather
# than Adam's conditioning.
LR, WD, CLIP, EPS = 1e-2, 0.1, 0.5, 1e-3
B, T = 8, 16


def _model_cfg():
  return get_preset(
    "tiny",
    vocab_size=ByteTokenizer.vocab_size,
    d_model=32,
    num_layers=2,
    num_heads=2,
    mixer_pattern=("gla", "attention"),
    gla={"chunk_size": 8},
  )


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, ByteTokenizer.vocab_size, (B, T + 1)).astype(np.int32)
  segments = np.sort(rng.integers(1, 3, (B, T)), axis=1).astype(np.int32)
  weights = (rng.random((B, T)) < 0.8).astype(np.float32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segments,
    "weights": weights,
  }


def _setup(mesh, accum_steps=1):
  schedule = optim.warmup_cosine_schedule(LR, total_steps=10, warmup_steps=0)
  tx = optim.make_optimizer(schedule, weight_decay=WD, eps=EPS, clip_norm=CLIP)

  def make_model():
    return LM(_model_cfg(), rngs=nnx.Rngs(0))

  graphdef, abstract = step_lib.abstract_train_state(make_model, tx, mesh)
  train_step = step_lib.make_train_step(
    graphdef,
    tx,
    schedule,
    abstract,
    mesh,
    accum_steps=accum_steps,
    byte_lengths=metrics.token_byte_lengths(ByteTokenizer()),
  )
  return graphdef, abstract, lambda: step_lib.init_train_state(make_model, tx, abstract), train_step


def _run(mesh, batches, accum_steps=1):
  """Returns the graphdef, the parameters before and after every step, and the metrics."""
  graphdef, _, init, train_step = _setup(mesh, accum_steps)
  state = init()
  params = [jax.tree.map(np.asarray, state.params)]
  history = []
  for batch in batches:
    state, m = train_step(state, distributed.global_batch(batch, mesh))
    params.append(jax.tree.map(np.asarray, state.params))  # copied: the next step donates state
    history.append(jax.tree.map(float, jax.device_get(m)))
  assert int(state.step) == len(batches)
  return graphdef, params, history


@pytest.fixture(scope="module")
def single():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  return _run(mesh, [_batch(0), _batch(1)])


def _assert_params_close(actual, expected):
  # Entries near zero have no meaningful relative error; atol is 1e-4 of the step size LR.
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6),
    actual,
    expected,
  )


def test_eight_device_mesh_with_microbatches_matches_one_device(single):
  """data=2 x fsdp=2 x tensor=2 and 2 scanned microbatches against one device, one batch."""
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh((2, 2, 2))
  _, params, history = _run(mesh, [_batch(0), _batch(1)], accum_steps=2)
  _, ref_params, ref_history = single
  for got, want in zip(history, ref_history, strict=True):
    for key in ("loss", "bits_per_byte", "grad_norm", "learning_rate"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  _assert_params_close(params[-1], ref_params[-1])


def test_parameters_are_sharded_by_logical_names():
  mesh = sharding.make_mesh((2, 2, 2))
  _, abstract, _, _ = _setup(mesh)
  specs = jax.tree.map(lambda x: x.sharding.spec, abstract)
  up = ("layers", 0, "mlp", "up", "kernel")
  kernel_spec = specs.params[up[0]][up[1]][up[2]][up[3]][up[4]].get_value()
  assert kernel_spec == jax.P("fsdp", "tensor")  # ("embed", "mlp")
  # Adam's moments mirror the parameters' placement.
  mu = specs.opt_state[1][0].mu
  assert mu[up[0]][up[1]][up[2]][up[3]][up[4]].get_value() == kernel_spec
  # vocab = 259 is odd, so the embedding stays whole along it: ("vocab", "embed") -> (None, fsdp).
  assert specs.params["embedding"].get_value() == jax.P(None, "fsdp")
  assert specs.step == jax.P()


def _reference_loss(graphdef, params, batch):
  """Weighted next-token cross-entropy written with log_softmax, not optax."""
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  return (nll * batch["weights"]).sum() / batch["weights"].sum()


def test_first_step_against_numpy_adamw(single):
  graphdef, params, history = single
  batch = _batch(0)
  reference = jax.jit(jax.value_and_grad(_reference_loss, argnums=1), static_argnums=0)
  loss, grads = reference(graphdef, params[0], batch)
  np.testing.assert_allclose(history[0]["loss"], loss, rtol=1e-5)
  # Byte tokenizer: ids < 256 are one byte, the special ids none.
  nbytes = (batch["weights"] * (batch["targets"] < 256)).sum()
  bpb = loss * batch["weights"].sum() / math.log(2) / nbytes
  np.testing.assert_allclose(history[0]["bits_per_byte"], bpb, rtol=1e-5)
  grads = jax.tree.map(np.asarray, grads)
  norm = math.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(history[0]["grad_norm"], norm, rtol=1e-5)
  assert norm > CLIP  # so the clipping is exercised
  np.testing.assert_allclose(history[0]["learning_rate"], LR, rtol=1e-6)

  # First AdamW step: bias-corrected m / (sqrt(v) + eps) is g / (|g| + eps); decoupled decay on kernels only
  # (not on the embedding, norm scales or biases).
  g_scale = CLIP / norm
  flat = jax.tree_util.tree_leaves_with_path(params[0])
  for (path, p0), g, p1 in zip(
    flat, jax.tree.leaves(grads), jax.tree.leaves(params[1]), strict=True
  ):
    g = g * g_scale
    decay = WD if "['kernel']" in jax.tree_util.keystr(path) else 0.0
    expected = p0 - LR * (g / (np.abs(g) + EPS) + decay * p0)
    np.testing.assert_allclose(
      p1, expected, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )


def test_accum_steps_must_divide_batch():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, abstract, _, train_step = _setup(mesh, accum_steps=3)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(0))
  with pytest.raises(ValueError, match="accum_steps: expected a divisor of the batch size 8"):
    jax.eval_shape(train_step, abstract, batch)


class _Part(nnx.Module):
  """Sows an auxiliary loss term and a metric, as a layer reports what it observes."""

  def __init__(self, weight: float):
    self.weight = weight

  def __call__(self, logits):
    observe.sow(self, observe.AUX_LOSS, self.weight * jnp.mean(logits**2))
    observe.sow(self, observe.METRICS, {"toy/weight": jnp.float32(self.weight)})


class _Sowing(nnx.Module):
  """Logits straight from an embedding table; two parts sow under the reserved names."""

  def __init__(self, vocab: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, vocab)))
    self.parts = nnx.List([_Part(0.5), _Part(2.0)])

  def __call__(self, tokens, *, segment_ids=None):
    logits = self.embedding[...][tokens]
    for part in self.parts:
      part(logits)
    return logits, None


def test_what_the_model_sows_joins_the_objective_and_the_metrics():
  """The step knows only the reserved names: the aux_loss terms of both parts are added to the
  objective (their sum), a metric sown twice is reported as the mean."""
  vocab, lr = 8, 1.0
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  schedule = optax.constant_schedule(lr)
  tx = optax.sgd(schedule)
  make_model = lambda: _Sowing(vocab, rngs=nnx.Rngs(0))
  graphdef, abstract = step_lib.abstract_train_state(make_model, tx, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, schedule, abstract, mesh)
  batch = jax.tree.map(lambda x: x % vocab if x.dtype == np.int32 else x, _batch(2))
  state = step_lib.init_train_state(make_model, tx, abstract)
  table = np.asarray(state.params["embedding"].get_value(), np.float64)
  state, got = train_step(state, distributed.global_batch(batch, mesh))

  def objective(table):
    """Mean weighted cross-entropy plus the two parts' terms, written out."""
    logits = table[batch["inputs"]]
    nll = -np.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    return (nll * w).sum() / w.sum() + (0.5 + 2.0) * jnp.mean(logits**2)

  with jax.enable_x64():
    grad = np.asarray(jax.grad(objective)(table))
  assert float(got["toy/weight"]) == 1.25
  # SGD: the update is the gradient; fp32 against float64, relative to its largest entry.
  update = (table - np.asarray(state.params["embedding"].get_value(), np.float64)) / lr
  assert_close(update, grad, rtol=0.0, atol=1e-5 * max_abs(grad))


def _checksum_numpy(batch) -> int:
  """``step.batch_checksum`` written out in numpy: uint64 arithmetic taken mod 2**32."""
  total = 0
  for i, key in enumerate(("inputs", "targets")):
    ids = batch[key].astype(np.uint64) + 1
    position = np.arange(ids.size, dtype=np.uint64).reshape(ids.shape)
    weight = ((position * 2 + 2 * i + 1) * 2654435761) % 2**32
    total += int(((ids * weight) % 2**32).sum())
  return total % 2**32 % 2**24


def test_batch_checksum_names_the_data_on_any_mesh():
  """Equal on one device and sharded over eight (integer sums: no reduction order), equal to the
  numpy form, and changed by swapping two rows or two tokens."""
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(-1, 50_000, (B, T), dtype=np.int32) for k in ("inputs", "targets")}
  want = _checksum_numpy(batch)
  mesh = sharding.make_mesh(sharding.mesh_shape({"data": 4, "fsdp": 2, "tensor": 1}, 8))
  sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
  got = jax.jit(step_lib.batch_checksum)(sharded)
  assert int(got) == int(step_lib.batch_checksum(batch)) == want and 0 <= want < 2**24
  assert float(np.float32(got)) == want  # exact as the float32 metric
  swapped = {k: v[[1, 0, *range(2, B)]] for k, v in batch.items()}
  assert int(step_lib.batch_checksum(swapped)) != want
  moved = {k: v.copy() for k, v in batch.items()}
  moved["inputs"][3, [4, 5]] = moved["inputs"][3, [5, 4]]
  assert moved["inputs"][3, 4] != moved["inputs"][3, 5]  # a real swap
  assert int(step_lib.batch_checksum(moved)) != want
