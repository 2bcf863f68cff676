"""Tests for jaxrec.data.tokenizers: byte tokenizer, tokenizer.json loading."""

import json
import sys

import pytest

from jaxrec.data import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, make_lm_dataset

TEXTS = ["", "plain ascii\n", "héllo wörld → 世界 🙂", "tab\tnul\x00end"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_byte_specials():
  tok = ByteTokenizer()
  specials = {tok.pad_id, tok.bos_id, tok.eos_id}
  assert len(specials) == 3
  assert all(256 <= i < tok.vocab_size for i in specials)
  assert tok.vocab_size == 259
  assert isinstance(tok, Tokenizer)
  ids = [tok.bos_id, *tok.encode("ok é"), tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "ok é"


def test_byte_decode_replaces_invalid_utf8():
  tok = ByteTokenizer()
  cut = tok.encode("é")[:1]  # the first byte of a two-byte character
  assert tok.decode([*tok.encode("a"), *cut, *tok.encode("b")]) == "a\ufffdb"


def test_byte_decode_rejects_out_of_range():
  with pytest.raises(ValueError, match="ids"):
    ByteTokenizer().decode([65, 259])
  with pytest.raises(ValueError, match="ids"):
    ByteTokenizer().decode([-1])


def test_load_byte():
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_missing_file(tmp_path):
  missing = tmp_path / "nope.json"
  with pytest.raises(FileNotFoundError, match=r"nope\.json"):
    load_tokenizer(missing)


def test_load_without_tokenizers_package(tmp_path, monkeypatch):
  path = tmp_path / "tokenizer.json"
  path.write_text("{}")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
  with pytest.raises(ImportError, match="pip install"):
    load_tokenizer(path)


def _train_bpe(path, special_tokens):
  """Trains a tiny byte-level BPE tokenizer and saves it as ``path`` (a tokenizer.json)."""
  hf = pytest.importorskip("tokenizers")
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=special_tokens,
    initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(["def f(x):\n  return x + 1\n", "héllo wörld 世界"] * 10, trainer)
  tok.save(str(path))
  return tok


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return path, _train_bpe(path, ["<pad>", "<s>", "</s>"])


def test_load_tokenizer_json(bpe_file):
  path, raw = bpe_file
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  assert isinstance(tok, Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(
    raw.token_to_id(t) for t in ("<pad>", "<s>", "</s>")
  )
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  text = "def g(y): return 世界 héllo"
  ids = tok.encode(text)
  assert ids == raw.encode(text, add_special_tokens=False).ids
  assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_load_tokenizer_json_named_specials(bpe_file):
  path, raw = bpe_file
  tok = load_tokenizer(path, bos_token="</s>", eos_token="</s>", pad_token="<s>")
  assert tok.bos_id == tok.eos_id == raw.token_to_id("</s>")
  assert tok.pad_id == raw.token_to_id("<s>")
  with pytest.raises(ValueError, match=r"bos_token.*<missing>"):
    load_tokenizer(path, bos_token="<missing>")


def test_load_tokenizer_json_pad_falls_back_to_eos(tmp_path):
  path = tmp_path / "tokenizer.json"
  raw = _train_bpe(path, ["<|endoftext|>"])
  tok = load_tokenizer(path)
  assert tok.bos_id == tok.eos_id == tok.pad_id == raw.token_to_id("<|endoftext|>")


CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2


def _checkpoint(folder, **config_files):
  """A tokenizer.json whose vocabulary starts like SmolLM2's, with the given JSON files beside."""
  raw = _train_bpe(folder / "tokenizer.json", CHAT_SPECIALS)
  for name, content in config_files.items():
    (folder / f"{name}.json").write_text(json.dumps(content))
  return raw


def test_specials_come_from_the_tokenizer_config_beside_the_file(tmp_path):
  # Without the config, <|endoftext|> (id 0) matches the usual bos/eos names; the checkpoint
  # says otherwise, as transformers reads it.
  template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
  raw = _checkpoint(
    tmp_path,
    tokenizer_config={
      "bos_token": "<|im_start|>",
      "eos_token": {"content": "<|im_end|>", "special": True},  # an AddedToken entry
      "pad_token": "<|im_end|>",
      "chat_template": template,
    },
  )
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  want = [raw.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|im_end|>")]
  assert [tok.bos_id, tok.eos_id, tok.pad_id] == want == [1, 2, 2]
  assert tok.unknown_specials == ()
  assert tok.chat_template == template


def test_special_tokens_map_overrides_the_tokenizer_config(tmp_path):
  _checkpoint(
    tmp_path,
    tokenizer_config={"bos_token": "<|im_start|>", "eos_token": "<|im_start|>"},
    special_tokens_map={"eos_token": "<|im_end|>"},
  )
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad: the eos id


def test_specials_the_checkpoint_leaves_out_are_unknown_not_id_0(tmp_path):
  _checkpoint(tmp_path, tokenizer_config={"eos_token": "<|im_end|>", "bos_token": None})
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)
  assert tok.unknown_specials == ("bos",)
  assert "unknown=('bos',)" in repr(tok)
  with pytest.raises(ValueError, match=r"tokenizer: the LM pipeline .* needs the bos token"):
    make_lm_dataset(["some text"], tok, seq_len=8, batch_size=1, seed=0)


def test_a_file_alone_with_no_usual_names_has_unknown_specials(tmp_path):
  raw = _train_bpe(tmp_path / "tokenizer.json", ["<|im_start|>", "<|im_end|>"])
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  assert tok.unknown_specials == ("bos", "eos", "pad")
  text = "héllo 世界"
  assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
  assert tok.decode(tok.encode(text)) == text


def test_a_config_naming_a_token_outside_the_vocabulary_is_refused(tmp_path):
  _checkpoint(tmp_path, tokenizer_config={"bos_token": "<s>"})
  with pytest.raises(ValueError, match=r"bos_token: expected a token of the vocabulary, got '<s>'"):
    load_tokenizer(tmp_path / "tokenizer.json")
