"""The recall sweep (``experiments/recall.py``): MQAR, set disjointness and counting.

The default is sized for two CPU cores: five mixers (attention, Based, PLA, GLA, mLSTM) at widths
48 and 64, tiny vocabularies, batches of 16, early stopping. MQAR is 16 pairs in 128 tokens with
2-layer models, where attention's cache outgrows the recurrent states; set disjointness has two
mixer layers (4 layers), with and without MLPs, where attention and PLA learn it (PLA of width 32
did not pass 0.9 without MLPs in 4000 steps: 0.887/0.871). Every model trains on the same
examples, drawn once per sweep. ``--config.mixers=all`` runs every registered mixer (and ``swa``),
about twice as long. ``--config.full=True`` is the paper-scale sweep for an accelerator
(Zoology's MQAR settings and mix, JRT's twelve set sizes, widths up to 128); any field given on
the command line keeps its value over the full-scale one.

  python -m experiments.recall --config.out_dir=DIR                   # the CPU sweep
  python -m experiments.recall --config.out_dir=DIR --config.mixers=attention,based  # some only
  python -m experiments.recall --config.out_dir=DIR --config.full=True  # paper scale (accelerator)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.full = False
  config.seed = 0
  # Comma-separated names, or "all": every registered mixer (plus "swa", attention with a window).
  config.mixers = "attention,based,pla,gla,mlstm"
  # Comma-separated, of mqar, sets (set disjointness), sets_jrt (trained and scored with
  # JRT-Prompt) and counting.
  config.tasks = "mqar,sets,sets_jrt,counting"
  config.d_models = "48,64"  # the state sizes: model widths, comma-separated
  # The MQAR and counting models: (baseconv, mixer), Zoology's MQAR layout; set disjointness has
  # its own depth and layouts (config.sets).
  config.num_layers = 2
  # "mlp": a SwiGLU after every mixer; "none": the mixers alone.
  config.ffn = "mlp"
  config.num_heads = 2
  config.feature_dim_ratio = 8  # Based / PLA feature dim = d_model // ratio (6 and 8 here)
  config.window = 8  # sliding-window attention ("swa")
  # 16 rows: a step takes half the CPU time of a 32-row one, and in 2000 steps of 16 attention
  # solved MQAR at width 32 (0.99, 0.91 by step 850), which 1500 steps of 32 barely did (0.96).
  config.batch_size = 16
  config.learning_rate = 3e-3  # MQAR and counting
  config.warmup_steps = 30
  config.weight_decay = 0.1
  config.steps = 3000  # MQAR, per model at most
  config.eval_every = 50
  config.eval_examples = 64  # validation examples per early-stopping check
  config.test_examples = 256  # per reported number
  config.target_accuracy = 0.99  # early stop

  # MQAR where attention's cache outgrows the recurrent states: 16 pairs in 128 tokens (a KV cache
  # of 128 positions against states of 2-12 KB at these widths). Trained on Zoology's kind of mix
  # of fewer pairs in shorter sequences: on 128x16 alone attention of width 64 was at 0.05 after
  # 2000 steps (lr 3e-3 and 1e-2); on this mix it reached 0.89 by step 2000 and 0.96 by 3000.
  config.mqar = ml_collections.ConfigDict()
  config.mqar.vocab_size = 128
  config.mqar.seq_len = 128
  config.mqar.num_pairs = 16
  # The training mix, seq_len x num_pairs; at most num_pairs pairs (PLA's prefix is the scored
  # context, and every training context is left-padded to it).
  config.mqar.train_mix = "32x4,64x8,128x16"

  # Set disjointness in JRT's layout: two mixer layers (4 layers, (baseconv, mixer) twice), with
  # and without MLPs; with one mixer layer order cannot matter (RESULTS explains why). Probes at 4
  # layers and width 32, no MLPs: 4x12 over 65 tokens at lr 3e-3, attention 0.38/0.44 after 1600
  # steps; 4x24/24x4 over 65 tokens at lr 1e-2, attention 0.57/0.64 after 4000 steps and
  # 0.75/0.85 after 20k; 8x48/48x8 over 129 tokens, every mixer at 0.04-0.16. Over 33 tokens at
  # lr 1e-2, 4x12/12x4: attention and PLA of width 48 pass 0.9 in both orders (PLA of width 32
  # does not: 0.887/0.871 after 4000 steps).
  config.sets = ml_collections.ConfigDict()
  config.sets.vocab_size = 33
  config.sets.sizes = "4x12,12x4"  # |A|x|B| pairs, mixed in training, each scored
  config.sets.jrt_repeats = 2
  config.sets.num_layers = 4
  config.sets.ffns = "none,mlp"  # the layouts swept: comma-separated of none (JRT's) and mlp
  config.sets.learning_rate = 1e-2
  config.sets.steps = 4000

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
  "mixers": "all",
  "d_models": "36,64,96,128",
  "feature_dim_ratio": 4,
  "window": 64,
  "batch_size": 128,
  "learning_rate": 8e-4,
  "warmup_steps": 500,
  "steps": 20_000,
  "eval_every": 1000,
  "eval_examples": 1000,
  "test_examples": 3000,
  # Zoology's MQAR: vocabulary 8192, 64 pairs in 256 tokens, trained on its mix of settings.
  "mqar.vocab_size": 8192,
  "mqar.seq_len": 256,
  "mqar.num_pairs": 64,
  "mqar.train_mix": "64x4,128x8,256x16,256x32,256x64",
  "sets.vocab_size": 2048,
  # JRT's twelve |A|x|B| pairs, both orders of each, (4,16) to (256,4).
  "sets.sizes": "4x16,16x4,8x32,32x8,64x16,16x64,4x128,128x4,16x256,256x16,4x256,256x4",
  "sets.learning_rate": 8e-4,
  "sets.steps": 20_000,
  "counting.lengths": "10-20,20-30,30-40",
  "counting.bpe_vocab_size": 256,
  "counting.steps": 20_000,
  "counting.d_model": 128,
}
