"""Tokenizers, document corpora (with an embedded default) and grain input pipelines."""

from jaxrec.data.corpora import DocumentCorpus, stdlib_corpus, text_file_corpus
from jaxrec.data.pipeline import make_lm_dataset
from jaxrec.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
  "ByteTokenizer",
  "DocumentCorpus",
  "HFTokenizer",
  "Tokenizer",
  "load_tokenizer",
  "make_lm_dataset",
  "stdlib_corpus",
  "text_file_corpus",
]
