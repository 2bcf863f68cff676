"""Long-context inference (``experiments/long_context.py``): each ``jaxrec.inference.longctx``
policy against vanilla attention on a small RoPE transformer trained by jaxrec at a short context.

The model is trained on the embedded corpus under ``<workdir>/model`` (``--config.model_run``)
and reused by later runs in that workdir::

  python -m experiments.long_context --workdir runs/longctx
  python -m experiments.long_context --workdir runs/longctx --config.model_run.steps=600 \\
      --config.lengths=128,256,512,1024 --config.passkey.lengths=256,512,1024
"""

import ml_collections

from experiments.configs import default as default_train_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_run = _model_run()
  # Context lengths of the evaluations, in tokens (bytes); the model trains at model_run's.
  config.lengths = "128,256,512"
  config.ppl_sequences = 4  # validation windows per length for the perplexity

  config.passkey = ml_collections.ConfigDict()
  config.passkey.lengths = "256,512"  # prompt lengths (the preamble alone is 140 bytes)
  config.passkey.samples = 4  # prompts per length (keys and needle depths drawn at random)
  config.passkey.digits = 5

  config.choice = ml_collections.ConfigDict()
  config.choice.questions = 12  # multiple-choice questions, each asked in all 3! orders
  config.choice.prefix = 48  # bytes of context before the options
  config.choice.option_lengths = "12,20,28"  # unequal option lengths

  # The policies, sized to the training context (the papers' settings scaled down).
  config.lm_infinite = ml_collections.ConfigDict(
    dict(global_tokens=10, window=128, distance_cap=128)
  )
  config.recycled = ml_collections.ConfigDict(dict(k=64, stride=8))
  config.longheads = ml_collections.ConfigDict(dict(chunk_size=16, chunks_per_head=8))
  config.think = ml_collections.ConfigDict(dict(channel_ratio=0.4, observation=32))
  config.seed = 0
  config.progress = False
  return config


def _model_run() -> ml_collections.ConfigDict:
  """``experiments/configs/default.py`` with an attention-only model at 128 bytes per row."""
  run = default_train_config.get_config()
  run.steps = 120  # ~5 min on 2 shared CPU cores; the whole run ~14 min
  run.batch_size = 8
  run.data.seq_len = 128
  run.model.preset = "tiny"
  run.model.mixer_pattern = "attention"
  run.model.num_layers = 4
  run.model.num_heads = 4
  run.eval_every = 0
  run.eval_batches = 8
  run.checkpoint_every = 0
  run.log_every = 50
  run.sample.max_new_tokens = 50
  return run
