"""Checkpoints: the train state and the data iterator saved together with orbax.

One ``orbax.checkpoint.CheckpointManager`` per work directory; every step directory holds two
items, ``state`` (the ``TrainState``, written with ``StandardSave``) and ``data`` (the grain
iterator's position, ``grain.checkpoint.CheckpointSave``), so a resumed run sees exactly the
batches that followed the save. Restoring goes into an abstract state whose
``ShapeDtypeStruct`` s carry the target shardings, so arrays land directly where the step wants
them, on any mesh.

Nothing here deletes files except orbax's ``max_to_keep`` retention of this run's own saves: a
missing, empty or unreadable directory raises an error naming it, a fresh run refuses a directory
that already holds checkpoints, and a save never goes to a step at or below the latest one
(retention then only removes checkpoints older than the newest one this run wrote).

A restore first compares the saved arrays' shapes (orbax's metadata) with the requested ones, so a
different model is reported as such, before orbax starts reading: an array read that fails inside
orbax's async machinery leaves other reads in flight, and those print hundreds of lines of
``Event loop is closed`` when the process ends.

Checkpoints written before a parameter moved still restore: ``MOVED`` lists each move, and an
array that the checkpoint lacks at its path but holds at the path it had before is read from there
(in the parameters and in every optimizer state that mirrors them).
"""

import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxrec.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"  # under the work directory

# Parameters that moved, as (path now, path before) relative to the model's state. RMoE's GRU
# router cell, shared by all MoE layers, belonged to the LM until the LM became a plain residual
# stack (issue 23); the MoE layers hold it now, and its path is the first one's.
MOVED = ((("layers", "0", "mlp", "router_cell"), ("router_cell",)),)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read (truncated, missing items, wrong shapes)."""


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator)`` pairs under ``directory``.

  Args:
    directory: the checkpoint directory (``<workdir>/checkpoints``).
    resume: ``True`` to continue from the latest checkpoint, which must exist; ``False`` for a
      fresh run, which must not find checkpoints there (they would be overwritten).
    max_to_keep: how many of the newest checkpoints to keep.
    save_interval_steps: ``save`` writes only at multiples of this (unless forced).

  Raises:
    NotADirectoryError: ``directory`` exists but is a file.
    FileNotFoundError: ``resume`` and ``directory`` is missing or holds no checkpoint.
    FileExistsError: not ``resume`` and ``directory`` already holds checkpoints.
  """

  def __init__(
    self, directory: str, *, resume: bool, max_to_keep: int = 3, save_interval_steps: int = 1
  ):
    self.directory = os.path.abspath(os.fspath(directory))
    check_directory(self.directory, resume=resume)
    # Explicit policy: orbax's default adds an InitialSavePolicy that saves the very first step.
    policy = ocp.checkpoint_managers.AnySavePolicy(
      [
        ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_decision_policy=policy, create=True
    )
    self._manager = ocp.CheckpointManager(
      self.directory, item_handlers=_item_handlers(), options=options
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_iter, *, force: bool = False) -> bool:
    """Saves at ``step`` if it is a save step (or ``force``); returns whether it saved.

    Raises:
      ValueError: ``step`` is at or below the latest checkpoint's (it would be overwritten with
        another step's content, and retention would remove newer checkpoints).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(
        f"step: expected a step after the latest checkpoint {latest} in {self.directory}, "
        f"got {step}"
      )
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
    )
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: TrainState, data_iter, step: int | None = None) -> TrainState:
    """Restores ``step`` (default: the latest) into ``abstract_state``'s shapes and shardings.

    ``data_iter`` is moved, in place, to where the saved iterator was.

    Raises:
      CheckpointError: the checkpoint was written by another number of processes (each saved
        its own rows' data position), holds other shapes than ``abstract_state`` (a different
        model), or cannot be read; the message names its directory, the underlying error and the
        other steps available. The files are left as they are.
    """
    step = self.latest_step() if step is None else step
    _check_process_count(os.path.join(self.directory, str(step)))
    layout = _SavedLayout(self._manager, step, abstract_state, self.directory)
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(layout.target),
      data=grain.checkpoint.CheckpointRestore(data_iter),
    )
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      others = [s for s in self._manager.all_steps() if s != step]
      raise CheckpointError(
        f"checkpoint {os.path.join(self.directory, str(step))}: cannot be restored "
        f"({type(e).__name__}: {e}). Nothing was deleted; other steps there: {others or 'none'} "
        "(if this step's files are damaged, move its directory aside to resume from the latest "
        "of them)"
      ) from e
    return layout.state(restored.state)

  def close(self) -> None:
    """Waits for pending (async) saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params(directory: str, abstract_state: TrainState) -> TrainState:
  """The latest train state under another run's ``directory``, for continued pretraining.

  Opens the directory read-only and restores only the ``state`` item (not the data iterator).
  ``abstract_state`` must have the saved run's structure (same model and optimizer chain).

  Raises:
    FileNotFoundError: ``directory`` is missing or holds no checkpoint.
    CheckpointError: the checkpoint cannot be read.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory}: does not exist")
  # The options read_only would otherwise reset, each with a warning.
  options = ocp.CheckpointManagerOptions(
    read_only=True, create=False, save_interval_steps=0, max_to_keep=None
  )
  with ocp.CheckpointManager(directory, item_handlers=_item_handlers(), options=options) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {directory}: holds no finished checkpoint")
    layout = _SavedLayout(manager, step, abstract_state, directory)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(layout.target))
    try:
      return layout.state(manager.restore(step, args=args).state)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(
        f"checkpoint {os.path.join(directory, str(step))}: cannot be restored "
        f"({type(e).__name__}: {e}). Nothing was deleted"
      ) from e


def check_directory(directory: str, *, resume: bool) -> list[int]:
  """The finished checkpoints' steps in ``directory``, ascending, after checking that a run may
  use it; reads only the directory listing (no orbax manager is started).

  Raises:
    NotADirectoryError: ``directory`` exists but is a file.
    FileNotFoundError: ``resume`` and ``directory`` is missing or holds no checkpoint.
    FileExistsError: not ``resume`` and ``directory`` already holds checkpoints.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(f"checkpoint directory {directory}: exists but is not a directory")
  if not os.path.isdir(directory):
    if resume:
      raise FileNotFoundError(
        f"checkpoint directory {directory}: does not exist, nothing to resume from "
        "(check --workdir, or set --config.resume=False to start a fresh run)"
      )
    return []
  steps = sorted(ocp.path.step.checkpoint_steps(directory))
  if resume and not steps:
    entries = sorted(os.listdir(directory))
    raise FileNotFoundError(
      f"checkpoint directory {directory}: holds no finished checkpoint to resume from "
      f"(found {entries[:10] or 'nothing'}; a step directory named by its step number with a "
      "'state' and a 'data' item is expected)"
    )
  if not resume and steps:
    raise FileExistsError(
      f"checkpoint directory {directory}: already holds checkpoints at steps {steps}; "
      "set --config.resume=True to continue that run, or pick a new --workdir"
    )
  return steps


def _item_handlers() -> dict:
  """Handlers of the two items, so that orbax can read their metadata before a restore."""
  return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


class _SavedLayout:
  """How the checkpoint at ``step`` stores ``abstract_state``: checks that it holds the same
  arrays (raising ``CheckpointError`` otherwise), ``target`` is what to hand orbax's restore, and
  ``state`` turns what it restored into the ``TrainState`` asked for.

  ``target`` is ``abstract_state`` itself, unless the checkpoint stores a subtree at the path it
  had before a move (``MOVED``): then it is ``abstract_state`` with that subtree at its old path,
  in the parameters and in every state that mirrors them (the optimizer's moments), and ``state``
  moves it back.
  """

  def __init__(self, manager, step: int, abstract_state: TrainState, directory: str):
    try:
      metadata = manager.item_metadata(step)["state"]
    except Exception:  # missing or unreadable metadata: the restore reports the damage
      metadata = None
    self.target, self._moves = abstract_state, []
    if metadata is None:
      return
    saved = ocp.tree.to_flat_dict(metadata)
    for now, before in MOVED:
      moved, found = _move(self.target, now, before)
      if found is not None and len(_keys(moved) - saved.keys()) < len(
        _keys(self.target) - saved.keys()
      ):
        self.target = moved
        self._moves.append((before, found))
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(self.target, keep_empty_nodes=True))
    differences = [
      f"{'/'.join(key)}: saved {_shape(saved.get(key))}, built {_shape(wanted.get(key))}"
      # Parameters first: their names say most about the model.
      for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (k[0] != "params", k))
      if _shape(saved.get(key)) != _shape(wanted.get(key))
    ]
    if differences:
      more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
      raise CheckpointError(
        f"checkpoint {os.path.join(directory, str(step))}: holds a different model than the "
        f"one built to restore it: {differences[0]}{more}. The run's model is recorded in its "
        "workdir's run.json (a run without one needs the --config.model.* flags it was trained "
        "with). Nothing was changed"
      )

  def state(self, restored: TrainState) -> TrainState:
    for before, now in reversed(self._moves):
      restored, _ = _move(restored, before, now)
    return restored


def _keys(tree) -> set:
  return set(ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True)))


def _move(tree, source: tuple, destination: tuple):
  """``tree`` with the subtree at ``source`` (matched by the keys' string forms) of every
  ``nnx.State`` in it moved to ``destination``; and ``source`` as that state spells it (``None``
  if no state holds it)."""
  found = []

  def move(node):
    if not isinstance(node, nnx.State):
      return node
    flat = nnx.to_flat_state(node)
    at = lambda path: tuple(map(str, path[: len(source)])) == tuple(map(str, source))
    hits = [path for path, _ in flat if at(path)]
    if not hits:
      return node
    found.append(hits[0][: len(source)])
    return nnx.from_flat_state(
      [(destination + path[len(source) :] if at(path) else path, leaf) for path, leaf in flat]
    )

  moved = jax.tree.map(move, tree, is_leaf=lambda node: isinstance(node, nnx.State))
  return moved, (found[0] if found else None)


def _shape(leaf) -> tuple | str:
  """The shape of a saved (``ArrayMetadata``) or requested (``ShapeDtypeStruct``) leaf."""
  if leaf is None:
    return "nothing"
  shape = getattr(leaf, "shape", None)
  return np.shape(leaf) if shape is None else tuple(shape)


def _check_process_count(step_dir: str) -> None:
  """The data item holds one ``process_I-of-N.json`` per process (grain): the position of that
  process's rows of the global batch. A run resumes with the ``N`` that wrote them."""
  data_dir = os.path.join(step_dir, "data")
  if not os.path.isdir(data_dir):
    return  # reported by the restore itself
  counts = {
    int(m.group(1))
    for name in os.listdir(data_dir)
    if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", name))
  }
  if counts and jax.process_count() not in counts:
    raise CheckpointError(
      f"checkpoint {step_dir}: written by {max(counts)} processes, resumed by "
      f"{jax.process_count()}; each process saved the data position of its own rows of the "
      f"global batch, so resume with --config.multihost=True and "
      f"--config.distributed.num_processes={max(counts)}"
    )
