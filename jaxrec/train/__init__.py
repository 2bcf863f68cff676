"""Training: optimizers and schedules, train/eval steps, the trainer, checkpoints, run records,
metrics, loop, and the processes' share of the global batch.

The mesh and its placement rules live in ``jaxrec.sharding`` (below layers and models); the names
users call as ``train.make_mesh``, ``train.mesh_shape``, ... are re-exported here."""

from jaxrec.sharding import (
  LOGICAL_AXIS_RULES,
  MESH_AXES,
  batch_sharding,
  logical_to_mesh,
  make_mesh,
  mesh_shape,
  tree_shardings,
)
from jaxrec.train.checkpoint import Checkpointer, CheckpointError, restore_params
from jaxrec.train.config_checks import (
  ConfigError,
  model_config,
  parse_int_pairs,
  parse_list,
  validate_config,
)
from jaxrec.train.distributed import global_batch
from jaxrec.train.loop import (
  TrainingInterrupted,
  restore_model,
  sample_pieces,
  sample_text,
  train_and_evaluate,
)
from jaxrec.train.metrics import MetricsWriter, plot_losses, read_metrics, token_byte_lengths
from jaxrec.train.optim import (
  OptimConfig,
  make_optimizer,
  warmup_cosine_schedule,
  weight_decay_mask,
  wsd_schedule,
)
from jaxrec.train.step import (
  TrainState,
  abstract_train_state,
  init_train_state,
  make_eval_step,
  make_train_step,
  summarize,
  train_state_from_model,
)
from jaxrec.train.trainer import Trainer, evaluate

__all__ = [
  "LOGICAL_AXIS_RULES",
  "MESH_AXES",
  "CheckpointError",
  "Checkpointer",
  "ConfigError",
  "MetricsWriter",
  "OptimConfig",
  "TrainState",
  "Trainer",
  "TrainingInterrupted",
  "abstract_train_state",
  "batch_sharding",
  "evaluate",
  "global_batch",
  "init_train_state",
  "logical_to_mesh",
  "make_eval_step",
  "make_mesh",
  "make_optimizer",
  "make_train_step",
  "mesh_shape",
  "model_config",
  "parse_int_pairs",
  "parse_list",
  "plot_losses",
  "read_metrics",
  "restore_model",
  "restore_params",
  "sample_pieces",
  "sample_text",
  "summarize",
  "token_byte_lengths",
  "train_and_evaluate",
  "train_state_from_model",
  "tree_shardings",
  "validate_config",
  "warmup_cosine_schedule",
  "weight_decay_mask",
  "wsd_schedule",
]
