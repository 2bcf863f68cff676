"""Checkpointer: round trip of state + data iterator; clear errors that delete nothing."""

import os

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrec import sharding
from jaxrec.train import checkpoint
from jaxrec.train import step as step_lib


class _Toy(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)), out_sharding=("embed", "mlp"))
    self.b = nnx.Param(jax.random.normal(rngs.params(), (4,)), out_sharding=("mlp",))


def _data():
  return grain.MapDataset.range(1000).batch(4).to_iter_dataset()


@pytest.fixture(scope="module")
def toy():
  mesh = sharding.make_mesh((2, 2, 2))
  tx = optax.adam(1e-3)
  _, abstract = step_lib.abstract_train_state(lambda: _Toy(nnx.Rngs(0)), tx, mesh)
  state = step_lib.init_train_state(lambda: _Toy(nnx.Rngs(0)), tx, abstract)
  return abstract, state


def _snapshot(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _save(directory, state, steps=(3,), data_batches=2):
  it = iter(_data())
  for _ in range(data_batches):
    next(it)
  ckpt = checkpoint.Checkpointer(directory, resume=False, max_to_keep=5)
  for step in steps:
    ckpt.save(step, state.replace(step=state.step + step), it, force=True)
  ckpt.close()
  return next(it)


def test_round_trip_restores_state_shardings_and_data_position(toy, tmp_path):
  abstract, state = toy
  following = _save(tmp_path / "ckpt", state, steps=(3,))
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", resume=True)
  it = iter(_data())
  restored = ckpt.restore(abstract, it)
  ckpt.close()
  assert int(restored.step) == 3
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored.params, state.params)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b), restored.opt_state, state.opt_state
  )
  assert restored.params["w"].get_value().sharding.spec == jax.P("fsdp", "tensor")
  np.testing.assert_array_equal(next(it), following)


def test_resume_from_missing_directory_names_it_and_creates_nothing(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=f"{missing}: does not exist"):
    checkpoint.Checkpointer(missing, resume=True)
  assert not missing.exists()


def test_resume_from_directory_without_checkpoints(tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  (tmp_path / "step_x").mkdir()
  before = _snapshot(tmp_path)
  with pytest.raises(
    FileNotFoundError, match=f"{tmp_path}: holds no finished checkpoint.*notes.txt"
  ):
    checkpoint.Checkpointer(tmp_path, resume=True)
  assert _snapshot(tmp_path) == before
  assert (tmp_path / "step_x").is_dir()


def test_checkpoint_path_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(NotADirectoryError, match=f"{path}: exists but is not a directory"):
    checkpoint.Checkpointer(path, resume=True)
  assert path.read_text() == "x"


def test_fresh_run_refuses_existing_checkpoints(toy, tmp_path):
  _, state = toy
  _save(tmp_path, state, steps=(1, 2))
  before = _snapshot(tmp_path)
  with pytest.raises(FileExistsError, match=r"already holds checkpoints at steps \[1, 2\].*resume"):
    checkpoint.Checkpointer(tmp_path, resume=False)
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["remove_state_item", "garble_state_files"])
def test_corrupt_checkpoint_raises_and_deletes_nothing(toy, tmp_path, damage):
  abstract, state = toy
  _save(tmp_path, state, steps=(1, 2))
  state_dir = tmp_path / "2" / "state"
  if damage == "remove_state_item":
    for dirpath, _, files in os.walk(state_dir, topdown=False):
      for name in files:
        os.remove(os.path.join(dirpath, name))
      os.rmdir(dirpath)
  else:
    for dirpath, _, files in os.walk(state_dir):
      for name in files:
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"\x00garbage")
  before = _snapshot(tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path, resume=True)
  with pytest.raises(
    checkpoint.CheckpointError, match=rf"{tmp_path / '2'}: cannot be restored.*\[1\]"
  ):
    ckpt.restore(abstract, iter(_data()))
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_restore_params_reads_another_runs_latest_state(toy, tmp_path):
  abstract, state = toy
  _save(tmp_path, state, steps=(1, 5))
  before = _snapshot(tmp_path)
  source = checkpoint.restore_params(tmp_path, abstract)
  assert int(source.step) == 5
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), source.params, state.params)
  assert _snapshot(tmp_path) == before  # read-only
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'other'}: does not exist"):
    checkpoint.restore_params(tmp_path / "other", abstract)


def test_save_refuses_a_step_at_or_below_the_latest_and_changes_nothing(toy, tmp_path):
  _, state = toy
  _save(tmp_path, state, steps=(2, 4))
  before = _snapshot(tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path, resume=True, max_to_keep=2)
  for step in (3, 4):
    with pytest.raises(
      ValueError, match=rf"step: expected a step after the latest checkpoint 4.*{step}"
    ):
      ckpt.save(step, state, iter(_data()), force=True)
  ckpt.close()
  assert _snapshot(tmp_path) == before


def test_restoring_a_different_model_names_an_array_before_reading(toy, tmp_path):
  abstract, state = toy
  _save(tmp_path, state, steps=(1,))
  smaller = abstract.replace(
    params=jax.tree.map(
      lambda x: (
        jax.ShapeDtypeStruct((6, *x.shape[1:]), x.dtype, sharding=x.sharding)
        if x.shape == (8, 4)
        else x
      ),
      abstract.params,
    )
  )
  before = _snapshot(tmp_path)
  with (
    checkpoint.Checkpointer(tmp_path, resume=True) as ckpt,
    pytest.raises(
      checkpoint.CheckpointError,
      match=r"1: holds a different model .*params/w/value: saved \(8, 4\), built \(6, 4\)",
    ),
  ):
    ckpt.restore(smaller, iter(_data()))
  with pytest.raises(checkpoint.CheckpointError, match=r"holds a different model"):
    checkpoint.restore_params(tmp_path, smaller)
  assert _snapshot(tmp_path) == before
