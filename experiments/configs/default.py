"""Default language-model training run: a small GLA + attention hybrid on the stdlib corpus.

Sized to train on two CPU cores in a few minutes (byte tokenizer, 128-token rows); every field can
be overridden from the command line, e.g.::

  python -m experiments.train --workdir /tmp/lm --config.steps=2000 \
      --config.model.preset=small-hybrid --config.mesh.fsdp=2

``--config.model.preset`` gives that preset exactly; a ``model`` field given on the command line
replaces the preset's value. Continued pretraining with re-warming::

  python -m experiments.train --workdir /tmp/lm2 --config.init_from=/tmp/lm \
      --config.optim.schedule=wsd --config.optim.init_lr=3e-4
"""

import ml_collections
from ml_collections import config_dict

from jaxrec.train import config_checks


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = 600  # more than optim.warmup_steps (cosine); at least warmup + decay (wsd)
  config.batch_size = 16  # global, split over --config.mesh.data × --config.mesh.fsdp
  config.grad_accum_steps = 1  # microbatches per step (scanned inside the train step)

  # The preset, whole: every other model field (each LMConfig field) is unset and keeps the
  # preset's value unless given, e.g. --config.model.num_layers=12 or
  # --config.model.mixer_pattern=gla,gla,attention; --config.model.dtype=bfloat16 on accelerators.
  config.model = config_checks.model_config_dict(preset="micro-hybrid")

  config.data = ml_collections.ConfigDict()
  config.data.tokenizer = "byte"  # or the path of a HuggingFace tokenizer.json
  config.data.train = "stdlib"  # or a path / glob of .txt / .jsonl files
  config.data.validation = "stdlib"
  config.data.seq_len = 128

  config.optim = ml_collections.ConfigDict()
  config.optim.schedule = "cosine"  # or "wsd" (warmup-stable-decay, re-warming from init_lr)
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 30
  config.optim.end_lr_ratio = 0.1  # final learning rate / peak
  config.optim.init_lr = 0.0  # WSD: where the (re-)warmup starts
  config.optim.decay_steps = config_dict.placeholder(int)  # WSD cooldown; default steps // 5
  config.optim.decay_shape = "1-sqrt"
  config.optim.weight_decay = 0.1
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.eps = 1e-8
  config.optim.clip_norm = 1.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all devices not used by the other axes
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.expert = 1  # experts of an MoE model (--config.model.ffn=moe) split over it
  config.multihost = False  # join a multi-process job with jax.distributed.initialize() first
  # Detected on TPU pods, SLURM and GCE; elsewhere give all three (README, "Several hosts").
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = config_dict.placeholder(str)  # "host0:1234"
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)

  config.log_every = 10
  config.eval_every = 200  # 0: only the final evaluation
  config.eval_batches = 40  # validation batches per evaluation (about the whole stdlib split)
  config.checkpoint_every = 200  # 0: only the final checkpoint
  config.max_to_keep = 2
  config.resume = False
  config.init_from = config_dict.placeholder(str)  # a run's workdir to take the parameters from
  config.progress = config_dict.placeholder(bool)  # progress bar; default: when on a terminal
  # TensorBoard event files in <workdir>/tensorboard (the metrics, the config, the sample) beside
  # metrics.jsonl: tensorboard --logdir <workdir>/tensorboard
  config.tensorboard = True
  # Trace this many steps with jax.profiler into <workdir>/profile, after the first two (which
  # compile); 0: none.
  config.profile_steps = 0

  config.sample = ml_collections.ConfigDict()
  config.sample.prompt = "def "
  config.sample.max_new_tokens = 200
  config.sample.temperature = 0.8
  config.sample.top_k = config_dict.placeholder(int)
  config.sample.top_p = 0.95
  config.sample.seed = 0
  return config
