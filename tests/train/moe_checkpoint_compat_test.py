"""An MoE run checkpointed before the LM became a plain residual stack resumes.

Its checkpoint (``tests/fixtures/moe_checkpoint``, written by ``make_moe_checkpoint_fixture.py``
with the code of commit d7d5cb7) holds RMoE's shared GRU router cell at ``router_cell/...``, in
the parameters and in the Adam moments; the MoE layers hold the cell now, at
``layers/0/mlp/router_cell/...``. Restoring reads it from its old path, and the resumed run
trains on as the uninterrupted run of the old code did.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from testing_utils import assert_close

from experiments.configs import default
from jaxrec import data as data_lib
from jaxrec import sharding
from jaxrec.models import LM
from jaxrec.train import checkpoint, config_checks, loop, metrics, optim, run_record
from jaxrec.train import step as step_lib

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "moe_checkpoint"
CELL_NOW, CELL_BEFORE = ("layers", "0", "mlp", "router_cell"), ("router_cell",)


def _raw_state(workdir, step):
  """The saved train state as plain arrays keyed by their saved paths, read without any jaxrec
  code."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  flat = ocp.tree.to_flat_dict(restored.state)
  return {key: np.asarray(value) for key, value in flat.items() if value is not None}


def _resume_config():
  """As ``--config.resume=True`` alone: everything else comes from the run's record."""
  config = default.get_config()
  config.resume = True
  return config


def _old_path(key):
  """Where the old code stored the array now at ``key``: the cell at the top of each tree."""
  for i in range(len(key)):
    if key[i : i + len(CELL_NOW)] == CELL_NOW:
      return key[:i] + CELL_BEFORE + key[i + len(CELL_NOW) :]
  return key


def test_every_saved_array_is_restored_with_the_cell_at_its_new_path(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(FIXTURE / "run", workdir)
  config = run_record.resolve(_resume_config(), workdir, given=("resume",))
  model_cfg = config_checks.model_config(config, data_lib.load_tokenizer("byte").vocab_size)
  opt = config.optim
  schedule = optim.warmup_cosine_schedule(opt.learning_rate, config.steps, opt.warmup_steps)
  tx = optim.make_optimizer(
    schedule,
    weight_decay=opt.weight_decay,
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    clip_norm=opt.clip_norm,
  )
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  make_model = lambda: LM(model_cfg, rngs=nnx.Rngs(config.seed))
  _, abstract = step_lib.abstract_train_state(make_model, tx, mesh)
  restored = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract)

  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(restored, keep_empty_nodes=True))
  flat = {key: np.asarray(value) for key, value in flat.items() if isinstance(value, jax.Array)}
  saved = _raw_state(workdir, 2)
  moved = [key for key in flat if _old_path(key) != key]
  # The cell's four arrays, in the parameters and in both Adam moments.
  assert len(moved) == 12 and {key[-2] for key in moved} == {"w_ih", "w_hh", "b_ih", "b_hh"}
  assert sorted(_old_path(key) for key in flat) == sorted(saved)
  for key, value in flat.items():
    np.testing.assert_array_equal(value, saved[_old_path(key)], err_msg="/".join(key))


def test_the_restored_model_shares_one_cell(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(FIXTURE / "run", workdir)
  model, _, _ = loop.restore_model(default.get_config(), workdir, given=())
  cell = model.layers[0].mlp.router_cell
  assert model.layers[1].mlp.router_cell is cell
  saved = _raw_state(workdir, 2)
  for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
    want = saved[("params", *CELL_BEFORE, name, "value")]
    np.testing.assert_array_equal(getattr(cell, name).get_value(), want, err_msg=name)


def test_the_resumed_run_trains_as_the_uninterrupted_one_did(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURE / "run", workdir)
  result = loop.train_and_evaluate(_resume_config(), str(workdir), given=("resume",))
  assert result["step"] == 4
  expected = json.loads((FIXTURE / "expected.json").read_text())["train"]
  got = metrics.read_metrics(str(workdir))["train"]
  assert sorted(got) == [1, 2, 3, 4]
  for step in (3, 4):  # the steps after the resume: parameters and Adam moments as saved
    want = expected[str(step)]
    # batch_checksum is younger than the fixture.
    assert set(got[step]) == set(want) | {"tokens_per_s", "batch_checksum"}
    for key, value in want.items():
      if key != "split":
        # The old code's numbers, but for the order in which the global gradient norm (clipping,
        # grad_norm) adds the leaves' squared sums: the cell's leaves moved within the tree. A
        # reordered fp32 sum of n = 28 terms differs by at most (n - 1)·ε, its root by half
        # that: < 1e-6.
        assert_close(got[step][key], value, rtol=1e-6, err_msg=f"step {step} {key}")
