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
# # jaxrec quickstart
#
# Build a small hybrid language model (gated linear attention with one softmax-attention layer in
# four), train it for a few hundred steps on the Python standard library, and sample code from
# it. Runs on a Colab CPU, GPU or TPU runtime; a CPU takes a few minutes.
#
# This notebook is generated: its source of truth is `colabs/quickstart.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/quickstart.py`;
# `tests/colabs/quickstart_test.py` checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/quickstart.ipynb there"
  )

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxrec
from jaxrec import data, models, sharding, train

# Training steps; the tests set a handful through the environment.
STEPS = int(os.environ.get("JAXREC_NOTEBOOK_STEPS", "300"))
print(f"jax {jax.__version__} on {jax.devices()}; training for {STEPS} steps")

# %% [markdown]
# ## A model from a preset
#
# `get_preset` returns a frozen `LMConfig`; any field can be replaced. The byte tokenizer has 256
# byte ids plus pad, bos and eos, so the vocabulary is 259. `param_count` counts the parameters
# on an abstract model, without allocating them.

# %%
tokenizer = data.ByteTokenizer()
cfg = models.get_preset("tiny-hybrid", vocab_size=tokenizer.vocab_size)
print("layers:", cfg.layer_mixers)
print(f"parameters: {models.param_count(cfg):,}")

# %% [markdown]
# ## The core op: gated linear attention
#
# Every GLA layer calls `jaxrec.ops.gated_linear_attention`. The `"sequential"` method is the
# reference recurrence `S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ`, `o_t = S_tᵀ q_t / √K`, one step at
# a time; `"chunk"` is the chunkwise-parallel form used for training. They agree, also when the
# length is not a multiple of the chunk, and so do their final states.

# %%
B, T, H, K, V = 2, 100, 2, 16, 16
kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(kq, (B, T, H, K))
k = jax.random.normal(kk, (B, T, H, K))
v = jax.random.normal(kv, (B, T, H, V))
log_decay = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, K)) + 3.0)  # decays near 1

# Jitted: one compiled program per method rather than op-by-op dispatch.
gla = jax.jit(
  jaxrec.ops.gated_linear_attention, static_argnames=("output_final_state", "method", "chunk_size")
)
o_seq, state_seq = gla(q, k, v, log_decay, output_final_state=True, method="sequential")
o_chunk, state_chunk = gla(
  q, k, v, log_decay, output_final_state=True, method="chunk", chunk_size=32
)
print("max |output difference|:", float(abs(o_seq - o_chunk).max()))
print("max |state difference|: ", float(abs(state_seq - state_chunk).max()))

# %% [markdown]
# ## Data: the embedded standard-library corpus
#
# `stdlib_corpus` lists the `*.py` files of the running Python (no download), with a fixed
# train/validation split. `make_lm_dataset` is a grain pipeline: shuffle, tokenize, pack documents
# into rows of `seq_len` tokens and batch them. `segment_ids` mark the documents within a row
# (the recurrence restarts at each), and `weights` mask the targets that cross a document boundary
# or are padding.

# %%
corpus = data.stdlib_corpus("train")
print(corpus)
dataset = data.make_lm_dataset(corpus, tokenizer, seq_len=128, batch_size=16, seed=0)
batches = iter(dataset)
example = next(batches)
for name, array in example.items():
  print(f"{name:12s} {array.dtype} {array.shape}")
print(repr(tokenizer.decode(example["inputs"][0])))

# %% [markdown]
# ## Train
#
# The pieces of `jaxrec.train`: AdamW with a warmup-cosine schedule, a device mesh (here all
# devices on the `data` axis), the train state initialized directly into its shardings, and a
# jitted train step that donates the state. `python -m experiments.train` (or
# `train.train_and_evaluate(config, workdir)`) adds evaluation, checkpoints and flags around the
# same step.

# %%
schedule = train.warmup_cosine_schedule(3e-3, STEPS, warmup_steps=min(30, STEPS // 10), end_lr=3e-4)
tx = train.make_optimizer(schedule, weight_decay=0.1)
mesh = sharding.make_mesh(
  sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, jax.device_count())
)


def make_model():
  return models.LM(cfg, rngs=nnx.Rngs(0))


graphdef, abstract = train.abstract_train_state(make_model, tx, mesh)
state = train.init_train_state(make_model, tx, abstract)
train_step = train.make_train_step(
  graphdef, tx, schedule, abstract, mesh, byte_lengths=train.token_byte_lengths(tokenizer)
)

history = []
with jax.set_mesh(mesh):
  for _ in range(STEPS):
    state, metrics = train_step(state, train.global_batch(next(batches), mesh))
    history.append(metrics)
history = jax.device_get(history)
losses = np.array([m["loss"] for m in history])
print(f"loss: step 1 {losses[0]:.3f}, step {STEPS} {losses[-1]:.3f}")

# %% [markdown]
# ## The loss curve
#
# Bits per byte of the training batches (a uniform guess over 259 ids is log₂ 259 ≈ 8.0). Single
# batches of a few files are noisy, so a moving average is drawn over them.

# %%
bits = np.array([m["bits_per_byte"] for m in history])
window = max(1, STEPS // 20)
smoothed = np.convolve(bits, np.ones(window) / window, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, STEPS + 1), bits, alpha=0.3, label="batch")
ax.plot(np.arange(window, STEPS + 1), smoothed, label=f"mean of {window}")
ax.legend()
ax.set_xlabel("step")
ax.set_ylabel("train bits per byte")
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Sample
#
# `jaxrec.generate` prefills the caches with the prompt in one parallel pass, then decodes one
# token at a time: the GLA layers from their fixed-size state, the attention layer from a KV
# cache. It is greedy unless given a `temperature`, and stops a row at any of its `stop_tokens`.
# (`jaxrec.Sampler(model, tokenizer)` does the same from text, with the tokenizer's eos.)

# %%
model = nnx.merge(graphdef, state.params, state.rest)
prompt = [tokenizer.bos_id, *tokenizer.encode("def ")]
with jax.set_mesh(mesh):
  out = jaxrec.generate(
    model, prompt, 200, stop_tokens=[tokenizer.eos_id], temperature=0.8, top_p=0.95
  )
tokens = out.tokens[:, : out.lengths[0]]
print("def " + tokenizer.decode(tokens[0]))
