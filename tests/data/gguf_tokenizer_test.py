"""The tokenizer of a GGUF file's metadata against the ``tokenizers`` BPE it was written from,
and chat templates rendered as transformers renders them."""

import pytest
from testing_utils import CHAT_SPECIALS, CHATML_TEMPLATE, train_chat_bpe

from jaxrec.data import HFTokenizer, load_tokenizer, render_chat_template, tokenizer_from_gguf

pytest.importorskip("jinja2")

TEXTS = (
  "",
  " ",
  "The 3 cats ate 12 fish.",
  "a  1 b\n\n2 c   33\t4 5\n",  # whitespace runs before digits: the digits split comes first
  "   12   345    6789 ½ ²",
  "Héllo wörld → 世界 🙂 naïve",
  "def add(a, b):\n    return a + b\n\n\tx = [1, 2, 3]",
  "<|im_start|>user\nWhat is 7 + 35?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
  "<|endoftext|>tail<|im_end|><|im_start|>",
)


@pytest.mark.parametrize("digits", [True, False], ids=["smollm", "gpt2"])
def test_encode_and_decode_equal_the_bpe_the_metadata_came_from(digits):
  reference, metadata = train_chat_bpe(digits=digits)
  tok = tokenizer_from_gguf(metadata)
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == reference.get_vocab_size()
  for text in TEXTS:
    ids = reference.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == ids, text
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
  # Chat markup: each control token is one id, and decode skips it.
  for i, special in enumerate(CHAT_SPECIALS):
    assert tok.encode(special) == [i]
  assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]
  assert tok.decode(tok.encode(TEXTS[7])) == "user\nWhat is 7 + 35?\nassistant\n42"


def test_pre_tokenizer_follows_tokenizer_ggml_pre():
  """ "smollm" (SmolLM2's Digits-then-ByteLevel) keeps every digit a token of its own, apart from
  the space before it; "gpt2" lets a space and digits merge, as its merges were learned."""
  smollm = tokenizer_from_gguf(train_chat_bpe(digits=True)[1])
  gpt2 = tokenizer_from_gguf(train_chat_bpe(digits=False)[1])

  def pieces(tok, text):
    return [tok.decode([i]) for i in tok.encode(text)]

  assert pieces(smollm, " 42") == [" ", "4", "2"]
  assert pieces(smollm, "a   12")[-2:] == ["1", "2"]
  assert pieces(gpt2, " 42") == [" ", "42"]
  assert pieces(gpt2, "a   12")[-2:] == [" 1", "2"]


def test_special_ids_and_chat_template_come_from_the_metadata():
  _, metadata = train_chat_bpe()
  tok = tokenizer_from_gguf(metadata)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
  assert tok.special_tokens == {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
  }
  without_pad = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.padding_token_id"}
  assert tokenizer_from_gguf(without_pad).pad_id == 2  # falls back to eos
  assert tok.chat_template == CHATML_TEMPLATE


def test_save_then_load_tokenizer_round_trips(tmp_path):
  tok = tokenizer_from_gguf(train_chat_bpe()[1])
  assert tok.save(tmp_path, model_max_length=128) == ["tokenizer.json", "tokenizer_config.json"]
  again = load_tokenizer(tmp_path / "tokenizer.json")
  assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id) == (1, 2, 2, 0)
  assert again.chat_template == tok.chat_template and again.vocab_size == tok.vocab_size
  for text in TEXTS:
    assert again.encode(text) == tok.encode(text), text
    assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
  # transformers 5 writes the template beside the config; that file wins, as there.
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert load_tokenizer(tmp_path / "tokenizer.json").chat_template.startswith("{{ messages[0]")


@pytest.mark.parametrize(
  ("key", "value", "match"),
  [
    ("tokenizer.ggml.model", "llama", r"tokenizer\.ggml\.model: expected 'gpt2'"),
    ("tokenizer.ggml.pre", "made-up", r"tokenizer\.ggml\.pre: expected one of"),
    ("tokenizer.ggml.merges", [], r"tokenizer\.ggml\.merges: expected a non-empty list"),
    ("tokenizer.ggml.token_type", [1, 3], r"tokenizer\.ggml\.token_type: expected 300 types"),
    ("tokenizer.ggml.eos_token_id", 300, r"tokenizer\.ggml\.eos_token_id: expected an id in"),
  ],
)
def test_metadata_errors_name_the_key(key, value, match):
  _, metadata = train_chat_bpe()
  with pytest.raises(ValueError, match=match):
    tokenizer_from_gguf(metadata | {key: value})


MESSAGES = [
  {"role": "user", "content": "What is 7 + 35?"},
  {"role": "assistant", "content": "42"},
  {"role": "user", "content": "Thanks"},
]


def test_chatml_template_renders_as_transformers_does():
  """The expected strings are what transformers' ``apply_chat_template`` returns for
  SmolLM2-135M-Instruct's template (checked by hand)."""
  tok = tokenizer_from_gguf(train_chat_bpe()[1])
  system = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
  )
  turns = (
    "<|im_start|>user\nWhat is 7 + 35?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n"
  )
  assert tok.apply_chat_template(MESSAGES) == system + turns + "<|im_start|>assistant\n"
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == system + turns
  own = [{"role": "system", "content": "Be brief."}, MESSAGES[0]]
  assert tok.apply_chat_template(own).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  prompt = tok.encode(tok.apply_chat_template(MESSAGES[:1]))
  header = [tok.encode("<|im_start|>")[0], *tok.encode("assistant\n")]
  assert prompt[0] == tok.bos_id and prompt[-len(header) :] == header


def test_template_environment_matches_transformers():
  template = (
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m['role'] == 'bad' %}{{ raise_exception('no ' + m['role']) }}{% endif %}\n"
    "  {{ m | tojson }}{% if loop.index == 1 %}{% continue %}{% endif %}|\n"
    "{% endfor %}{{ eos_token }}"
  )
  got = render_chat_template(
    template, [{"role": "user", "content": "é<b>"}] * 2, bos_token="<s>", eos_token="</s>"
  )
  # As transformers renders it: trim_blocks drops the newline after a block tag and
  # lstrip_blocks the indentation before one (not before an expression); tojson keeps non-ASCII
  # and HTML characters; loopcontrols gives `continue`.
  row = '  {"role": "user", "content": "é<b>"}'
  assert got == f"<s>{row}{row}|\n</s>"
  with pytest.raises(ValueError, match=r"template: .*no bad"):
    render_chat_template(template, [{"role": "bad", "content": ""}])
  with pytest.raises(ValueError, match=r"messages\[0\]: expected a mapping with 'role'"):
    render_chat_template(template, [{"content": "x"}])
  bare = tokenizer_from_gguf(
    {k: v for k, v in train_chat_bpe()[1].items() if k != "tokenizer.chat_template"}
  )
  with pytest.raises(ValueError, match="has no chat template"):
    bare.apply_chat_template(MESSAGES)
  # The sandbox refuses what a template from a checkpoint must not reach.
  with pytest.raises(ValueError, match=r"access to attribute '__class__' .* is unsafe"):
    render_chat_template("{{ messages.__class__.__mro__ }}", [])
