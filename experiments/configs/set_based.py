"""Set-Based Prompting on a real model (``experiments/set_based.py``): multiple-choice accuracy
over every order of the options, vanilla against Set-Based Prompting.

  python -m experiments.set_based --workdir runs/set_based
  python -m experiments.set_based --workdir runs/set_based --config.model=path/to/model.gguf \\
      --config.questions=my_questions.json --config.max_questions=20
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # A named model (jaxrec.models.NAMED_MODELS), a GGUF file or a Hugging Face directory; its
  # tokenizer must have a chat template.
  config.model = "smollm2-135m"
  config.dtype = "float32"
  # A JSON list of {"question", "options" (3 or 4 strings), "answer" (index)}; "" is the
  # committed set experiments/data/general_knowledge_mcq.json.
  config.questions = ""
  config.max_questions = 0  # 0: all
  config.max_new_tokens = 16  # greedy answer length (the answers are a few words)
  config.batch_size = 16  # prompts per compiled call (the prompt logits are [B, T, vocab])
  return config
