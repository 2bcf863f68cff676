"""Long-context inference on a real model (``experiments/long_context.py``): two experiments,
``--config.part=beyond`` (LM-Infinite and LongHeads past the trained context) and
``--config.part=within`` (Recycled Attention and ThinK inside it, against a sink + window cache of
the same budget).

  python -m experiments.long_context --workdir runs/longctx --config.part=beyond
  python -m experiments.long_context --workdir runs/longctx --config.part=within
  python -m experiments.long_context --workdir runs/longctx --config.part=beyond \\
      --config.full=True   # the accelerator grid

The default runs are sized for 2 CPU cores (``within`` took 2.1 h there and ``beyond`` 74 min,
each sharing them with other jobs; see RESULTS.md); ``full=True`` replaces the lengths, depths
and windows by the grid in ``FULL``.
"""

import ml_collections

# The accelerator grid (--config.full=True): (part, field) -> value.
FULL = {
  ("beyond", "passkey_lengths"): "4096,8192,12288,16384,24576,32768",
  ("beyond", "nll_bin"): 2048,
  ("beyond", "depths"): "0.0,0.25,0.5,0.75,1.0",
  ("beyond", "nll_length"): 32768,
  ("beyond", "nll_windows"): 8,
  ("within", "lengths"): "2048,4096,6144,8192",
  ("within", "depths"): "0.0,0.25,0.5,0.75,1.0",
  ("within", "nll_windows"): 32,
}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.part = "beyond"  # beyond | within
  # A named model (jaxrec.models.NAMED_MODELS), a GGUF file or a Hugging Face directory.
  config.model = "smollm2-135m"
  config.dtype = "float32"
  config.full = False  # the accelerator grid (FULL above)
  config.prefill_chunk = 2048  # prompts are prefilled in chunks of this many tokens
  config.seed = 0

  # The passkey prompt (LM-Infinite's generator): preamble, filler, the needle at a depth.
  config.passkey = ml_collections.ConfigDict()
  config.passkey.digits = 5
  config.passkey.new_tokens = 32  # greedy tokens after the prompt (the answer, then decode timing)

  # Beyond the trained context (context = the model's max_seq_len, 8192 for SmolLM2).
  config.beyond = ml_collections.ConfigDict()
  config.beyond.passkey_lengths = "4096,12288"  # prompt tokens, inside and past the context
  config.beyond.depths = "0.25,0.75"  # where the needle sits in the filler
  config.beyond.nll_length = 12288  # tokens of each real-text window, scored at every position
  config.beyond.nll_windows = 1  # the same windows for every method
  config.beyond.nll_bin = 1024  # per-position NLL averaged over bins of this many tokens
  # LM-Infinite's passkey settings (window and distance cap 0: the model's context).
  config.beyond.lm_infinite = ml_collections.ConfigDict(
    dict(
      global_tokens=10, window=0, distance_cap=0, top_k=5, top_k_from_layer=4, top_k_insert_at=2048
    )
  )
  config.beyond.longheads = ml_collections.ConfigDict(dict(chunk_size=256, chunks_per_head=16))

  # Within the context: every method keeps `budget` keys per head for decoding.
  config.within = ml_collections.ConfigDict()
  config.within.lengths = "4096,8192"  # prompt tokens (passkey) and context tokens (NLL)
  config.within.depths = "0.25,0.75"
  config.within.nll_windows = 2  # real-text windows, batched; the same for every method
  config.within.nll_scored = 256  # the last tokens of each window, scored by decoding
  config.within.budget = 1024  # keys per head: sink + window, recycled cache, SnapKV capacity
  config.within.sink_tokens = 4  # the baseline's sink (StreamingLLM's 4)
  config.within.recycled = ml_collections.ConfigDict(dict(stride=10, check_every=5, threshold=0.8))
  config.within.think = ml_collections.ConfigDict(dict(channel_ratio=0.4, observation=32))
  config.within.snapkv_kernel = 7
  return config
