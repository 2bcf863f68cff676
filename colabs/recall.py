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
# # Recall: attention against Based on MQAR
#
# Multi-query associative recall (MQAR, Zoology) asks a model to store key-value pairs and
# answer queries for them later. Attention keeps every token and solves it; a recurrent model
# must fit the pairs into its fixed state. This notebook trains two small models, `(baseconv,
# attention)` and `(baseconv, based)`, on the same MQAR rows for 2000 steps of 16 examples, then
# scores them with the plain prompt and with JRT-Prompt (the context shown twice before the
# questions). A CPU takes a minute or two. The full study, every registered mixer across state
# sizes, set disjointness and counting, is
# `python -m experiments.recall --config.out_dir=runs/recall` (see RESULTS.md).
#
# This notebook is generated: its source of truth is `colabs/recall.py` (jupytext percent
# format). Edit that file, then run `jupytext --to ipynb colabs/recall.py`;
# `tests/colabs/recall_test.py` checks that the two agree and executes the notebook.

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
    "github.com/OWNER/jaxrec), or clone that repository and open colabs/recall.ipynb there"
  )

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from jaxrec import inference, models, sharding, train
from jaxrec.data import tasks

# Training steps per model; the tests set a handful through the environment.
STEPS = int(os.environ.get("JAXREC_NOTEBOOK_STEPS", "2000"))
BATCH = 16
print(f"jax {jax.__version__} on {jax.devices()}; training for {STEPS} steps per model")

# %% [markdown]
# ## The task
#
# Keys come from the first half of the vocabulary, values from the second; every key is queried
# once after the context, mostly soon after it (power-law gaps). Rows are left-padded (segment
# 0) so every question ends the row, and only the query positions carry a loss weight.

# %%
mqar = tasks.MQAR(vocab_size=64, seq_len=32, num_pairs=4)
ROW = mqar.max_prompt_length(2)  # long enough for the JRT-Prompt rows too
train_rows = inference.recall_dataset(
  mqar, num_examples=STEPS * BATCH, batch_size=BATCH, seed=0, seq_len=ROW, shuffle=False
)
example = train_rows[0]
print("inputs ", example["inputs"][0])
print("weights", example["weights"][0].astype(int))
print("targets", np.where(example["weights"][0] > 0, example["targets"][0], -1))

# %% [markdown]
# ## Train two mixers
#
# The same training step as `python -m experiments.train` (`jaxrec.train`), on the task's rows.

# %%
mesh = sharding.make_mesh(sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1))


def fit(mixer: str) -> nnx.Module:
  cfg = models.LMConfig(
    vocab_size=mqar.num_tokens,
    d_model=64,
    num_layers=2,
    mixer_pattern=("baseconv", mixer),
    num_heads=2,
    mixer_options={"based": {"feature_dim": 8}},
    max_seq_len=ROW,
  )
  # The recall sweep's settings (experiments/configs/recall.py): peak 3e-3 after 30 steps.
  schedule = train.warmup_cosine_schedule(3e-3, STEPS, min(30, STEPS // 2), 3e-4)
  tx = train.make_optimizer(schedule, weight_decay=0.1)

  def make():
    return models.LM(cfg, rngs=nnx.Rngs(0))

  graphdef, abstract = train.abstract_train_state(make, tx, mesh)
  state = train.init_train_state(make, tx, abstract)
  step = train.make_train_step(graphdef, tx, schedule, abstract, mesh)
  # One thread draws the batches ahead (`read_ahead`): grain's default 16 threads would only
  # contend with the train loop for Python.
  for batch in tasks.read_ahead(train_rows):
    state, metrics = step(state, train.global_batch(batch, mesh))
  print(f"{mixer}: final training loss {float(metrics['loss']):.3f}")
  return nnx.merge(graphdef, state.params, state.rest)


trained = {mixer: fit(mixer) for mixer in ("attention", "based")}

# %% [markdown]
# ## Score recall, with and without JRT-Prompt
#
# `evaluate_recall` scores the argmax at the query positions of held-out examples (another
# seed). `repeats=2` shows the context twice before the questions (`jaxrec.inference.jrt_prompt`),
# which these models never saw in training.

# %%
accuracy = {
  (mixer, repeats): inference.evaluate_recall(
    model, mqar, num_examples=128, batch_size=64, seed=1, repeats=repeats, seq_len=ROW
  )["accuracy"]
  for mixer, model in trained.items()
  for repeats in (1, 2)
}
for (mixer, repeats), acc in accuracy.items():
  print(f"{mixer:9s} repeats={repeats}: accuracy {acc:.3f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3.2))
names = list(trained)
for offset, repeats in ((-0.2, 1), (0.2, 2)):
  values = [accuracy[(m, repeats)] for m in names]
  label = "plain prompt" if repeats == 1 else "JRT-Prompt"
  ax.bar(np.arange(len(names)) + offset, values, width=0.4, label=label)
ax.axhline(1 / (mqar.vocab_size // 2), color="gray", ls=":", label="chance")
ax.set_xticks(range(len(names)), names)
ax.set_ylabel("MQAR accuracy")
ax.set_ylim(0, 1)
ax.legend()
plt.show()
