"""Tokenizers (byte-level, Hugging Face files, GGUF metadata; chat templates), document corpora
(with an embedded default), grain input pipelines, synthetic recall tasks (``jaxrec.data.tasks``)
and objectives written into the batch."""

from jaxrec.data import tasks
from jaxrec.data.chat_template import END_OF_TURN, end_of_turn_ids, render_chat_template
from jaxrec.data.corpora import (
  DocumentCorpus,
  python_reference_corpus,
  stdlib_corpus,
  text_file_corpus,
)
from jaxrec.data.gguf_tokenizer import tokenizer_from_gguf
from jaxrec.data.objectives import JRTObjective, jrt_objective
from jaxrec.data.pipeline import make_lm_dataset
from jaxrec.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
  "END_OF_TURN",
  "ByteTokenizer",
  "DocumentCorpus",
  "HFTokenizer",
  "JRTObjective",
  "Tokenizer",
  "end_of_turn_ids",
  "jrt_objective",
  "load_tokenizer",
  "make_lm_dataset",
  "python_reference_corpus",
  "render_chat_template",
  "stdlib_corpus",
  "tasks",
  "text_file_corpus",
  "tokenizer_from_gguf",
]
