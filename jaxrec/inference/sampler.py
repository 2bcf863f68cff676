"""``Sampler``: generation for a model and its tokenizer, as recurrentgemma's and flax gemma's.

A sampler knows what the functional ``jaxrec.generate`` is told each call: the tokenizer (text in
and out, its ``bos`` prepended, its ``eos`` a stop token), further stop tokens (a chat model's
``<|im_end|>``) and the bucket and prefill-chunk settings; it holds its own compiled programs
(one per bucket and batch size), so a session of prompts of many lengths compiles a handful. ``stream`` yields the text of one prompt as it is decoded.
"""

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from jaxrec.inference import prefill as prefill_lib
from jaxrec.inference.generate import Generation, generate_with, jit_program


class SamplerOutput(NamedTuple):
  """What a ``Sampler`` returns for a batch of prompts.

  Attributes:
    text: the decoded continuation of each prompt (stop token dropped); ``None`` without a
      tokenizer.
    tokens: the generated ids of each prompt, stop token dropped.
    generation: the ``Generation`` itself (padded tokens, lengths with the stop token, logits).
  """

  text: list[str] | None
  tokens: list[list[int]]
  generation: Generation


class Sampler:
  """Generates from ``model`` with ``tokenizer``; greedy unless a ``temperature > 0`` is given.

  Usage::

    sampler = Sampler(model, tokenizer, stop_tokens=[tokenizer.encode("<|im_end|>")[0]])
    out = sampler(["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"], 64)
    print(out.text[0])
    for piece in sampler.stream("Once upon a time", 64, temperature=0.8, top_p=0.95):
      print(piece, end="", flush=True)

  Args:
    model: an ``LM``; for a long-context policy, the model it is applied to
      (``jaxrec.inference.longctx.apply(model, policy)``).
    tokenizer: a ``jaxrec.data`` tokenizer (``encode``, ``decode``, ``bos_id``, ``eos_id``,
      ``pad_id``), or ``None`` to work on ids only.
    stop_tokens: ids that end a continuation besides the tokenizer's ``eos_id``.
    add_bos: prepend the tokenizer's ``bos_id`` (when it has one) to text prompts.
    pad_id: the id of padding; default the tokenizer's ``pad_id``, else its ``eos_id``, else 0.
    buckets, prefill_chunk: as ``jaxrec.generate``'s.
  """

  def __init__(
    self,
    model: nnx.Module,
    tokenizer: Any | None = None,
    *,
    stop_tokens: Sequence[int] = (),
    add_bos: bool = True,
    pad_id: int | None = None,
    buckets: prefill_lib.Buckets = "pow2",
    prefill_chunk: int | None = prefill_lib.DEFAULT_PREFILL_CHUNK,
  ):
    for name in ("encode", "decode"):
      if tokenizer is not None and not callable(getattr(tokenizer, name, None)):
        raise ValueError(
          f"tokenizer: expected None or a tokenizer with {name}(), got {tokenizer!r}"
        )
    prefill_lib.check_buckets(buckets)
    prefill_lib.check_prefill_chunk(prefill_chunk)
    self.model, self.tokenizer = model, tokenizer
    eos = getattr(tokenizer, "eos_id", None)
    self.stop_tokens = tuple(dict.fromkeys(([] if eos is None else [eos]) + list(stop_tokens)))
    self.add_bos = add_bos
    if pad_id is None:
      pad_id = next((i for i in (getattr(tokenizer, "pad_id", None), eos) if i is not None), 0)
    self.pad_id = pad_id
    self.buckets, self.prefill_chunk = buckets, prefill_chunk
    self._program = jit_program()

  def encode(self, prompt: str) -> list[int]:
    """The ids of a text prompt: ``bos`` (with ``add_bos``) and the tokenizer's encoding."""
    if self.tokenizer is None:
      raise ValueError("prompt: text needs a tokenizer; this Sampler has none, pass ids")
    bos = getattr(self.tokenizer, "bos_id", None)
    return ([bos] if self.add_bos and bos is not None else []) + list(self.tokenizer.encode(prompt))

  def __call__(
    self,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_token=None,
    return_logits: bool = False,
  ) -> SamplerOutput:
    """Continues each prompt (text, a list of texts, ids or a list of id lists of any lengths)
    by up to ``max_new_tokens`` tokens; the options are ``jaxrec.generate``'s."""
    ids = self._ids(prompts)
    generation = generate_with(
      self._program,
      self.model,
      ids,
      max_new_tokens,
      stop_tokens=self.stop_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      pad_id=self.pad_id,
      buckets=self.buckets,
      prefill_chunk=self.prefill_chunk,
      on_token=on_token,
      return_logits=return_logits,
    )
    tokens = [self._strip(row) for row in generation.rows()]
    text = None if self.tokenizer is None else [self.tokenizer.decode(t) for t in tokens]
    return SamplerOutput(text, tokens, generation)

  def stream(
    self, prompt: str | Sequence[int], max_new_tokens: int = 256, **options
  ) -> Iterator[str | int]:
    """Yields the continuation of one prompt as it is decoded: pieces of text with a tokenizer
    (a character split across tokens comes whole), ids without; the stop token is not yielded.
    ``options`` are ``__call__``'s. Closing the iterator early ends the generation."""
    if "on_token" in options:
      raise ValueError("on_token: stream() makes its own; call the Sampler to pass one")
    ids = self._ids(prompt)
    if len(ids) != 1:
      raise ValueError(f"prompt: stream() takes one prompt, got {len(ids)}")
    steps: queue.Queue = queue.Queue()
    closed = threading.Event()
    failure = []

    def on_token(tokens, finished):
      steps.put((int(tokens[0]), bool(finished[0])))
      return closed.is_set()

    def run():
      try:
        self(ids, max_new_tokens, on_token=on_token, **options)
      except BaseException as e:  # handed to the consumer below
        failure.append(e)
      finally:
        steps.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    new, shown, step = [], "", ()
    try:
      while (step := steps.get()) is not None:
        token, finished = step
        if finished:  # the stop token
          break
        if self.tokenizer is None:
          yield token
          continue
        new.append(token)
        text = self.tokenizer.decode(new)
        if not text.endswith("\ufffd"):
          yield text[len(shown) :]
          shown = text
      if new and len(text := self.tokenizer.decode(new)) > len(shown):
        yield text[len(shown) :]  # a character the generation cut
    finally:
      closed.set()  # the next step's callback ends the generation
      while step is not None:  # up to the worker's end marker
        step = steps.get()
      worker.join()
    if failure:
      raise failure[0]

  def _ids(self, prompts) -> list[list[int]]:
    if isinstance(prompts, str):
      return [self.encode(prompts)]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
      return [self.encode(p) for p in prompts]
    if isinstance(prompts, np.ndarray):
      return prompts.reshape(-1, prompts.shape[-1]).tolist()
    if (
      isinstance(prompts, Sequence)
      and prompts
      and not isinstance(prompts[0], (Sequence, np.ndarray))
    ):
      return [list(prompts)]
    return [list(p) for p in prompts]

  def _strip(self, row: list[int]) -> list[int]:
    """A row without its final stop token."""
    return row[:-1] if row and row[-1] in self.stop_tokens else row
