"""The recall sweep (``experiments/recall.py``): MQAR, set disjointness and counting.

The default is sized for two CPU cores: 2-layer ``(baseconv, mixer)`` models of width 32 and 64,
tiny vocabularies, at most 1600 steps of 16 examples with early stopping (attention's induction
step, after which it solves MQAR, comes at 500-800 steps here; with 300 steps every mixer was
undertrained). With the 11 mixers registered today it took 33.6 minutes on the 2 cores, a
fifth of it between runs (compiling 24 train steps). Every model trains on the same examples,
drawn once per sweep: drawing them in Python for each model cost as much as training the small
ones (41.9 minutes).
``--config.full=True`` is the paper-scale sweep for an accelerator (Zoology's MQAR settings, JRT's
set sizes, widths up to 128); any field given on the command line keeps its value over the
full-scale one.

  python -m experiments.recall --config.out_dir=DIR                   # the CPU sweep
  python -m experiments.recall --config.out_dir=DIR --config.mixers=attention,based  # some only
  python -m experiments.recall --config.out_dir=DIR --config.full=True  # paper scale (accelerator)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.full = False
  config.seed = 0
  # "all": every registered mixer (plus "swa", attention with a window); or comma-separated names.
  config.mixers = "all"
  # Comma-separated, of mqar, sets (set disjointness), sets_jrt (trained and scored with
  # JRT-Prompt) and counting.
  config.tasks = "mqar,sets,sets_jrt,counting"
  config.d_models = "32,64"  # the state sizes: model widths, comma-separated
  # The pattern is (baseconv, mixer), as Zoology's MQAR models. Set disjointness needs two mixer
  # layers (4 layers, as JRT's models), but at 4 layers it is learned far too slowly for this
  # budget: attention of width 32 reached 0.38/0.44 (4x12/12x4) after 1600 steps (0.70/0.80 with
  # vocabulary 33 and lr 1e-2), at twice the time a step.
  config.num_layers = 2
  # "mlp": a SwiGLU after every mixer; "none": the mixers alone, JRT's and Zoology's layout.
  config.ffn = "mlp"
  config.num_heads = 2
  config.feature_dim_ratio = 8  # Based / PLA feature dim = d_model // ratio (4 and 8 here)
  config.window = 8  # sliding-window attention ("swa")
  # 16 rows: a step takes half the CPU time of a 32-row one, and in 2000 steps of 16 attention
  # solved MQAR at width 32 (0.99, 0.91 by step 850), which 1500 steps of 32 barely did (0.96).
  config.batch_size = 16
  # 3e-3: of 1e-3, 3e-3 and 1e-2 on MQAR (width 64, 1500 steps of 32), the best for GLA (0.25,
  # 0.59, 0.24) and as good for attention and Based, which solve it at 3e-3 and 1e-2.
  config.learning_rate = 3e-3
  config.warmup_steps = 30
  config.weight_decay = 0.1
  config.steps = 1600  # per model at most (MQAR and both set-disjointness runs share a compile)
  config.eval_every = 50
  config.eval_examples = 64  # validation examples per early-stopping check
  config.test_examples = 256  # per reported number
  config.target_accuracy = 0.99  # early stop

  config.mqar = ml_collections.ConfigDict()
  config.mqar.vocab_size = 64
  config.mqar.seq_len = 32
  config.mqar.num_pairs = 4

  config.sets = ml_collections.ConfigDict()
  config.sets.vocab_size = 65  # the MQAR models' vocabulary (64 + its pad/mask id)
  config.sets.sizes = "4x12,12x4"  # |A|x|B| pairs, mixed in training, each scored
  config.sets.jrt_repeats = 2

  config.counting = ml_collections.ConfigDict()
  config.counting.mixers = "attention,based"
  config.counting.formats = "plain,space,comma,items"
  config.counting.alphabet = "ab"
  config.counting.letter = "a"
  config.counting.lengths = "4-8,9-12,13-16"  # trained on all, scored per range
  config.counting.bpe_vocab_size = 64  # of the BPE tokenizer trained on the counting texts
  config.counting.steps = 1000
  config.counting.d_model = 64

  config.out_dir = ""  # required: recall.json, the plots, tokenizer.json and the report go here
  config.progress = True
  return config


# The paper-scale values that --config.full=True sets (fields given on the command line win).
FULL = {
  "d_models": "36,64,96,128",
  "num_layers": 4,
  "ffn": "none",
  "feature_dim_ratio": 4,
  "window": 64,
  "batch_size": 128,
  "learning_rate": 8e-4,
  "warmup_steps": 500,
  "steps": 20_000,
  "eval_every": 1000,
  "eval_examples": 1000,
  "test_examples": 3000,
  "mqar.vocab_size": 8192,
  "mqar.seq_len": 256,
  "mqar.num_pairs": 64,
  "sets.vocab_size": 2048,
  # JRT's twelve |A|x|B| pairs, both orders of each, (4,16) to (256,4).
  "sets.sizes": "4x16,16x4,8x32,32x8,64x16,16x64,4x128,128x4,16x256,256x16,4x256,256x4",
  "counting.lengths": "10-20,20-30,30-40",
  "counting.bpe_vocab_size": 256,
  "counting.steps": 20_000,
  "counting.d_model": 128,
}
