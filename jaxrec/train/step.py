"""Train state, sharded initialization, and the jitted train and eval steps.

Both steps are pure ``jax.jit`` functions of arrays: the model's ``nnx.GraphDef`` is static (closed
over) and ``nnx.merge`` rebuilds the module from the state inside the trace. Batches are dicts of
``[B, T]`` arrays (``inputs``, ``targets``, ``segment_ids``, ``weights``), ``B`` split over the mesh
axes ``data`` and ``fsdp``.

Loss: softmax cross-entropy weighted by ``weights``, averaged over the weighted target tokens.
Bits per byte: ``sum(w * ce) / ln 2 / sum(w * bytes(target))``, with the UTF-8 bytes each target
token stands for (``metrics.token_byte_lengths``); special tokens count zero bytes. Without a byte
count the step reports bits per token.

The model runs under ``nnx.capture``, and what its layers sow under the two reserved names of
``jaxrec.layers.observe`` joins the step: every ``aux_loss`` term is added to the objective, and
every ``metrics`` entry is reported under its own key (the mean over the modules that sow it).
Both are per-token means, weighted by the tokens like the loss.
"""

import functools
import math
import operator
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec import sharding as sharding_lib
from jaxrec.layers import observe

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator.

  Attributes:
    step: number of optimizer updates applied, int32 scalar.
    params: the model's ``nnx.Param`` state.
    rest: the model's other state (read by the model, never updated by training).
    opt_state: the optax state; its moments are ``nnx.Variable`` trees carrying the parameters'
      logical axis names, so they are sharded like the parameters.
  """

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState


def abstract_train_state(
  make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState]:
  """The model's graphdef and the train state as ``ShapeDtypeStruct`` s carrying their shardings.

  Nothing is allocated. The shardings come from the parameters' logical axis names through
  ``jaxrec.sharding.LOGICAL_AXIS_RULES``.
  """
  with nnx.use_eager_sharding(False):
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))
  shapes = jax.eval_shape(lambda: _init(make_model, tx))
  shardings = sharding_lib.tree_shardings(shapes, mesh)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  return graphdef, abstract


def init_train_state(
  make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, abstract: TrainState
) -> TrainState:
  """Initializes the model and optimizer directly into their shardings (one jitted call)."""
  return train_state_initializer(make_model, tx, abstract)()


def train_state_initializer(
  make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, abstract: TrainState
) -> Callable[[], TrainState]:
  """``init_train_state`` as a function to call again: compiled once, each call returns a fresh
  state (for runs that each start from the same initialization)."""
  return jax.jit(lambda: _init(make_model, tx), out_shardings=_shardings(abstract))


def train_state_from_model(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  trainable: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """The train state of an existing model, for fine-tuning it: ``(graphdef, abstract, state)``.

  The parameters that ``trainable`` selects (e.g. ``nnx.LoRAParam``) become ``params``, and only
  they get gradients and optimizer state; everything else goes to ``rest``, frozen. The state is
  a copy placed in its shardings on ``mesh`` (``abstract`` carries them, for
  ``make_train_step``): the train step donates its input, which would otherwise delete the
  arrays of ``model`` and of any model sharing them (a converted model shares its teacher's).
  """
  graphdef, params, rest = nnx.split(model, trainable, ...)
  state = TrainState(
    step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
  )
  shardings = sharding_lib.tree_shardings(state, mesh)
  # Copied first: ``device_put(..., may_alias=False)`` still hands over the source buffer as the
  # shard on its own device when the target spans several devices (jax 0.10), and the first
  # step would then delete the model's arrays.
  state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
  return graphdef, abstract, state


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  abstract: TrainState,
  mesh: Mesh,
  *,
  accum_steps: int = 1,
  byte_lengths: np.ndarray | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns ``train_step(state, batch) -> (state, metrics)``, jitted, donating ``state``.

  Gradient accumulation scans over ``accum_steps`` microbatches inside the step rather than
  wrapping the optimizer in ``optax.MultiSteps``: the weighted loss *sums* and token counts are
  accumulated and divided once, so the update equals the full-batch update even when microbatches
  hold different numbers of real tokens (``MultiSteps`` averages per-microbatch means); one call
  is one optimizer update (learning rate, step counter and metrics stay per update); and no
  gradient accumulator has to live in the optimizer state and the checkpoints.

  Args:
    graphdef: static model structure, from ``abstract_train_state``.
    tx: the optimizer.
    schedule: its learning-rate schedule, reported as ``learning_rate``.
    abstract: the abstract train state (gives the shardings of input and output).
    mesh: the device mesh.
    accum_steps: microbatches per step; must divide the per-shard batch.
    byte_lengths: ``[vocab]`` UTF-8 bytes per token id, or ``None`` for bits per token.

  Returns:
    The step. ``metrics`` has ``loss`` (nats per weighted token), ``bits_per_byte`` (or
    ``bits_per_token``), ``grad_norm`` (global norm before clipping), ``learning_rate`` (the one
    this update used), ``tokens`` (weighted target tokens), ``batch_checksum``
    (``batch_checksum``: which data the step saw) and the metrics the model sows; what it sows as
    ``aux_loss`` is added to the objective.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps: expected a positive integer, got {accum_steps}")
  loss_sums = _make_loss_sums(graphdef, byte_lengths)
  grad_fn = jax.grad(loss_sums, has_aux=True)
  micro_sharding = NamedSharding(mesh, P(None, sharding_lib.batch_axes(mesh)))

  def train_step(state: TrainState, batch: Batch):
    if accum_steps == 1:
      grads, sums = grad_fn(state.params, state.rest, batch)
    else:
      micro = jax.tree.map(lambda x: _microbatches(x, accum_steps, micro_sharding), batch)

      def accumulate(carry, microbatch):
        out = grad_fn(state.params, state.rest, microbatch)
        return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, out), None

      # fp32 accumulators, also for half-precision parameters.
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
        jax.eval_shape(grad_fn, state.params, state.rest, first),
      )
      (grads, sums), _ = lax.scan(accumulate, zeros, micro)
    # Sums over all microbatches divided once: the token-weighted mean of the whole batch.
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _summarize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics["batch_checksum"] = batch_checksum(batch)
    new_state = TrainState(step=state.step + 1, params=params, rest=state.rest, opt_state=opt_state)
    return new_state, metrics

  state_shardings = _shardings(abstract)
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )


def batch_checksum(batch: Batch) -> jax.Array:
  """A fingerprint of the batch's inputs and targets, with their positions, below ``2**24``.

  Integer sums (uint32, wrapping), so it is the same whatever the sharding, the number of hosts
  or the order of the reduction, and exact as a float32 metric: two runs that log equal checksums
  trained on the same rows in the same order (up to a 2**-24 chance).
  """
  total = jnp.zeros((), jnp.uint32)
  for i, key in enumerate(("inputs", "targets")):
    ids = batch[key].astype(jnp.uint32) + 1
    position = lax.broadcasted_iota(jnp.uint32, ids.shape, 0) * jnp.uint32(ids.shape[1])
    position = position + lax.broadcasted_iota(jnp.uint32, ids.shape, 1)
    # An odd multiplier per position and field (Knuth's multiplicative hash constant).
    weight = (position * jnp.uint32(2) + jnp.uint32(2 * i + 1)) * jnp.uint32(2654435761)
    total = total + jnp.sum(ids * weight, dtype=jnp.uint32)
  return (total % jnp.uint32(2**24)).astype(jnp.int32)


def make_eval_step(
  graphdef: nnx.GraphDef, byte_lengths: np.ndarray | None = None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Returns ``eval_step(state, batch) -> sums``, jitted: ``loss_sum``, ``tokens`` (and ``bytes``).

  Sums, not means, so the caller can add them over a validation set and divide once
  (``summarize``).
  """
  loss_sums = _make_loss_sums(graphdef, byte_lengths)
  return jax.jit(lambda state, batch: loss_sums(state.params, state.rest, batch)[1])


def summarize(sums: dict) -> dict:
  """Loss and bits per byte (or per token) from summed ``loss_sum``, ``tokens`` (, ``bytes``)."""
  return {k: float(v) for k, v in _summarize(sums).items()}


_SUMS = ("loss_sum", "tokens", "bytes")  # every other entry of the sums is a sown metric
_OWN = (
  *_SUMS,
  "loss",
  "bits_per_byte",
  "bits_per_token",
  "grad_norm",
  "learning_rate",
  "batch_checksum",
)


def _summarize(sums):
  out = {"loss": sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), "tokens": sums["tokens"]}
  out |= {k: v / jnp.maximum(sums["tokens"], 1.0) for k, v in sums.items() if k not in _SUMS}
  if "bytes" in sums:
    out["bits_per_byte"] = sums["loss_sum"] / math.log(2) / jnp.maximum(sums["bytes"], 1.0)
  else:
    out["bits_per_token"] = out["loss"] / math.log(2)
  return out


def _make_loss_sums(graphdef: nnx.GraphDef, byte_lengths: np.ndarray | None):
  table = None if byte_lengths is None else jnp.asarray(byte_lengths, jnp.float32)

  def loss_sums(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    forward = nnx.capture(
      lambda model: model(batch["inputs"], segment_ids=batch["segment_ids"]), nnx.Intermediate
    )
    (logits, _), sown = forward(model)
    aux_loss, metrics = _observations(sown)
    ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["targets"]
    )
    weights = batch["weights"].astype(jnp.float32)
    sums = {"loss_sum": jnp.sum(ce * weights), "tokens": jnp.sum(weights)}
    if table is not None:
      sums["bytes"] = jnp.sum(weights * table[batch["targets"]])
    # Auxiliary terms (an MoE's load-balancing loss) are per-token means: weighted by the tokens
    # so that dividing by the token count (the gradients, the metrics) gives them back.
    objective = sums["loss_sum"] + aux_loss * sums["tokens"]
    sums |= {k: v * sums["tokens"] for k, v in metrics.items()}
    return objective, sums

  return loss_sums


def _observations(sown: nnx.State) -> tuple[jax.Array | float, dict[str, jax.Array]]:
  """The sum of the ``aux_loss`` terms and the ``metrics`` that ``sown`` holds (``0.0`` and
  ``{}`` without any); a metric sown by several modules (stacked over scanned layers) is the
  mean of all its values."""
  terms, values = [], {}
  for path, variable in nnx.to_flat_state(sown):
    if path[-1] == observe.AUX_LOSS:
      # A term sown inside scanned layers comes stacked over them.
      terms.extend(t if jnp.ndim(t) == 0 else jnp.sum(t) for t in variable.get_value())
    elif path[-1] == observe.METRICS:
      for metrics in variable.get_value():
        for key, value in metrics.items():
          values.setdefault(key, []).append(jnp.asarray(value))
  if any(key in _OWN for key in values):
    raise ValueError(f"sown metrics: the names {_OWN} are the step's own, got {sorted(values)}")
  aux_loss = functools.reduce(operator.add, terms) if terms else 0.0
  metrics = {key: _mean(v) for key, v in values.items()}
  return aux_loss, metrics


def _mean(values: list[jax.Array]) -> jax.Array:
  """The mean of every entry of ``values``; one scalar is returned as it is."""
  if len(values) == 1 and values[0].ndim == 0:
    return values[0]
  return jnp.mean(jnp.concatenate([jnp.ravel(v) for v in values]))


def _microbatches(x: jax.Array, accum_steps: int, sharding: NamedSharding) -> jax.Array:
  """``[B, ...] -> [A, B / A, ...]``, microbatch ``a`` holding rows ``a, a + A, ...``.

  Strided rather than contiguous rows: each device's contiguous block of the batch then feeds
  every microbatch, so the split moves no data between devices.
  """
  rows = x.shape[0]
  if rows % accum_steps:
    raise ValueError(f"accum_steps: expected a divisor of the batch size {rows}, got {accum_steps}")
  x = x.reshape(rows // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return lax.with_sharding_constraint(x, sharding)


def _init(make_model, tx) -> TrainState:
  with nnx.use_eager_sharding(False):
    model = make_model()
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params)
  )


def _shardings(abstract: TrainState):
  return jax.tree.map(lambda x: x.sharding, abstract)
