"""Liger on SmolLM2-135M-Instruct (``experiments/linearize.py``): the paper's conversion and its
ablations on a real pretrained chat model, sized for 2 CPU cores (59 min there, shared with other
jobs, peak RSS 12 GB)::

  python -m experiments.linearize --workdir runs/liger_smollm2 \\
      --config=experiments/configs/linearize_smollm2.py --publish=.
  python -m experiments.linearize --workdir runs/liger_smollm2_full \\
      --config=experiments/configs/linearize_smollm2.py --config.full=True  # accelerator grid

The paper's settings: the gate from the key projection, a sliding window of 64 mixed half and
half with the recurrence, LoRA rank 8 on q, k and v, a constant learning rate of 1e-3. Text: the
Python language reference and the embedded stdlib sources. On the CPU most of the hour is
compilation (each ablation is another model structure) and evaluation; fine-tuning gets 24 steps
of 4 x 256 tokens per setting. ``full=True`` fine-tunes each setting on 20M tokens (the paper's
budget for Llama-3-8B) at 8 x 1024.
"""

from experiments.configs import linearize


def get_config():
  config = linearize.get_config()
  config.teacher = "smollm2-135m"
  config.corpus = "python_reference+stdlib"
  config.study = "ablations"
  config.liger.window = 64
  config.seq_len = 256
  config.batch_size = 4
  config.finetune_tokens = 24 * 4 * 256
  config.eval_batches = 8
  config.probe.pairs = 8
  config.probe.gap = 128  # filler tokens between the pairs and the queries (> the window of 64)
  config.state_context = 0  # the teacher's context, 8192
  config.mcq = -1  # all 119 committed questions
  config.sample.prompt = "What is the capital of France?"
  config.sample.always = True
  config.export = False  # seven 135M-parameter exports would not say more than the table
  return config
