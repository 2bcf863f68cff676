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
# # xLSTM in jaxrec: published weights, generation, and a state that does not grow
#
# Load an xLSTM checkpoint in the published layout (a directory with `config.json` and
# `*.safetensors`, as `NX-AI/xLSTM-7b` is laid out), generate with the O(1) recurrent state, and
# compare the size of that state with an attention KV cache as the context grows.
#
# By default the notebook first writes a tiny xLSTM with random weights in that layout
# (`models.save_xlstm`: the files a real checkpoint has, small enough for any CPU); point
# `JAXREC_XLSTM_CHECKPOINT` at a local copy of `NX-AI/xLSTM-7b` to load the real model (about
# 28 GB in fp32: use a machine with the memory for it, and `dtype="bfloat16"`).
#
# This notebook is generated: its source of truth is `colabs/xlstm.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/xlstm.py`;
# `tests/colabs/xlstm_test.py` checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/xlstm.ipynb there"
  )

# %%
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxrec
from jaxrec import models

if os.environ.get("JAXREC_XLSTM_CHECKPOINT"):
  CHECKPOINT = pathlib.Path(os.environ["JAXREC_XLSTM_CHECKPOINT"])
else:  # xLSTM 7B's architecture at a tiny size: 2 blocks of width 32, 2 heads, 64 token ids
  tiny = models.get_preset(
    "xlstm_7b", vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_hidden=96
  )
  CHECKPOINT = pathlib.Path(tempfile.mkdtemp()) / "tiny-xlstm"
  models.save_xlstm(models.LM(tiny, rngs=nnx.Rngs(0)), CHECKPOINT)
print(f"jax {jax.__version__} on {jax.devices()}; checkpoint {CHECKPOINT}")
print(sorted(p.name for p in CHECKPOINT.iterdir()))

# %% [markdown]
# ## Load the checkpoint
#
# `load_xlstm` reads `config.json` into an `LMConfig` (the `"mlstm"` mixer, an untied head, logits
# soft-capped at 30) and every tensor, one at a time, into its place; with `mesh=` each lands
# directly in its sharding.

# %%
model = models.load_xlstm(CHECKPOINT)
cfg = model.cfg
print(f"{models.param_count_of(model):,} parameters")
print(
  f"{cfg.num_layers} blocks of width {cfg.d_model}, {cfg.num_heads} heads, vocabulary "
  f"{cfg.vocab_size}, feed-forward width {cfg.mlp_dim}, logit cap {cfg.logit_soft_cap}"
)

# %% [markdown]
# ## Generate
#
# A parallel prefill of the prompt fills each layer's state `(C, n, m)`; every new token is then
# one step of the recurrence. (The tiny checkpoint has random weights and no tokenizer: its
# tokens are ids.)

# %%
prompt = np.arange(1, 9, dtype=np.int32)[None] % cfg.vocab_size
new = jaxrec.generate(model, prompt, max_new_tokens=16).tokens  # greedy
tokens = np.concatenate([prompt, new], axis=1)
print("prompt   ", prompt[0].tolist())
print("generated", new[0].tolist())

# %% [markdown]
# Decoding from the state is the same computation as a full forward pass over the whole text:
# greedy decoding picked, at every step, the most likely token of that pass.

# %%
logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens[:, :-1])
same = np.array_equal(
  np.argmax(logits[:, prompt.shape[1] - 1 :], axis=-1), tokens[:, prompt.shape[1] :]
)
print("every generated token is the full forward's argmax:", same)

# %% [markdown]
# ## State size against context length
#
# The mLSTM state is the same size whatever the context; an attention model of the same width and
# depth keeps keys and values for every token. Sizes come from `jax.eval_shape`: nothing is
# allocated.

# %%
contexts = [2**p for p in range(10, 18)]
attention_cfg = models.LMConfig(
  vocab_size=cfg.vocab_size,
  d_model=cfg.d_model,
  num_layers=cfg.num_layers,
  mixer_pattern=("attention",),
  num_heads=cfg.num_heads,
)
attention = nnx.eval_shape(lambda: models.LM(attention_cfg, rngs=nnx.Rngs(0)))


def cache_bytes(lm, context):
  cache = jax.eval_shape(lambda: lm.init_cache(1, context, "bfloat16"))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


state_bytes = [cache_bytes(model, c) for c in contexts]
kv_bytes = [cache_bytes(attention, c) for c in contexts]
for c, s, kv in zip(contexts, state_bytes, kv_bytes, strict=True):
  print(f"context {c:>7,}: mLSTM state {s / 2**20:8.3f} MiB, KV cache (bf16) {kv / 2**20:9.3f} MiB")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(contexts, np.array(state_bytes) / 2**20, "o-", label="mLSTM state (fp32)")
ax.loglog(contexts, np.array(kv_bytes) / 2**20, "s-", label="attention KV cache (bf16)")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("MiB per sequence")
ax.legend()
plt.show()
