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
# # RAT and RMoE
#
# Two ideas from recent recurrent-model papers, on small models that run on a CPU in a minute or
# two.
#
# * **RAT** (arXiv 2507.04416) splits the sequence into chunks of `L` tokens: a gated linear
#   recurrence inside each chunk, softmax attention across the chunks' final states. `L = 1` is
#   attention, `L = T` a gated RNN; in between, decoding keeps one state per chunk, `L` times
#   fewer than attention's keys and values.
# * **RMoE** (arXiv 2408.06793) routes a mixture-of-experts feed-forward with a GRU whose state
#   goes from layer to layer, so each layer's routing can depend on the earlier layers' choices.
#
# The papers' smallest experiments (a sweep over `L`, MQAR, the router ablations) are
# `python -m experiments.rat_moe --config.out_dir=runs/rat_moe` (see RESULTS.md).
#
# This notebook is generated: its source of truth is `colabs/rat_moe.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/rat_moe.py`;
# `tests/colabs/rat_moe_test.py` checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/rat_moe.ipynb there"
  )

# %%
import math
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jaxrec
from jaxrec import data, models, sharding, train

# Training steps and model width; the tests set small ones through the environment.
STEPS = int(os.environ.get("JAXREC_NOTEBOOK_STEPS", "200"))
WIDTH = int(os.environ.get("JAXREC_NOTEBOOK_WIDTH", "128"))
SEQ_LEN, BATCH = 128, 8
print(f"jax {jax.__version__} on {jax.devices()}; {STEPS} steps, width {WIDTH}")

# %% [markdown]
# ## A tiny RAT language model
#
# The `tiny-rat` preset has RAT in every layer (`tiny-rat-swa` alternates it with sliding-window
# attention); its option `rat.chunk_size` is `L`. Byte-level tokens: 256 bytes plus pad, bos and
# eos.

# %%
tokenizer = data.ByteTokenizer()
CHUNK = 16


def rat_config(**overrides):
  return models.get_preset(
    "tiny-rat",
    vocab_size=tokenizer.vocab_size,
    d_model=WIDTH,
    num_layers=2,
    max_seq_len=SEQ_LEN,
    rat={"chunk_size": CHUNK},
    **overrides,
  )


cfg = rat_config()
print("layers:", cfg.layer_mixers, f"chunk length L = {cfg.options('rat').chunk_size}")
print(f"parameters: {models.param_count(cfg):,}")

# %% [markdown]
# ## Train briefly on the embedded corpus
#
# The standard-library corpus (no download) packed into rows of 128 bytes, and the pieces of
# `jaxrec.train`: AdamW with warmup and cosine decay, the train state initialized into its
# shardings, the jitted train step.

# %%
batches = iter(
  data.make_lm_dataset(
    data.stdlib_corpus("train"), tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=0
  )
)
schedule = train.warmup_cosine_schedule(3e-3, STEPS, max(1, STEPS // 10), end_lr=3e-4)
tx = train.make_optimizer(schedule, weight_decay=0.1)
mesh = sharding.make_mesh(sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1))


def make_model():
  return models.LM(cfg, rngs=nnx.Rngs(0))


graphdef, abstract = train.abstract_train_state(make_model, tx, mesh)
state = train.init_train_state(make_model, tx, abstract)
train_step = train.make_train_step(graphdef, tx, schedule, abstract, mesh)
losses = []
with jax.set_mesh(mesh):
  for _ in range(STEPS):
    state, metrics = train_step(state, train.global_batch(next(batches), mesh))
    losses.append(float(metrics["loss"]))
print(
  f"loss: step 1 {losses[0]:.3f}, step {STEPS} {losses[-1]:.3f} (uniform: {math.log(tokenizer.vocab_size):.3f})"
)
model = nnx.merge(graphdef, state.params, state.rest)

# %% [markdown]
# ## The decode cache: ⌈T/L⌉ chunk states against T keys and values
#
# A RAT layer's cache holds the final key and value state of every completed chunk plus the
# running state of the current one; an attention layer's holds the key and value of every token.
# Both in fp32 here (RAT's states always are). Sizes come from `jax.eval_shape`: nothing is
# allocated.

# %%
attention_cfg = rat_config(mixer_pattern=("attention",))
attention = nnx.eval_shape(lambda: models.LM(attention_cfg, rngs=nnx.Rngs(0)))


def cache_bytes(lm, context):
  cache = jax.eval_shape(lambda: lm.init_cache(1, context, "float32"))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


contexts = [2**p for p in range(8, 17, 2)]
rat_bytes = [cache_bytes(model, t) for t in contexts]
kv_bytes = [cache_bytes(attention, t) for t in contexts]
for t, r, kv in zip(contexts, rat_bytes, kv_bytes, strict=True):
  chunks = -(-t // CHUNK)
  print(
    f"T {t:>6,}: RAT {chunks:>5,} chunk states {r / 2**10:9.1f} KiB, KV cache "
    f"{kv / 2**10:9.1f} KiB, ratio {kv / r:5.2f}"
  )

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(contexts, np.array(kv_bytes) / 2**10, "s-", label="attention KV cache (T entries)")
ax.loglog(contexts, np.array(rat_bytes) / 2**10, "o-", label=f"RAT, L={CHUNK} (⌈T/L⌉ states)")
ax.set_xlabel("context length T (tokens)")
ax.set_ylabel("KiB per sequence")
ax.legend()
plt.show()

# %% [markdown]
# ## Generate
#
# `jaxrec.generate` prefills the RAT caches with the prompt in one parallel pass, then decodes a
# token at a time: the recurrence within the current chunk, attention over the chunk states.

# %%
NEW_TOKENS = 24
prompt = [tokenizer.bos_id, *tokenizer.encode("def ")]
with jax.set_mesh(mesh):
  new = jaxrec.generate(model, [prompt], max_new_tokens=NEW_TOKENS).tokens  # greedy
generated = np.concatenate([[prompt], new], axis=1)
print(repr(tokenizer.decode(new[0])))

# %% [markdown]
# ## RMoE: routing with a GRU across layers
#
# `tiny-moe` replaces every feed-forward with 8 SwiGLU experts, top-2, routed by the RMoE GRU
# (the option `moe.router="gru"`); `"linear"` is the usual router. Every MoE layer reports its
# routing with `nnx.sow`, and the model pools the reports over its layers; `nnx.capture` collects
# both. The pooled statistics: the load-balancing loss (1 when balanced), the load of the
# busiest expert relative to a balanced one, the router entropy (nats; uniform is ln 8), the
# fraction of assignments dropped for capacity, and the mutual information (bits) between
# consecutive layers' first choices. Untrained models here; the experiment trains them.

# %%
example = next(batches)
tokens = np.asarray(example["inputs"])


def moe_model(router):
  moe_cfg = models.get_preset(
    "tiny-moe",
    vocab_size=tokenizer.vocab_size,
    d_model=WIDTH,
    num_layers=3,
    max_seq_len=SEQ_LEN,
    moe={"router": router},
  )
  return models.LM(moe_cfg, rngs=nnx.Rngs(0))


@nnx.jit
def routing(lm, tokens):
  """The pooled statistics (with the weighted balancing loss, ``aux_loss``) and every layer's
  expert loads ``[layers, E]``, as the model and its MoE layers sow them on one forward pass."""
  _, sown = nnx.capture(lambda lm: lm(tokens), nnx.Intermediate)(lm)
  (aux_loss,) = sown["aux_loss"].get_value()
  (pooled,) = sown["metrics"].get_value()
  layer_stats = [sown["layers"][i]["mlp"]["routing"].get_value()[0] for i in range(len(lm.layers))]
  return {"aux_loss": aux_loss, **pooled}, jnp.stack([stats.load for stats in layer_stats])


moe_stats, moe_loads = {}, {}
for router in ("gru", "linear"):
  aux, loads = jax.device_get(routing(moe_model(router), tokens))
  moe_stats[router] = {k: float(v) for k, v in aux.items()}
  moe_loads[router] = loads
names = [k for k in moe_stats["gru"] if k.startswith("moe/")]
print(f"{'':20s} {'gru':>8s} {'linear':>8s}")
for name in names:
  print(f"{name:20s} {moe_stats['gru'][name]:8.4f} {moe_stats['linear'][name]:8.4f}")

# %% [markdown]
# Every layer's load: the fraction of its `k · N` expert assignments that chose each expert
# (before capacity drops; `1 / 8` each when balanced).

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
top = max(loads.max() for loads in moe_loads.values())
for ax, (router, loads) in zip(axes, moe_loads.items(), strict=True):
  image = ax.imshow(loads, vmin=0, vmax=top, cmap="viridis")
  ax.set_title(f"{router} router: expert load")
  ax.set_xlabel("expert")
axes[0].set_ylabel("layer")
fig.colorbar(image, ax=axes)
plt.show()
