r"""A real model on this machine: SmolLM2-135M-Instruct's prefill and greedy decoding through
``jaxrec.generate`` in fp32 and bf16, side by side with transformers (fp32, where torch and
transformers are installed) and llama.cpp (``llama-cpp-python``, where installed) on the same GGUF
file, each decode speed against its memory bound.

Every side runs its own generation API on the same random prompt ids, greedy, one sequence:

* prefill of ``P`` tokens: the wall time of generating one token from a ``P``-token prompt
  (``jaxrec.generate(..., 1)``, ``model.generate(max_new_tokens=1)``, ``Llama.generate`` to its
  first token), after a call that compiles and warms up;
* decoding at context ``C``: ``--repeats`` x ``--steps`` tokens generated in one call after a
  prompt of ``C - repeats·steps`` tokens, so that the cache ends at ``C``, after a warm-up call of
  the same shapes; each run of ``steps`` tokens is one sample of the time per token, from the
  times at which each side streams them (``on_token``, a transformers streamer, the generator).
  One prefill per row keeps the 8192-token rows affordable; their samples span contexts
  ``C - repeats·steps .. C``.

jaxrec compiles each prompt length exactly (``buckets=None``) and prefills in its default chunks of
2048 tokens; transformers runs its default (``DynamicCache``, SDPA attention); llama.cpp its
defaults (F16 KV cache, batches of 512) on ``--threads`` threads, as torch. The memory bound of a
decoded token is the bytes it must read: every weight once (the tied embedding is the head) in
the side's dtype or quantization, and the keys and values of ``C`` tokens in its KV-cache dtype,
over the memory bandwidth of a large copy measured in the same run (read and written bytes per
second, the best of 1 and ``--threads`` threads).

  python -m experiments.bench_real
  python -m experiments.bench_real --prefill=512 --contexts=512,2048 --repeats=3 \
      --sides=jaxrec-fp32,llama.cpp
"""

import json
import os
import statistics
import threading
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import jaxrec
from experiments import _bench
from jaxrec import models

SIDES = ("jaxrec-fp32", "jaxrec-bf16", "transformers-fp32", "llama.cpp")
_MODEL = flags.DEFINE_string(
  "model",
  "smollm2-135m",
  "A named model, a GGUF file, or a Hugging Face directory (transformers and jaxrec only).",
)
_SIDES = flags.DEFINE_list("sides", list(SIDES), f"What to run, of {', '.join(SIDES)}.")
_PREFILL = flags.DEFINE_list("prefill", ["512", "2048"], "Prompt lengths of the prefill rows.")
_CONTEXTS = flags.DEFINE_list("contexts", ["512", "2048", "8192"], "Contexts of the decode rows.")
_STEPS = flags.DEFINE_integer("steps", 32, "Decoded tokens per timed sample.")
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Samples per row (median and range): prefill calls, decode runs of --steps tokens."
)
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "torch's and llama.cpp's threads.")
_BANDWIDTH_MIB = flags.DEFINE_integer("bandwidth_mib", 512, "Size of the copied array (MiB).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


# ----------------------------------------------------------------------------------------------
# The sides: load, then ``prefill(ids)`` and ``decode(ids, steps) -> (token times, tokens)``.


class _Jaxrec:
  def __init__(self, spec: str, dtype: str):
    self.name = f"jaxrec-{'fp32' if dtype == 'float32' else 'bf16'}"
    if spec in models.NAMED_MODELS:
      self.model, _ = models.load_named(spec, dtype=dtype)
    elif spec.endswith(".gguf"):
      self.model, _ = models.load_gguf(spec, dtype=dtype)
    else:
      self.model = models.load_pretrained(spec, dtype=dtype)
    cfg = self.model.cfg
    params = jax.tree.leaves(nnx.state(self.model, nnx.Param))
    self.weight_bytes = sum(p.size * p.dtype.itemsize for p in params)
    itemsize = np.dtype(cfg.compute_dtype).itemsize
    self.kv_bytes_per_token = 2 * cfg.num_layers * cfg.kv_heads * cfg.attn_head_dim * itemsize
    self.note = f"weights {dtype}, KV cache {dtype}"

  def prefill(self, ids):
    jaxrec.generate(self.model, [ids], 1, buckets=None)

  def decode(self, ids, steps):
    stamps = []
    out = jaxrec.generate(
      self.model,
      [ids],
      steps,
      buckets=None,
      on_token=lambda tokens, done: stamps.append(time.perf_counter()),
    )
    return stamps, out.tokens[0].tolist()


class _Transformers:
  name = "transformers-fp32"

  def __init__(self, spec: str, threads: int):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    self.torch = torch
    if spec in models.NAMED_MODELS or spec.endswith(".gguf"):
      path = models.named_model_path(spec) if spec in models.NAMED_MODELS else spec
      folder, kw = os.path.dirname(path), dict(gguf_file=os.path.basename(path))
    else:
      folder, kw = spec, {}
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, **kw
    ).eval()
    cfg = self.model.config
    self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads
    self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4
    self.note = (
      f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads, "
      f"{cfg._attn_implementation} attention, DynamicCache fp32"
    )

  def _generate(self, ids, steps, streamer=None):
    torch = self.torch
    tokens = torch.tensor([ids])
    with torch.inference_mode():
      return self.model.generate(
        tokens,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        streamer=streamer,
        pad_token_id=0,
      )

  def prefill(self, ids):
    self._generate(ids, 1)

  def decode(self, ids, steps):
    stamps = []

    class Stamps:  # transformers' streamer protocol: the prompt, then each new token
      def put(self, value):
        stamps.append(time.perf_counter())

      def end(self):
        pass

    out = self._generate(ids, steps, Stamps())
    return stamps[1:], out[0, len(ids) :].tolist()


class _LlamaCpp:
  name = "llama.cpp"

  def __init__(self, spec: str, threads: int, n_ctx: int):
    import llama_cpp

    if spec in models.NAMED_MODELS:
      path = str(models.named_model_path(spec))
    elif spec.endswith(".gguf"):
      path = spec
    else:
      raise ValueError(f"--model: llama.cpp reads GGUF files, not the directory {spec}")
    self.llm = llama_cpp.Llama(
      model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    import gguf

    reader = gguf.GGUFReader(path)
    self.weight_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    arch = reader.fields["general.architecture"].contents()
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}
    heads = meta[f"{arch}.attention.head_count"]
    head_dim = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // heads)
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    self.kv_bytes_per_token = 2 * meta[f"{arch}.block_count"] * kv_heads * head_dim * 2
    qtypes = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) > 1})
    self.note = (
      f"llama-cpp-python {llama_cpp.__version__}, {threads} threads, weights "
      f"{'/'.join(qtypes)} as stored, KV cache F16, batches of {self.llm.n_batch}"
    )

  def _tokens(self, ids, steps):
    self.llm.reset()  # no reuse of the previous call's cache
    stamps, tokens = [], []
    for token in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
      stamps.append(time.perf_counter())
      tokens.append(int(token))
      if len(tokens) == steps:
        break
    return stamps, tokens

  def prefill(self, ids):
    self._tokens(ids, 1)

  def decode(self, ids, steps):
    return self._tokens(ids, steps)


# ----------------------------------------------------------------------------------------------
# Measurements.


def copy_bandwidth(mib: int, threads: int, repeats: int = 5) -> tuple[float, int]:
  """Bytes per second read and written by copying a ``mib``-MiB array (numpy releases the GIL
  while it copies): ``(best of 1 and threads threads, its thread count)``."""
  src = np.ones(mib * 2**20 // 8)
  dst = np.empty_like(src)
  best = (0.0, 1)
  for n in sorted({1, threads}):
    parts = np.array_split(np.arange(src.size), n)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
      np.copyto(dst[lo:hi], src[lo:hi])

    times = []
    for _ in range(repeats + 1):
      workers = [threading.Thread(target=copy, args=b) for b in bounds]
      start = time.perf_counter()
      for w in workers:
        w.start()
      for w in workers:
        w.join()
      times.append(time.perf_counter() - start)
    rate = 2 * src.nbytes / statistics.median(times[1:])
    best = max(best, (rate, n))
  return best


def _time_prefill(side, ids, repeats) -> list[float]:
  side.prefill(ids)  # compiles and warms up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    side.prefill(ids)
    times.append(time.perf_counter() - start)
  return times


def _time_decode(side, ids, steps, repeats) -> tuple[list[float], list[int]]:
  """Seconds per token of each run of ``steps`` streamed tokens of one call (the last run has one
  interval less), after a warm-up call; and the call's tokens."""
  total = steps * repeats
  side.decode(ids, total)
  stamps, tokens = side.decode(ids, total)
  if len(stamps) != total:
    raise RuntimeError(f"{side.name}: streamed {len(stamps)} tokens, expected {total}")
  per_token = []
  for start in range(0, total, steps):
    end = min(start + steps, total - 1)
    per_token.append((stamps[end] - stamps[start]) / (end - start))
  return per_token, tokens


def _load(name: str, spec: str, n_ctx: int):
  """The side, or the reason it is skipped (a peer library that is not installed)."""
  if name.startswith("jaxrec-"):
    return _Jaxrec(spec, "float32" if name == "jaxrec-fp32" else "bfloat16")
  try:
    if name == "transformers-fp32":
      return _Transformers(spec, _THREADS.value)
    return _LlamaCpp(spec, _THREADS.value, n_ctx)
  except ImportError as e:
    return f"not installed ({e})"


def _row(kind, side, shape, seconds, tokens):
  median = statistics.median(seconds)
  return dict(
    kind=kind,
    method=side.name,
    shape=shape,
    ms=median * 1e3,
    ms_min=min(seconds) * 1e3,
    ms_max=max(seconds) * 1e3,
    tokens_per_s=tokens / median,
  )


def main(argv):
  del argv
  unknown = [s for s in _SIDES.value if s not in SIDES]
  if unknown:
    raise app.UsageError(f"--sides: expected names among {', '.join(SIDES)}, got {unknown}")
  prefills = [int(p) for p in _PREFILL.value]
  contexts = [int(c) for c in _CONTEXTS.value]
  steps, repeats = _STEPS.value, _REPEATS.value
  if steps < 2 or repeats < 1 or any(c <= steps * repeats for c in contexts):
    raise app.UsageError(
      f"--steps, --repeats: expected steps >= 2, repeats >= 1 and steps · repeats below every "
      f"context, got {steps} and {repeats}"
    )
  print(f"machine: {_bench.machine()}")
  load_before = os.getloadavg()
  bandwidth, bandwidth_threads = copy_bandwidth(_BANDWIDTH_MIB.value, _THREADS.value)
  print(
    f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (a {_BANDWIDTH_MIB.value} MiB numpy copy, "
    f"read + written bytes, {bandwidth_threads} thread(s))"
  )
  vocab = None
  rng = np.random.default_rng(0)
  n_ctx = max(contexts + prefills)
  rows, first_tokens, notes = [], {}, {}
  order = sorted(_SIDES.value, key=SIDES.index)
  # transformers first, where it runs: the reference of the ratio column.
  order.sort(key=lambda s: s != "transformers-fp32")
  for name in order:
    start = time.perf_counter()
    side = _load(name, _MODEL.value, n_ctx)
    if isinstance(side, str):
      print(f"{name} skipped: {side}")
      continue
    print(f"{name}: loaded in {time.perf_counter() - start:.1f} s; {side.note}")
    notes[name] = side.note
    if vocab is None:
      vocab = _vocab_size(side)
      prompts = {n: rng.integers(3, vocab, n).tolist() for n in sorted({*prefills, *contexts})}
    for p in prefills:
      seconds = _time_prefill(side, prompts[p], repeats)
      rows.append(_row("prefill", side, f"P={p}", seconds, p))
    for c in contexts:
      prompt = prompts[c][: c - steps * repeats]
      per_token, tokens = _time_decode(side, prompt, steps, repeats)
      row = _row("decode", side, f"C={c}", per_token, 1)
      read = side.weight_bytes + side.kv_bytes_per_token * c
      row |= dict(bytes_per_token=read, bound_tokens_per_s=bandwidth / read)
      row["of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
      first_tokens.setdefault(c, tokens)
      row["same_tokens"] = _agreeing_prefix(tokens, first_tokens[c])
      rows.append(row)
    del side
  load_after = os.getloadavg()
  ref_name = rows[0]["method"] if rows else "–"
  reference = {(r["kind"], r["shape"]): r["tokens_per_s"] for r in rows if r["method"] == ref_name}
  for r in rows:
    r["ratio"] = r["tokens_per_s"] / reference[r["kind"], r["shape"]]
  print(
    f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after; ratio: tokens/s "
    f"over {ref_name}'s at the same shape\n\nPrefill: median of {repeats} calls after a warm-up "
    "call, range in brackets."
  )
  print("\n| method | shape | ms (range) | tokens/s | ratio |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    if r["kind"] == "prefill":
      print(f"| {r['method']} | {r['shape']} | {_ms(r)} | {r['tokens_per_s']:,.0f} | {_ratio(r)} |")
  print(
    f"\nDecode: ms per token, median (range) of {repeats} runs of {steps} greedy tokens in one "
    f"call after a prompt of C - {steps * repeats} (and a warm-up call). Bound: bandwidth / bytes "
    "per token (weights + KV cache of C tokens); same tokens: greedy tokens equal to "
    f"{ref_name}'s, of {steps * repeats}."
  )
  print(
    "\n| method | shape | ms/token (range) | tokens/s | ratio | MB/token | bound tokens/s "
    "| × bound | same tokens |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    if r["kind"] == "decode":
      print(
        f"| {r['method']} | {r['shape']} | {_ms(r)} | {r['tokens_per_s']:,.1f} | {_ratio(r)} | "
        f"{_figure(r['bytes_per_token'] / 1e6)} | {r['bound_tokens_per_s']:,.1f} | "
        f"{r['of_bound']:.2g} | {r['same_tokens']} |"
      )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      record = dict(bandwidth=bandwidth, load=[load_before, load_after], notes=notes, rows=rows)
      json.dump(record, f, indent=1)


def _vocab_size(side) -> int:
  if isinstance(side, _Jaxrec):
    return side.model.cfg.vocab_size
  if isinstance(side, _Transformers):
    return side.model.config.vocab_size
  return side.llm.n_vocab()


def _agreeing_prefix(a, b) -> int:
  """How many tokens ``a`` and ``b`` share before they first differ."""
  return next(
    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
  )


def _ms(r) -> str:
  return f"{r['ms']:,.1f} ({r['ms_min']:,.1f}–{r['ms_max']:,.1f})"


def _figure(x: float) -> str:
  """Three significant digits, without an exponent in the range this table sees."""
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(r) -> str:
  return f"{r['ratio']:.2f}"


if __name__ == "__main__":
  app.run(main)
