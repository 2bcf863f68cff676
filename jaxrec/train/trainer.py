"""``Trainer``: one model and optimizer, compiled once, trained and evaluated on given batches.

Every launcher trains through it: ``train_and_evaluate`` wraps it in checkpoints, metrics and a
sample; the recall sweep, the RAT/RMoE experiments, the ParaRNN comparison and Liger's LoRA
fine-tuning call it directly. A trainer is built from

* a model: an ``LMConfig`` (a fresh model, initialized from a seed directly into its shardings),
  or an existing module to fine-tune, of which only the parameters that ``trainable`` selects
  are trained (e.g. ``nnx.LoRAParam``; the rest is frozen);
* an ``OptimConfig`` and the run's length in steps (its schedule needs it);
* the mesh, the gradient-accumulation microbatches and the token byte lengths (for bits per
  byte).

It builds the schedule, the optimizer, the abstract (sharded) train state and the jitted train and
eval steps once. The train state itself stays a value the caller holds — ``init`` makes one,
``fit`` returns the updated one (the step donates its input), ``evaluate`` reads one — so one
trainer serves several runs of the same model structure (other seeds, other data) without
compiling again, and a checkpoint restores into ``abstract``.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrec.models import LM, LMConfig
from jaxrec.train import distributed, optim
from jaxrec.train import step as step_lib
from jaxrec.train.step import TrainState

# ``callback(step, state, metrics)`` after each update: ``step`` the updates done so far, ``state``
# the new train state (valid until the next update, which donates it), ``metrics`` the step's
# metrics as device arrays (reading one waits for the step). Returning ``True`` stops ``fit``.
Callback = Callable[[int, TrainState, dict[str, jax.Array]], bool | None]


class Trainer:
  """Trains and evaluates one model structure with one optimizer (module docstring).

  Args:
    model: an ``LMConfig`` (a fresh ``LM`` per ``init(seed)``), or a module to fine-tune.
    optim_config: the optimizer and schedule.
    steps: the run's length, for the schedule (``fit`` may run fewer).
    mesh: the device mesh; the state is sharded over it by the parameters' logical axes.
    seed: the default seed of ``init`` (an ``LMConfig`` model only).
    trainable: which parameters of a module given as ``model`` are trained.
    accum_steps: microbatches per step (``make_train_step``).
    byte_lengths: ``[vocab]`` UTF-8 bytes per token id for bits per byte; ``None``: bits per
      token.

  Attributes:
    schedule, tx: the learning-rate schedule and the optimizer.
    graphdef, abstract: the model's static structure and the train state's shapes and shardings
      (what ``Checkpointer.restore`` and ``restore_params`` restore into).
    train_step, eval_step: the jitted steps (``make_train_step``, ``make_eval_step``).
  """

  def __init__(
    self,
    model: LMConfig | nnx.Module,
    optim_config: optim.OptimConfig,
    *,
    steps: int,
    mesh: Mesh,
    seed: int = 0,
    trainable: nnx.filterlib.Filter = nnx.Param,
    accum_steps: int = 1,
    byte_lengths: np.ndarray | None = None,
  ):
    self.mesh, self.seed = mesh, seed
    self.schedule = optim_config.make_schedule(steps)
    self.tx = optim_config.make_optimizer(self.schedule)
    if isinstance(model, LMConfig):
      if trainable is not nnx.Param:
        raise ValueError("trainable: a fresh model trains all its parameters; give a module")
      self._source, self._initializers = None, {}
      self._cfg = model
      self.graphdef, self.abstract = step_lib.abstract_train_state(
        self._model_maker(seed), self.tx, mesh
      )
    elif isinstance(model, nnx.Module):
      self._source, self._trainable = model, trainable
      self.graphdef, self.abstract, self._first = step_lib.train_state_from_model(
        model, self.tx, mesh, trainable=trainable
      )
    else:
      raise ValueError(f"model: expected an LMConfig or an nnx.Module, got {type(model).__name__}")
    self.train_step = step_lib.make_train_step(
      self.graphdef,
      self.tx,
      self.schedule,
      self.abstract,
      mesh,
      accum_steps=accum_steps,
      byte_lengths=byte_lengths,
    )
    self.eval_step = step_lib.make_eval_step(self.graphdef, byte_lengths)

  def init(self, seed: int | None = None) -> TrainState:
    """A fresh train state at step 0, placed in its shardings.

    An ``LMConfig`` model is initialized from ``seed`` (default the trainer's); the
    initialization compiles once per seed. A module given as ``model`` starts from its own
    parameters, copied (the train step donates its input; the module keeps its arrays).
    """
    if self._source is not None:
      if seed is not None:
        raise ValueError(f"seed: a module's fine-tuning starts from its parameters, got {seed}")
      state, self._first = self._first, None
      if state is None:
        state = step_lib.train_state_from_model(
          self._source, self.tx, self.mesh, trainable=self._trainable
        )[2]
      return state
    seed = self.seed if seed is None else seed
    if seed not in self._initializers:
      self._initializers[seed] = step_lib.train_state_initializer(
        self._model_maker(seed), self.tx, self.abstract
      )
    return self._initializers[seed]()

  def fit(
    self,
    state: TrainState,
    batches: Iterable[Mapping[str, Any]],
    num_steps: int,
    *,
    callback: Callback | None = None,
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Runs ``num_steps`` updates from ``state``, one batch of ``batches`` each.

    A batch is a dict of ``[B, T]`` arrays: a process's rows as numpy (assembled into the
    global batch, ``distributed.global_batch``) or arrays already placed on the mesh. Exactly one
    batch is drawn per update, so an iterator's position (checkpointed with the state) stays in
    step with ``state.step``.

    Returns:
      The state after the last update and that update's metrics (device arrays), or ``state``
      and ``{}`` when ``num_steps`` is 0.

    Raises:
      ValueError: ``batches`` ran out before ``num_steps`` updates.
    """
    iterator = iter(batches)
    start = int(state.step)
    metrics = {}
    with jax.set_mesh(self.mesh):
      for done in range(start + 1, start + num_steps + 1):
        try:
          batch = next(iterator)
        except StopIteration:
          raise ValueError(
            f"batches: expected {num_steps} batches, ran out after {done - 1 - start}"
          ) from None
        state, metrics = self.train_step(state, self._place(batch))
        if callback is not None and callback(done, state, metrics):
          break
    return state, metrics

  def evaluate(
    self, state: TrainState, batches: Iterable[Mapping[str, Any]], num_batches: int
  ) -> dict[str, float]:
    """Loss and bits per byte (or per token) of ``state``'s model over ``num_batches`` of
    ``batches`` (``evaluate``)."""
    return evaluate(self.eval_step, state, batches, num_batches, self.mesh)

  def model(self, state: TrainState) -> nnx.Module:
    """The module of ``state`` (its arrays, not a copy: a later ``fit`` from ``state`` deletes
    them)."""
    return nnx.merge(self.graphdef, state.params, state.rest)

  def _model_maker(self, seed: int) -> Callable[[], LM]:
    cfg = self._cfg
    return lambda: LM(cfg, rngs=nnx.Rngs(seed))

  def _place(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
    if all(isinstance(x, jax.Array) for x in batch.values()):
      return batch
    return distributed.global_batch(batch, self.mesh)


def evaluate(
  eval_step: Callable[[TrainState, Any], dict[str, jax.Array]],
  state: TrainState,
  batches: Iterable[Mapping[str, Any]],
  num_batches: int,
  mesh: Mesh,
) -> dict[str, float]:
  """``eval_step``'s sums over ``num_batches`` of ``batches`` (a process's numpy rows), divided
  once (``step.summarize``): the token-weighted loss of the whole set, not a mean of batch means.

  The sums are added on the host in the step's float32, in batch order, and summarized in
  float64.

  Raises:
    ValueError: ``batches`` ran out before ``num_batches``.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches: expected a positive integer, got {num_batches}")
  iterator, sums = iter(batches), None
  with jax.set_mesh(mesh):
    for i in range(num_batches):
      try:
        batch = next(iterator)
      except StopIteration:
        raise ValueError(f"batches: expected {num_batches} batches, ran out after {i}") from None
      out = jax.device_get(eval_step(state, distributed.global_batch(batch, mesh)))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
  return step_lib.summarize(jax.tree.map(np.float64, sums))
