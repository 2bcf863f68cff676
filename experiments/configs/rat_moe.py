"""The RAT and RMoE experiments (``experiments/rat_moe.py``), sized for two shared CPU cores.

* ``lm``: byte-level LMs on the embedded corpus, every layer RAT, one run per chunk length ``L``
  (``1``: attention; ``seq_len``: the gated RNN);
* ``mqar``: MQAR recall of the same models at each ``L`` (``jaxrec.data.tasks.MQAR``);
* ``moe``: attention LMs whose feed-forward is an MoE, one run per router and seed.

The reference note's CPU experiments (``seed_models.md`` §3-4) are larger: scale up with e.g.
``--config.lm.d_model=256 --config.lm.num_layers=4 --config.lm.seq_len=512
--config.lm.chunk_sizes=1,4,16,64,512``, ``--config.mqar.seq_len=256 --config.mqar.num_pairs=16``,
``--config.moe.num_layers=12 --config.moe.d_model=128 --config.moe.num_experts=16
--config.moe.seeds=0,1,2``, and more ``steps`` everywhere.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiments = "lm,mqar,moe"  # which parts run, comma-separated
  # Parameters and data order of the lm and mqar runs, comma-separated: each L trains once per
  # seed, and the report gives the mean ± sample std over them.
  config.seeds = "0"
  config.out_dir = ""  # required: rat_moe.json, rat_moe.png and the report (RESULTS.md) go here
  config.progress = True  # a progress bar over all runs' steps

  config.lm = ml_collections.ConfigDict()
  config.lm.chunk_sizes = "1,4,16,128"  # RAT's L; the value seq_len is the gated RNN
  config.lm.seq_len = 128
  config.lm.d_model = 64
  config.lm.num_layers = 2
  config.lm.num_heads = 2
  config.lm.batch_size = 8
  config.lm.steps = 400
  config.lm.learning_rate = 3e-3
  config.lm.warmup_steps = 30
  config.lm.eval_batches = 20  # validation batches of batch_size x seq_len bytes

  config.mqar = ml_collections.ConfigDict()
  config.mqar.chunk_sizes = "1,4,16,64"
  config.mqar.vocab_size = 64
  config.mqar.seq_len = 64
  config.mqar.num_pairs = 8
  config.mqar.d_model = 64
  config.mqar.num_layers = 2
  # A BaseConv layer before each RAT layer, (baseconv, rat): Zoology's MQAR layout. Without it
  # attention (L=1) did not learn MQAR here: 0.13 after 1500 steps (2 seeds), ~0.15 at lr 3e-3
  # and 1e-3 after 5000, 0.19 after 1500 on a mix of shorter settings; with it, 0.975 at 1500.
  config.mqar.short_conv = True
  config.mqar.num_heads = 2
  config.mqar.batch_size = 32
  config.mqar.steps = 400
  # 3e-3: with the short convolution, attention (L=1) reached 0.975 in 1500 steps at 3e-3 and
  # stayed at 0.108 (2 seeds) at 1e-2.
  config.mqar.learning_rate = 3e-3
  config.mqar.warmup_steps = 30
  config.mqar.test_examples = 256  # scored after training (held-out seed)

  config.moe = ml_collections.ConfigDict()
  config.moe.routers = "linear,gru,mlp,gru_no_recurrence,gru_detached"
  config.moe.seeds = "0,1"
  config.moe.seq_len = 128
  config.moe.d_model = 64
  config.moe.num_layers = 4
  config.moe.num_heads = 2
  config.moe.num_experts = 8
  config.moe.top_k = 2
  config.moe.expert_hidden = 64
  config.moe.router_dim = 32  # the GRU / MLP router state p
  # Dropless, as RMoE's reference MoE: "none", or a capacity as a multiple of the balanced load
  # (e.g. 1.25), over which the GShard one-hot dispatch drops assignments.
  config.moe.capacity_factor = "none"
  config.moe.batch_size = 4
  config.moe.steps = 250
  config.moe.learning_rate = 3e-3
  config.moe.warmup_steps = 30
  config.moe.eval_batches = 20  # of batch_size x seq_len bytes
  return config
