r"""Generation sessions and long-prompt scoring: what bucketing and chunked prefill buy.

``--part=session``: 20 prompts of 20 lengths, one ``jaxrec.generate`` call each, on a preset
model, with the prompt lengths bucketed (powers of two, the default) and not (``buckets=None``:
one program per length). Per prompt, the time to the first token (the callback of the first
decoded step, compilation included) and the decoding speed after it; the session's wall time and
compilations, cold (a fresh program cache) and warm (the same session again).

``--part=score``: peak resident memory and time of ``loglikelihood`` over one sequence of each
length, in one call and in chunks of ``--chunk`` tokens through the cache; each measurement runs
in its own process (peak RSS only grows), next to the RSS of the same process before scoring.
The model is a random attention model of SmolLM2's vocabulary scored on random ids, or with
``--model`` a real one (``jaxrec.models.load_model``: a name, GGUF file or Hugging Face
directory) scored on the Python language reference's text.

  python -m experiments.bench_generate --part=session
  python -m experiments.bench_generate --part=score --lengths=2048,4096,8192,16384
  python -m experiments.bench_generate --part=score --model=smollm2-135m \\
      --lengths=4096,8192,16384 --one_call_max=4096
"""

import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import jaxrec
from experiments import _bench
from jaxrec import data as data_lib
from jaxrec.inference import loglikelihood
from jaxrec.models import LM, LMConfig, get_preset, load_model, param_count_of

_PART = flags.DEFINE_enum("part", "session", ["session", "score", "score_one"], "What to run.")
_PRESET = flags.DEFINE_string("preset", "tiny-hybrid", "Session: the model preset.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Session: tokens generated per prompt.")
_MIN_LEN = flags.DEFINE_integer("min_length", 8, "Session: the shortest prompt.")
_MAX_LEN = flags.DEFINE_integer("max_length", 200, "Session: the longest prompt.")
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192"], "Score: sequence lengths.")
_CHUNK = flags.DEFINE_integer("chunk", 2048, "Score: the prefill chunk.")
_ONE_CALL_MAX = flags.DEFINE_integer(
  "one_call_max", 8192, "Score: the longest sequence also scored in one call (memory grows as T²)."
)
_VOCAB = flags.DEFINE_integer("vocab_size", 49152, "Score: the model's vocabulary.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Score: the model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Score: the number of attention layers.")
_LENGTH = flags.DEFINE_integer("length", 0, "score_one: the sequence length.")
_CHUNKED = flags.DEFINE_bool("chunked", False, "score_one: score in chunks.")
_MODEL = flags.DEFINE_string(
  "model", "", "Score: a real model (name, GGUF file or HF directory); empty: a random one."
)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _session(model, prompts, buckets) -> dict:
  """Generates for each prompt in turn; times the first token and the decoding after it."""
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if event == _COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  first, rates = [], []
  start = time.perf_counter()
  try:
    for prompt in prompts:
      stamps = []
      t0 = time.perf_counter()
      jaxrec.generate(
        model,
        prompt,
        _NEW.value,
        buckets=buckets,
        on_token=lambda tokens, done, stamps=stamps: stamps.append(time.perf_counter()),
      )
      first.append(stamps[0] - t0)
      rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return dict(
    wall_s=time.perf_counter() - start,
    compiles=len(compiles),
    ttft_median_s=statistics.median(first),
    ttft_max_s=max(first),
    decode_tokens_per_s=statistics.median(rates),
  )


def _run_sessions():
  cfg = get_preset(_PRESET.value, vocab_size=259)
  model = LM(cfg, rngs=nnx.Rngs(0))
  print(f"model {_PRESET.value}: {param_count_of(model):,} parameters, {cfg}")
  rng = np.random.default_rng(0)
  lengths = np.linspace(_MIN_LEN.value, _MAX_LEN.value, 20).astype(int).tolist()
  rng.shuffle(lengths)
  prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
  print(f"20 prompts, lengths {sorted(lengths)}, {_NEW.value} new tokens each (greedy), B=1")
  rows = []
  for name, buckets in (("one program per length", None), ("bucketed (powers of two)", "pow2")):
    jax.clear_caches()
    for state in ("cold", "warm"):
      rows.append(dict(mode=name, cache=state, **_session(model, prompts, buckets)))
  print("\n| mode | programs | session s | first token, median s | max s | decode tokens/s |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(
      f"| {r['mode']}, {r['cache']} | {r['compiles']} | {r['wall_s']:.1f} | "
      f"{r['ttft_median_s']:.3f} | {r['ttft_max_s']:.2f} | {r['decode_tokens_per_s']:.0f} |"
    )


def _score_config() -> LMConfig:
  return LMConfig(
    vocab_size=_VOCAB.value,
    d_model=_D_MODEL.value,
    num_layers=_LAYERS.value,
    num_heads=4,
    mixer_pattern=("attention",),
    max_seq_len=max(int(n) for n in _LENGTHS.value),
  )


def _score_model():
  """The scored model and ``length + 1`` ids for it: a random model on random ids, or the real
  ``--model`` on the Python reference's text."""
  if not _MODEL.value:
    model = LM(_score_config(), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, _VOCAB.value, (1, _LENGTH.value + 1))
    return model, tokens.astype(np.int32)
  model, tokenizer = load_model(_MODEL.value)
  text = "\n".join(data_lib.python_reference_corpus("train"))
  ids = tokenizer.encode(text[: 8 * (_LENGTH.value + 1)])
  if len(ids) < _LENGTH.value + 1:
    raise ValueError(f"--lengths: {_LENGTH.value} is longer than the text's {len(ids)} tokens")
  return model, np.asarray([ids[: _LENGTH.value + 1]], np.int32)


def _score_one():
  """One measurement, in this process: prints JSON."""
  model, tokens = _score_model()
  chunk = _CHUNK.value if _CHUNKED.value else None
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  logp = jax.block_until_ready(loglikelihood(model, tokens, prefill_chunk=chunk))
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(
    json.dumps(
      dict(
        seconds=seconds,  # compilation included: one call per process
        rss_before_mb=before / 1024,
        rss_peak_mb=peak / 1024,
        mean_logp=float(np.mean(logp)),
      )
    )
  )


def _run_scores():
  if _MODEL.value:
    print(f"model: {_MODEL.value}, fp32, on the Python reference's text")
  else:
    cfg = _score_config()
    print(f"model: {param_count_of(LM(cfg, rngs=nnx.Rngs(0))):,} parameters, {cfg}")
  print(f"loglikelihood of one sequence, B=1; chunks of {_CHUNK.value}; one process per row")
  print("\n| T | method | s (with compile) | RSS before MB | peak RSS MB | mean log p |")
  print("|---:|---|---:|---:|---:|---:|")
  for length in _LENGTHS.value:
    for chunked in (False, True) if int(length) <= _ONE_CALL_MAX.value else (True,):
      args = [sys.executable, "-m", "experiments.bench_generate", "--part=score_one"]
      args += [f"--length={length}", f"--chunked={chunked}", f"--chunk={_CHUNK.value}"]
      args += [f"--lengths={','.join(_LENGTHS.value)}", f"--vocab_size={_VOCAB.value}"]
      args += [f"--d_model={_D_MODEL.value}", f"--num_layers={_LAYERS.value}"]
      args += [f"--model={_MODEL.value}"]
      done = subprocess.run(args, capture_output=True, text=True, check=True)
      r = json.loads(done.stdout.strip().splitlines()[-1])
      method = f"chunks of {_CHUNK.value}" if chunked else "one call"
      print(
        f"| {length} | {method} | {r['seconds']:.1f} | {r['rss_before_mb']:.0f} | "
        f"{r['rss_peak_mb']:.0f} | {r['mean_logp']:.4f} |",
        flush=True,
      )


def main(argv):
  del argv
  if _PART.value != "score_one":
    print(f"machine: {_bench.machine()}")
  {"session": _run_sessions, "score": _run_scores, "score_one": _score_one}[_PART.value]()


if __name__ == "__main__":
  app.run(main)
