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
# # Liger: from a transformer to a gated recurrent model
#
# Liger (Lan et al. 2025) turns a pretrained Llama-style transformer into a gated linear-recurrent
# model without new parameters: every attention layer keeps its query, key, value and output
# weights, the recurrence's forget gate is computed from the key projection, and a short
# sliding window of softmax attention is mixed in. A little LoRA fine-tuning recovers much of the
# quality, and the model then decodes from a state whose size does not grow with the context.
#
# Here: train a small teacher for a few minutes, convert it with `jaxrec.linearize.liger`,
# fine-tune it with LoRA, and compare its generations and its decoding memory with the teacher's.
# With `jaxrec.models.load_pretrained` the teacher can be a Hugging Face Llama or Qwen2
# checkpoint instead.
#
# This notebook is generated: its source of truth is `colabs/liger.py` (jupytext percent format).
# Edit that file, then run `jupytext --to ipynb colabs/liger.py`; `tests/colabs/liger_test.py`
# checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/liger.ipynb there"
  )

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jaxrec
from jaxrec import data, linearize, models, sharding, train

# Teacher training steps (LoRA gets a fifth of them); the tests set a handful.
STEPS = int(os.environ.get("JAXREC_NOTEBOOK_STEPS", "500"))
print(f"jax {jax.__version__} on {jax.devices()}; teacher: {STEPS} steps")

# %% [markdown]
# ## A Llama-style teacher
#
# A Llama is jaxrec's `LM` with attention in every layer: grouped-query attention with RoPE (two
# key/value heads for four query heads here), SwiGLU MLPs, RMSNorm and an untied head. It trains
# on the Python standard library's sources (byte tokenizer) with the pieces of `jaxrec.train`.

# %%
tokenizer = data.ByteTokenizer()
cfg = models.LMConfig(
  vocab_size=tokenizer.vocab_size,
  d_model=128,
  num_layers=2,
  mixer_pattern=("attention",),
  num_heads=4,
  num_kv_heads=2,
  tie_embeddings=False,
  max_seq_len=256,
)
mesh = sharding.make_mesh(
  sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, jax.device_count())
)
byte_lengths = train.token_byte_lengths(tokenizer)


def batches(split, seed=0):
  corpus = data.stdlib_corpus(split)
  shuffle = split == "train"
  return iter(data.make_lm_dataset(corpus, tokenizer, 128, 16, seed=seed, shuffle=shuffle))


def fit(graphdef, abstract, state, tx, schedule, steps, seed):
  """Runs `steps` train steps on the training split; returns the state and the losses."""
  step = train.make_train_step(graphdef, tx, schedule, abstract, mesh, byte_lengths=byte_lengths)
  stream, losses = batches("train", seed), []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, train.global_batch(next(stream), mesh))
      losses.append(float(metrics["bits_per_byte"]))
  return state, losses


schedule = train.warmup_cosine_schedule(3e-3, STEPS, warmup_steps=min(30, STEPS // 10))
tx = train.make_optimizer(schedule)
graphdef, abstract = train.abstract_train_state(lambda: models.LM(cfg, rngs=nnx.Rngs(0)), tx, mesh)
state = train.init_train_state(lambda: models.LM(cfg, rngs=nnx.Rngs(0)), tx, abstract)
state, teacher_losses = fit(graphdef, abstract, state, tx, schedule, STEPS, seed=0)
teacher = nnx.merge(graphdef, state.params, state.rest)
print(
  f"teacher: {models.param_count_of(teacher):,} parameters, train bits/byte "
  f"{teacher_losses[0]:.2f} -> {teacher_losses[-1]:.2f}"
)

# %% [markdown]
# ## Convert
#
# `liger` returns a new `LM` whose attention layers are `"liger"` mixers holding the teacher's
# arrays (nothing is copied, nothing is added). Each computes, per head,
# `S_t = diag(α_t) S_{t-1} + φ(k_t) v_tᵀ`, `o_t = φ(q_t) S_t` with `φ` a softmax over the head
# width and `log α_t = logsigmoid(k_t) / 16` taken from the key projection, and averages it with
# softmax attention over the last 32 tokens.

# %%
student = linearize.liger(teacher, variant="gla", window=32)
print("mixers:", student.cfg.layer_mixers)
print("same parameter count:", models.param_count_of(student) == models.param_count_of(teacher))
eval_steps = {}


def bits_per_byte(model, n=4):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if graphdef not in eval_steps:
    eval_steps[graphdef] = train.make_eval_step(graphdef, byte_lengths)
  state = train.TrainState(step=0, params=params, rest=rest, opt_state=())
  stream, sums = batches("validation"), []
  with jax.set_mesh(mesh):
    for _ in range(n):
      sums.append(
        jax.device_get(eval_steps[graphdef](state, train.global_batch(next(stream), mesh)))
      )
  total = jax.tree.map(lambda *xs: np.sum(np.float64(xs)), *sums)
  return train.summarize(total)["bits_per_byte"]


scores = {"teacher": bits_per_byte(teacher), "converted": bits_per_byte(student)}
print({k: round(v, 3) for k, v in scores.items()})

# %% [markdown]
# ## Fine-tune with LoRA
#
# Rank-8 LoRA on the query, key and value projections (the paper's choice). The train state keeps
# only the LoRA factors trainable (`trainable=nnx.LoRAParam`): the frozen weights get neither
# gradients nor optimizer state. Afterwards the factors are merged back into the weights.

# %%
linearize.apply_lora(student, rank=8, alpha=8.0, targets=("q_proj", "k_proj", "v_proj"))
lora_schedule = optax.constant_schedule(1e-3)
lora_tx = train.make_optimizer(lora_schedule, weight_decay=0.0, b2=0.999)
graphdef, abstract, state = train.train_state_from_model(
  student, lora_tx, mesh, trainable=nnx.LoRAParam
)
n_lora = sum(x.size for x in jax.tree.leaves(state.params))
print(f"trainable: {n_lora:,} of {models.param_count_of(student):,} parameters")
state, lora_losses = fit(graphdef, abstract, state, lora_tx, lora_schedule, max(STEPS // 5, 1), 1)
student = linearize.merge_lora(nnx.merge(graphdef, state.params, state.rest))
scores["fine-tuned"] = bits_per_byte(student)
print({k: round(v, 3) for k, v in scores.items()})

# %% [markdown]
# ## Generations
#
# `jaxrec.generate` prefills the caches in one parallel pass and then decodes a token at a time:
# the teacher from KV caches, the converted model from its recurrent states and 32-token windows
# (the same function as its parallel forward: `tests/layers/mixers_test.py` checks it).

# %%
prompt = [tokenizer.bos_id, *tokenizer.encode("def ")]
samples = {}
for name, model in (("teacher", teacher), ("liger", student)):
  new = jaxrec.generate(model, prompt, max_new_tokens=120).tokens[0]  # greedy
  samples[name] = np.concatenate([prompt, new])
  print(f"--- {name}\ndef {tokenizer.decode(new)}")

# %% [markdown]
# ## Decoding memory
#
# The bytes each model keeps while decoding, by context length, counted on abstract caches
# (`jax.eval_shape`: nothing is allocated). The teacher's KV caches grow with every token; the
# converted model keeps `[B, H, K, V]` states and a 32-token window whatever the length.


# %%
def cache_bytes(model, length):
  shapes = jax.eval_shape(lambda: model.init_cache(1, length))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


lengths = [256, 1024, 4096, 16384, 65536]
memory = {
  name: [cache_bytes(m, n) for n in lengths]
  for name, m in (("teacher", teacher), ("liger", student))
}
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, values in memory.items():
  ax.plot(lengths, np.array(values) / 2**20, "o-", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("decoding state (MiB)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
for n, t, s in zip(lengths, memory["teacher"], memory["liger"]):
  print(f"{n:>6} tokens: teacher {t / 2**20:8.2f} MiB, liger {s / 2**20:6.2f} MiB")
