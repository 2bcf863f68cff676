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
# # Long-context inference with jaxrec
#
# Five ways to read a long or structured input with a trained attention model, without retraining,
# as policies of `jaxrec.inference.longctx`: LM-Infinite (Λ-shaped mask with a distance cap),
# Recycled Attention (a small recycled KV cache refreshed by full steps), LongHeads (each head
# reads its own chunks), ThinK (pruned key channels) and Set-Based Prompting (order-free options).
# `longctx.apply(model, policy)` returns the model with its attention layers wrapped to read their
# keys through the policy (the same parameter arrays): a plain model, for `jaxrec.generate`,
# `jaxrec.inference.loglikelihood` or a call of its own. A small random model keeps this fast on a
# CPU; `experiments/long_context.py` evaluates the policies on SmolLM2-135M.
#
# This notebook is generated: its source of truth is `colabs/long_context.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/long_context.py`;
# `tests/colabs/long_context_test.py` checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/long_context.ipynb there"
  )

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxrec
from jaxrec.inference import loglikelihood, longctx
from jaxrec.models import LM, LMConfig

# Context length; the tests set a short one through the environment.
LENGTH = int(os.environ.get("JAXREC_NOTEBOOK_LENGTH", "1024"))
cfg = LMConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, mixer_pattern=("attention",))
model = LM(cfg, rngs=nnx.Rngs(0))
prompt = np.random.default_rng(0).integers(0, 256, (1, LENGTH)).astype(np.int32)

# %% [markdown]
# ## One model per policy
#
# Each policy is a small frozen config object with its paper's defaults, here scaled to a short
# context. The same model, with each applied, generates; the caches report the bytes they hold.

# %%
policies = {
  "vanilla": None,
  "lm_infinite": longctx.lm_infinite(
    global_tokens=10, window=LENGTH // 8, distance_cap=LENGTH // 8
  ),
  "recycled": longctx.recycled(k=LENGTH // 8, stride=8),
  "longheads": longctx.longheads(chunk_size=LENGTH // 32, chunks_per_head=4),
  "think": longctx.think(channel_ratio=0.4),
}
models = {
  name: model if policy is None else longctx.apply(model, policy)
  for name, policy in policies.items()
}
cache_bytes = {}
for name, m in models.items():
  out = jaxrec.generate(m, prompt, 8).tokens
  # The cache after the prompt: the shapes the prefill returns (jax.eval_shape computes nothing).
  empty = m.init_cache(1, LENGTH + 8)
  cache = jax.eval_shape(lambda c, m=m: m(jnp.asarray(prompt), cache=c)[1], empty)
  cache_bytes[name] = longctx.cache_bytes(cache)
  print(f"{name:12s} new tokens {out[0].tolist()}  cache {cache_bytes[name] / 2**10:.0f} KiB")

plt.bar(list(cache_bytes), [b / 2**10 for b in cache_bytes.values()])
plt.ylabel("KV cache after the prompt (KiB)")
plt.show()

# %% [markdown]
# ## Scoring under a policy
#
# `loglikelihood` scores every next token in one pass (LM-Infinite's Λ-mask, LongHeads' chunks)
# or, with `prefill=P`, by teacher-forced decoding, which is how the decoding-only policies
# (Recycled, ThinK) are scored.

# %%
for name, prefill in (("vanilla", None), ("lm_infinite", None), ("think", LENGTH // 2)):
  logp = loglikelihood(models[name], prompt, prefill=prefill)
  print(f"{name:12s} mean log-likelihood {float(logp.mean()):.4f}")

# %% [markdown]
# ## Set-Based Prompting: answers that do not depend on the order of the options
#
# A prefix, three options of unequal lengths and a suffix: with `set_based`, the options do not
# see each other and restart at the same position, so the suffix's logits are the same in every
# order; with plain attention they are not.

# %%
rng = np.random.default_rng(1)
prefix, suffix = rng.integers(0, 256, 5), rng.integers(0, 256, 3)
options = [rng.integers(0, 256, n) for n in (4, 6, 9)]


def suffix_logits(order, use_set):
  tokens = np.concatenate([prefix, *(options[i] for i in order), suffix])[None].astype(np.int32)
  policy = longctx.set_based(len(prefix), tuple(len(options[i]) for i in order), len(suffix))
  logits, _ = (longctx.apply(model, policy) if use_set else model)(jnp.asarray(tokens))
  return np.asarray(logits[0, -len(suffix) :])


set_difference = np.abs(suffix_logits((0, 1, 2), True) - suffix_logits((2, 0, 1), True)).max()
plain_difference = np.abs(suffix_logits((0, 1, 2), False) - suffix_logits((2, 0, 1), False)).max()
print(f"set-based: {set_difference:.2e}, plain attention: {plain_difference:.2e}")
