"""A mixer added in the two places CONTRIBUTING's "Adding a mixer" names, both of them in this
file, trains through the launcher: the launcher's config has its options' flags
(``--config.model.toy.width``), its run record holds them, and the run reads back from there.

Step 1 is the layer, ``TokenShift``; step 2 its options and builder, registered with
``register_mixer`` (in a fixture, so that the registry is as it was for the other tests).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from experiments import _cli
from jaxrec import layers, ops
from jaxrec.models import LM, MIXERS, LMConfig, register_mixer
from jaxrec.train import ConfigError, loop, run_record

STEPS = 3
WIDTH = 12


# Step 1: the layer. Plain constructor arguments and the mixer interface.
class TokenShift(nnx.Module):
  """``y_t = W_o silu(W_c x_t + W_p x_{t-1})``: each token mixed with the one before it (none
  before a document's first); the decoding cache is the last token's ``x``."""

  def __init__(
    self,
    d_model: int,
    width: int,
    *,
    init_std: float = 0.02,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    dense = dict(std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.current = layers.Dense(d_model, width, ("embed", "mlp"), **dense)
    self.previous = layers.Dense(d_model, width, ("embed", "mlp"), **dense)
    self.out = layers.Dense(width, d_model, ("mlp", "embed"), **dense)
    self.d_model = d_model

  def __call__(self, x, *, segment_ids=None, cache=None):
    before = jnp.zeros_like(x[:, :1]) if cache is None else cache[:, None].astype(x.dtype)
    shifted = jnp.concatenate([before, x[:, :-1]], axis=1)
    if segment_ids is not None:
      shifted = jnp.where(ops.segment_starts(segment_ids)[..., None], 0, shifted)
    y = self.out(jax.nn.silu(self.current(x) + self.previous(shifted)))
    return y, (None if cache is None else x[:, -1])

  def init_cache(self, batch_size: int, max_length: int, dtype: jnp.dtype):
    del max_length
    return jnp.zeros((batch_size, self.d_model), dtype)


# Step 2: its options, with their defaults and checks, and its builder, registered.
@dataclasses.dataclass(frozen=True)
class TokenShiftOptions:
  width: int = 8

  def __post_init__(self):
    if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
      raise ValueError(f"width: expected a positive int, got {self.width!r}")


def build_token_shift(cfg: LMConfig, options: TokenShiftOptions, *, rngs) -> TokenShift:
  return TokenShift(
    cfg.d_model,
    options.width,
    init_std=cfg.init_std,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    rngs=rngs,
  )


@pytest.fixture
def toy():
  register_mixer("toy", TokenShift, options=TokenShiftOptions)(build_token_shift)
  try:
    yield
  finally:
    del MIXERS["toy"]


def _launcher_config(*args: str):
  """The config and the given fields as ``python -m experiments.train`` parses its command line
  (``experiments/_cli.py``: the default config file, locked, each field a flag)."""
  argv = ["train", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    "config", _cli.DEFAULT_CONFIG, "config", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return holder.value, set(config_flags.get_override_values(values["config"]))


TINY = (
  "--config.model.mixer_pattern=toy,attention",
  "--config.model.d_model=32",
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.data.seq_len=32",
  "--config.batch_size=4",
  "--config.mesh.data=1",
  f"--config.steps={STEPS}",
  "--config.optim.warmup_steps=1",
  "--config.eval_every=0",
  "--config.eval_batches=1",
  "--config.sample.max_new_tokens=4",
  "--config.progress=False",
)


def test_a_mixer_registered_from_a_test_file_trains_through_the_launcher(toy, tmp_path):
  config, given = _launcher_config(*TINY, f"--config.model.toy.width={WIDTH}")
  assert "model.toy.width" in given and config.model.toy.width == WIDTH
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir, given)
  assert result["step"] == STEPS and np.isfinite(result["loss"])
  assert len(result["sample"]) > 0  # decoded with its cache

  with open(os.path.join(workdir, run_record.RECORD_FILE), encoding="utf-8") as f:
    record = json.load(f)
  assert record["model"]["toy"] == {"width": WIDTH}
  assert record["config"]["model"]["toy"]["width"] == WIDTH

  # Sampling reads the model, its option included, from the record alone.
  sample_config, given = _launcher_config("--config.sample.max_new_tokens=4")
  model, _, _ = loop.restore_model(sample_config, workdir, given)
  assert model.cfg.options("toy") == TokenShiftOptions(width=WIDTH)
  mixer = model.layers[0].mixer
  assert isinstance(mixer, TokenShift) and mixer.current.kernel.shape == (32, WIDTH)
  # Trained: the layer's parameters moved from those the run started from (its seed's).
  initial = LM(model.cfg, rngs=nnx.Rngs(config.seed)).layers[0].mixer
  for name in ("current", "previous", "out"):
    start, trained = getattr(initial, name).kernel[...], getattr(mixer, name).kernel[...]
    assert start.shape == trained.shape and not np.allclose(start, trained), name


def test_a_bad_option_names_its_flag(toy, tmp_path):
  config, given = _launcher_config(*TINY, "--config.model.toy.width=0")
  with pytest.raises(ConfigError, match=r"^--config\.model\.toy\.width: toy\.width: expected a "):
    loop.train_and_evaluate(config, str(tmp_path / "run"), given)
  assert not (tmp_path / "run").exists()
