"""Named model sizes, and parameter counts evaluated without allocating parameters."""

from flax import nnx

from jaxrec.models.config import LMConfig
from jaxrec.models.ffn import MoEOptions
from jaxrec.models.lm import LM, param_count_of
from jaxrec.models.mixers import AttentionOptions

_HYBRID = ("gla", "gla", "gla", "attention")

PRESETS: dict[str, LMConfig] = {
  # ~0.7M parameters: the default training job (experiments/configs/default.py), a few minutes on
  # two CPU cores.
  "micro-hybrid": LMConfig(
    vocab_size=256,
    d_model=128,
    num_layers=3,
    mixer_pattern=("gla", "gla", "attention"),
    num_heads=4,
    max_seq_len=512,
  ),
  # ~0.8M parameters: trains on a CPU in seconds.
  "tiny": LMConfig(vocab_size=256, d_model=128, num_layers=4, num_heads=4, max_seq_len=512),
  "tiny-hybrid": LMConfig(
    vocab_size=256, d_model=128, num_layers=4, mixer_pattern=_HYBRID, num_heads=4, max_seq_len=512
  ),
  # ~10M parameters.
  "small": LMConfig(vocab_size=256, d_model=320, num_layers=8, num_heads=5, max_seq_len=1024),
  "small-hybrid": LMConfig(
    vocab_size=256, d_model=320, num_layers=8, mixer_pattern=_HYBRID, num_heads=5, max_seq_len=1024
  ),
  # RAT (arXiv 2507.04416) with L = 16, and its hybrid with sliding-window attention: RAT in even
  # layers, local attention (window 1024 at full scale, 128 here) in odd ones.
  "tiny-rat": LMConfig(
    vocab_size=256, d_model=128, num_layers=4, mixer_pattern=("rat",), num_heads=4, max_seq_len=512
  ),
  "tiny-rat-swa": LMConfig(
    vocab_size=256,
    d_model=128,
    num_layers=4,
    mixer_pattern=("rat", "attention"),
    num_heads=4,
    max_seq_len=512,
    mixer_options={"attention": AttentionOptions(window=128)},
  ),
  # A mixture-of-experts LM with the RMoE GRU router (arXiv 2408.06793): 8 experts, top-2.
  "tiny-moe": LMConfig(
    vocab_size=256,
    d_model=128,
    num_layers=4,
    mixer_pattern=("attention",),
    num_heads=4,
    max_seq_len=512,
    ffn="moe",
    moe=MoEOptions(num_experts=8, top_k=2, router="gru", router_dim=64, hidden=128),
  ),
  # ~1.3B parameters: GLA with one grouped-query attention layer in four, bf16 compute.
  "1b": LMConfig(
    vocab_size=32_768,
    d_model=2048,
    num_layers=24,
    mixer_pattern=_HYBRID,
    num_heads=16,
    num_kv_heads=4,
    max_seq_len=4096,
    dtype="bfloat16",
    scan_layers=True,
    remat=True,
    tie_embeddings=False,
  ),
  # xLSTM 7B (Beck et al. 2025; NX-AI/xLSTM-7b's config.json): 32 mLSTM blocks of width 4096,
  # 8 heads with query/key width 256 and value width 512, SwiGLU of width round_up(2.667 · 4096,
  # 64) = 10944, an untied head and logits soft-capped at 30. Weights: jaxrec.models.xlstm.
  "xlstm_7b": LMConfig(
    vocab_size=50_304,
    d_model=4096,
    num_layers=32,
    mixer_pattern=("mlstm",),
    num_heads=8,
    mlp_ratio=2.667,
    max_seq_len=8192,
    dtype="bfloat16",
    scan_layers=True,
    remat=True,
    tie_embeddings=False,
    logit_soft_cap=30.0,
  ),
  # The same architecture at sizes that train on a CPU: 0.9M and 10.4M parameters.
  "xlstm_tiny": LMConfig(
    vocab_size=256,
    d_model=128,
    num_layers=4,
    mixer_pattern=("mlstm",),
    num_heads=4,
    mlp_ratio=2.667,
    max_seq_len=512,
    tie_embeddings=False,
    logit_soft_cap=30.0,
  ),
  "xlstm_small": LMConfig(
    vocab_size=256,
    d_model=320,
    num_layers=8,
    mixer_pattern=("mlstm",),
    num_heads=4,
    mlp_ratio=2.667,
    max_seq_len=1024,
    tie_embeddings=False,
    logit_soft_cap=30.0,
  ),
}


def get_preset(name: str, **overrides) -> LMConfig:
  """The preset ``name`` with ``overrides`` (``LMConfig.replace``: a field by its name, an option
  group by a mapping of the options to change, ``gla={"chunk_size": 32}``)."""
  if name not in PRESETS:
    raise ValueError(f"name: unknown preset {name!r}; expected one of {tuple(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def param_count(cfg: LMConfig) -> int:
  """Parameters of ``LM(cfg)``, counted on an abstract model (``nnx.eval_shape``): no memory is
  allocated, so this is cheap for any size."""
  return param_count_of(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
