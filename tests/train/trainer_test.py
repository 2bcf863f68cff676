"""``Trainer``: fitting lowers the loss and follows the WSD schedule step by step, every run starts
from the same initialization, evaluation equals a float64 numpy cross-entropy of the model's
logits, and a fine-tune changes only the parameters its filter selects."""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from testing_utils import assert_close

from jaxrec import train
from jaxrec.data import ByteTokenizer
from jaxrec.linearize import apply_lora
from jaxrec.models import LM, get_preset

B, T, STEPS = 8, 16, 10
# WSD with a linear cooldown: re-warm 1e-3 -> 1e-2 over 2 steps, hold, cool to 1e-3 over 4.
WSD = train.OptimConfig(
  learning_rate=1e-2,
  schedule="wsd",
  warmup_steps=2,
  init_lr=1e-3,
  decay_steps=4,
  decay_shape="linear",
)


def _cfg():
  return get_preset(
    "tiny",
    vocab_size=ByteTokenizer.vocab_size,
    d_model=16,
    num_layers=1,
    num_heads=2,
    mixer_pattern=("attention",),
  )


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (B, T + 1)).astype(np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": np.sort(rng.integers(1, 3, (B, T)), axis=1).astype(np.int32),
    "weights": (rng.random((B, T)) < 0.8).astype(np.float32),
  }


def _mesh():
  return train.make_mesh(train.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, jax.device_count()))


@pytest.fixture(scope="module")
def trainer():
  byte_lengths = train.token_byte_lengths(ByteTokenizer())
  return train.Trainer(_cfg(), WSD, steps=STEPS, mesh=_mesh(), seed=3, byte_lengths=byte_lengths)


@pytest.fixture(scope="module")
def history(trainer):
  """Every step's metrics of a 10-step fit on one batch, repeated (it can be memorized)."""
  steps = []
  state, last = trainer.fit(
    trainer.init(),
    [_batch(0)] * STEPS,
    STEPS,
    callback=lambda step, _, metrics: steps.append((step, jax.device_get(metrics))),
  )
  assert int(state.step) == STEPS and [s for s, _ in steps] == list(range(1, STEPS + 1))
  assert float(last["loss"]) == float(steps[-1][1]["loss"])
  return [m for _, m in steps]


def test_fit_lowers_the_loss_of_a_memorizable_batch(history):
  losses = [float(m["loss"]) for m in history]
  assert losses[-1] < losses[0] - 0.2, losses  # uniform guessing is ln 259 = 5.56 nats
  assert all(np.isfinite(losses))


def test_fit_follows_the_wsd_schedule_to_its_end(trainer, history):
  def wsd(s):  # WSD's definition, linear cooldown
    if s < 2:
      return 1e-3 + (1e-2 - 1e-3) * s / 2
    if s < STEPS - 4:
      return 1e-2
    return 1e-3 + (1e-2 - 1e-3) * (1 - (s - (STEPS - 4)) / 4)

  # The metric is the learning rate of each update, i.e. at the step count before it.
  got = [float(m["learning_rate"]) for m in history]
  assert_close(got, [wsd(s) for s in range(STEPS)], rtol=1e-6)  # float32 arithmetic
  assert got[0] == np.float32(1e-3) and got[2:6] == [np.float32(1e-2)] * 4
  assert float(trainer.schedule(STEPS)) == pytest.approx(1e-3, rel=1e-6)


def test_every_run_starts_from_the_same_initialization_and_a_callback_stops_it(trainer, history):
  state, metrics = trainer.fit(
    trainer.init(), [_batch(0)] * STEPS, STEPS, callback=lambda step, *_: step == 3
  )
  assert int(state.step) == 3
  assert float(metrics["loss"]) == float(history[2]["loss"])  # the same numbers, bit for bit
  other = trainer.fit(trainer.init(seed=4), [_batch(0)], 1)[1]
  assert float(other["loss"]) != float(history[0]["loss"])
  with pytest.raises(ValueError, match="batches: expected 3 batches, ran out after 2"):
    trainer.fit(trainer.init(), [_batch(0)] * 2, 3)


def test_evaluate_is_the_token_weighted_cross_entropy_of_the_whole_set(trainer):
  state = trainer.init()
  batches = [_batch(10), _batch(11)]
  got = trainer.evaluate(state, iter(batches), 2)

  model = trainer.model(state)
  forward = jax.jit(lambda m, x, s: m(x, segment_ids=s)[0])
  loss_sum = tokens = num_bytes = 0.0
  for batch in batches:
    logits = np.asarray(forward(model, batch["inputs"], batch["segment_ids"]), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
    loss_sum += float(np.sum(ce * batch["weights"]))
    tokens += float(batch["weights"].sum())
    num_bytes += float(np.sum(batch["weights"] * (batch["targets"] < 256)))  # ids < 256: a byte
  # float32 cross-entropies (a few ulps each) summed over 256 tokens (pairwise: ~8 ulps).
  assert got["tokens"] == tokens
  assert_close(got["loss"], loss_sum / tokens, rtol=1e-5)
  assert_close(got["bits_per_byte"], loss_sum / math.log(2) / num_bytes, rtol=1e-5)
  with pytest.raises(ValueError, match="batches: expected 3 batches, ran out after 2"):
    trainer.evaluate(state, iter(batches), 3)


def test_a_fine_tune_changes_only_the_parameters_its_filter_selects():
  model = LM(_cfg(), rngs=nnx.Rngs(0))
  apply_lora(model, rank=2, targets=("q_proj", "v_proj"))
  before = {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # No weight decay: a parameter moves only when it has a gradient (A has one once B != 0).
  optim = train.OptimConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.0)
  trainer = train.Trainer(model, optim, steps=2, mesh=_mesh(), trainable=nnx.LoRAParam)
  state, _ = trainer.fit(trainer.init(), [_batch(0), _batch(1)], 2)

  trained = {p for p, _ in nnx.to_flat_state(state.params)}
  assert trained and all("lora" in p for p in trained)
  after = dict(nnx.to_flat_state(nnx.state(trainer.model(state), nnx.Param)))
  for path, value in before.items():
    same = np.array_equal(np.asarray(after[path][...]), value)
    assert same == (path not in trained), path
  # The fine-tuned model's arrays are a copy: the module given keeps its own.
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    np.testing.assert_array_equal(value[...], before[path])
  with pytest.raises(ValueError, match="seed: a module's fine-tuning starts from its parameters"):
    trainer.init(seed=1)


def test_optim_config_checks_and_defaults():
  assert train.OptimConfig(learning_rate=1.0, schedule="wsd").make_schedule(100)(80) == 1.0
  assert float(train.OptimConfig(learning_rate=1.0, schedule="wsd").make_schedule(100)(81)) < 1.0
  with pytest.raises(ValueError, match="schedule: expected one of"):
    train.OptimConfig(learning_rate=1.0, schedule="step")
  with pytest.raises(ValueError, match="warmup_steps: the constant schedule has no warmup"):
    train.OptimConfig(learning_rate=1.0, schedule="constant", warmup_steps=3)
  with pytest.raises(ValueError, match="trainable: a fresh model trains all its parameters"):
    train.Trainer(_cfg(), WSD, steps=STEPS, mesh=_mesh(), trainable=nnx.LoRAParam)
