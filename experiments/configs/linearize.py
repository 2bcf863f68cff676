"""Liger linearization (``experiments/linearize.py``): a teacher, the conversion, LoRA
fine-tuning on a token budget, evaluation, an MQAR probe and the export.

The default teacher is a small Llama-style transformer (grouped-query attention, RoPE, SwiGLU,
RMSNorm, untied head) trained by jaxrec on the embedded corpus, under ``<workdir>/teacher`` and
reused by later runs in that workdir. ``--config.teacher`` takes a jaxrec run directory (its
``run.json``) or a Hugging Face checkpoint directory instead::

  python -m experiments.linearize --workdir runs/liger
  python -m experiments.linearize --workdir runs/liger --config.study=ablations
  python -m experiments.linearize --workdir runs/liger_hf --config.teacher=path/to/llama \\
      --config.finetune_tokens=2000000 --config.liger.window=64
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import default as default_train_config

# The accelerator version (--config.full=True): field -> value; the paper's 20M fine-tuning tokens
# (Llama-3-8B) at 8 x 1024.
FULL = {
  "finetune_tokens": 20_000_000,
  "batch_size": 8,
  "seq_len": 1024,
  "eval_batches": 64,
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A jaxrec run, a Hugging Face directory, or a real model by name or GGUF file (smollm2-135m).
  config.teacher = config_dict.placeholder(str)
  # The text of fine-tuning and evaluation: "stdlib" (the embedded Python sources),
  # "python_reference" (the Python reference's English prose, pydoc_data.topics) or both
  # ("python_reference+stdlib", the real-text corpus of the SmolLM2 experiments).
  config.corpus = "stdlib"
  config.teacher_run = _teacher_run()  # how the default teacher is trained
  config.study = ""  # "" (one conversion, config.liger) or "ablations" (RESULTS.md)
  config.settings = ""  # with study=ablations: the settings to run (comma-separated); "": all

  config.liger = ml_collections.ConfigDict()
  config.liger.variant = "gla"  # or "hgrn2"
  # Sliding-window keys, an eighth of the 128-token context (the paper: 64 of 1024 and more);
  # 0: no softmax branch (the "w/o SWA" ablation).
  config.liger.window = 16
  # False: the sliding window alone, no recurrence (the "SWA only" ablation).
  config.liger.recurrence = True
  config.liger.hybrid_every = 0  # keep softmax attention every N layers; 0: convert every layer
  config.liger.gate_source = "key"  # or "projection" (a random gate projection, an ablation)

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 8  # 0: no LoRA and no fine-tuning (the "w/o LoRA" ablation)
  config.lora.alpha = 8.0
  config.lora.targets = "q_proj,k_proj,v_proj"

  # Fine-tuning: 64 steps of 16 x 128 tokens, 8% of the default teacher's pretraining tokens.
  config.finetune_tokens = 131_072
  config.batch_size = 16
  config.seq_len = config_dict.placeholder(int)  # default: the teacher run's (128 for HF)
  config.learning_rate = 1e-3  # constant, no warmup (the paper's)
  config.clip_norm = 1.0
  config.eval_batches = 16  # validation batches of batch_size x seq_len tokens

  config.probe = ml_collections.ConfigDict()
  config.probe.pairs = 8  # key-value pairs per sequence
  config.probe.gap = 64  # filler tokens between the pairs and the queries (> liger.window)
  config.probe.sequences = 64

  # Also measured for every model: the decoding state after state_context tokens (0: the
  # teacher's context), the committed multiple-choice set's accuracy (models with a chat template;
  # mcq = the number of questions, -1 all, 0 none) and a greedy answer to sample.prompt (after
  # fine-tuning; sample.always: also the teacher and the converted model).
  config.state_context = 0
  config.mcq = 0
  config.sample = ml_collections.ConfigDict()
  config.sample.prompt = ""
  config.sample.max_new_tokens = 48
  config.sample.always = False

  config.full = False  # the accelerator version (FULL above)
  config.export = True  # the merged model: a Hugging Face directory or a jaxrec run
  config.progress = config_dict.placeholder(bool)  # progress bars; default: on a terminal
  return config


def _teacher_run() -> ml_collections.ConfigDict:
  """``experiments/configs/default.py`` with a Llama-style model (0.85M parameters), 800 steps of
  16 x 128 tokens (1.6M tokens; attention at 256 tokens per row costs 3x more a step on CPU)."""
  run = default_train_config.get_config()
  run.steps = 800
  run.batch_size = 16
  run.data.seq_len = 128
  run.model.preset = "tiny"
  run.model.mixer_pattern = "attention"
  run.model.num_layers = 4
  run.model.num_heads = 4
  run.model.num_kv_heads = 2
  run.model.tie_embeddings = False
  run.optim.learning_rate = 3e-3
  run.eval_every = 0
  run.eval_batches = 16
  run.checkpoint_every = 0
  run.log_every = 20
  run.sample.max_new_tokens = 100
  return run
