"""Chat templates: the Jinja program of a checkpoint that turns messages into the prompt text.

Rendered as transformers renders them (``transformers.utils.chat_template_utils``), so a prompt
built here tokenizes to the ids the model saw in training: a sandboxed environment (a template
from a checkpoint is untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that keeps non-ASCII characters, the globals
``raise_exception`` and ``strftime_now``, and in the context the messages,
``add_generation_prompt`` and the special tokens by name (``bos_token``, ``eos_token``, ...).
"""

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

_MIN_JINJA = (3, 1, 6)  # earlier releases have known sandbox escapes


def render_chat_template(
  template: str,
  messages: Sequence[Mapping[str, Any]],
  *,
  add_generation_prompt: bool = False,
  **context: Any,
) -> str:
  """The text of ``messages`` under the Jinja chat ``template``.

  Args:
    template: the checkpoint's chat template.
    messages: dicts with at least ``"role"`` and ``"content"``.
    add_generation_prompt: end with the header of an assistant turn, for the model to answer.
    **context: further template variables (``bos_token``, ``eos_token``, ``tools``, ...).

  Raises:
    ImportError: jinja2 (3.1.6 or later) is not installed.
    ValueError: a message is not a mapping with ``role`` and ``content``, or the template does
      not parse or raised (``raise_exception``), with its message.
  """
  try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError(
      'template: rendering a chat template needs jinja2; install it with `pip install "jaxrec[hf]"`'
    ) from e
  version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
  if version < _MIN_JINJA:
    raise ImportError(
      f"template: rendering a chat template needs jinja2>=3.1.6 (a sandbox fix), found "
      f"{jinja2.__version__}; upgrade it with `pip install -U jinja2`"
    )
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
      raise ValueError(
        f"messages[{i}]: expected a mapping with 'role' and 'content', got {message!r}"
      )

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own filter escapes HTML characters, which a prompt must keep.
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template).render(
      messages=[dict(m) for m in messages],
      add_generation_prompt=add_generation_prompt,
      **{"tools": None, "documents": None, **context},
    )
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"template: rendering the chat template failed: {e}") from e


# The end-of-turn markers of the chat templates of common model families (ChatML, Llama 3, Phi,
# Gemma) and the GPT-2 family's end of text.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
  """The ids of the ``END_OF_TURN`` markers that are special tokens of ``tokenizer`` (encoded as
  one id whose text decoding drops): where a chat answer stops."""
  ids = []
  for token in END_OF_TURN:
    encoded = tokenizer.encode(token)
    if len(encoded) == 1 and tokenizer.decode(encoded) == "":
      ids.append(encoded[0])
  return tuple(ids)
