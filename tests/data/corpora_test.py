"""Tests for jaxrec.data.corpora: the standard-library corpus and local text/jsonl files."""

import hashlib
import json
import os
import pickle
import sysconfig

import pytest

from jaxrec.data import DocumentCorpus, python_reference_corpus, stdlib_corpus, text_file_corpus

STDLIB = sysconfig.get_paths()["stdlib"]
EXCLUDED = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}


def _rel_parts(path):
  return os.path.relpath(path, STDLIB).split(os.sep)


def test_stdlib_deterministic_sorted_and_filtered():
  first, second = stdlib_corpus(), stdlib_corpus()
  assert first.paths == second.paths
  rel = [os.path.relpath(p, STDLIB) for p in first.paths]
  assert rel == sorted(rel)
  assert len(first) > 100
  for path in first.paths:
    assert path.endswith(".py")
    assert not EXCLUDED & set(_rel_parts(path)[:-1]), path
  val = [os.path.relpath(p, STDLIB) for p in stdlib_corpus("validation").paths]
  assert os.path.join("json", "decoder.py") in rel + val


def test_stdlib_train_validation_disjoint_and_complete():
  train, val = stdlib_corpus("train"), stdlib_corpus("validation")
  assert 0 < len(val) < 0.05 * len(train)
  assert not set(train.paths) & set(val.paths)
  everything = stdlib_corpus("train", validation_fraction=0.0)
  assert sorted(train.paths + val.paths) == sorted(everything.paths)


def test_stdlib_documents_are_file_contents():
  corpus = stdlib_corpus(max_files=3)
  assert len(corpus) == 3
  for i, path in enumerate(corpus.paths):
    with open(path, encoding="utf-8") as f:
      assert corpus[i] == f.read()
  assert corpus[-1] == corpus[2]
  assert corpus[0:2] == [corpus[0], corpus[1]]
  with pytest.raises(IndexError, match="index"):
    corpus[3]


def test_stdlib_max_bytes():
  corpus = stdlib_corpus(max_bytes=20_000)
  sizes = [os.path.getsize(p) for p in corpus.paths]
  assert sum(sizes[:-1]) < 20_000 <= sum(sizes) or len(corpus) == len(stdlib_corpus())
  assert corpus.paths == stdlib_corpus().paths[: len(corpus)]


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"split": "test"}, "split"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"max_files": 0}, "max_files"),
    ({"max_bytes": -1}, "max_bytes"),
    ({"root": "/does/not/exist"}, "root"),
  ],
)
def test_stdlib_bad_arguments(kwargs, name):
  with pytest.raises((ValueError, FileNotFoundError), match=name):
    stdlib_corpus(**kwargs)


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_text_and_jsonl_files(tmp_path):
  _write(tmp_path / "b.txt", "second file\n\nwith a blank line")
  _write(tmp_path / "a.txt", "first file é")
  _write(
    tmp_path / "c.jsonl",
    json.dumps({"text": "doc one", "id": 1}) + "\n\n" + json.dumps({"text": "doc 二"}) + "\n",
  )
  corpus = text_file_corpus(str(tmp_path / "*"))
  assert isinstance(corpus, DocumentCorpus)
  assert list(corpus) == [
    "first file é",
    "second file\n\nwith a blank line",
    "doc one",
    "doc 二",
  ]
  single = text_file_corpus(tmp_path / "c.jsonl")
  assert list(single) == ["doc one", "doc 二"]
  restored = pickle.loads(pickle.dumps(corpus))  # grain worker processes receive a pickle
  assert list(restored) == list(corpus)


def test_jsonl_custom_field(tmp_path):
  path = _write(tmp_path / "x.jsonl", '{"body": "alpha"}\n{"body": "beta"}\n')
  assert list(text_file_corpus([path], text_field="body")) == ["alpha", "beta"]


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
    text_file_corpus(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match=r"\*.jsonl"):
    text_file_corpus(str(tmp_path / "*.jsonl"))


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
  path = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{not json}\n{"other": 1}\n{"text": 3}\n')
  corpus = text_file_corpus(path)
  assert corpus[0] == "fine"
  with pytest.raises(ValueError, match=r"bad.jsonl:2.*invalid JSON"):
    corpus[1]
  with pytest.raises(ValueError, match=r"bad.jsonl:3.*'text'"):
    corpus[2]
  with pytest.raises(ValueError, match=r"bad.jsonl:4.*string"):
    corpus[3]


def test_wrong_extension_and_empty(tmp_path):
  with pytest.raises(ValueError, match=r"data\.csv"):
    text_file_corpus(_write(tmp_path / "data.csv", "a,b"))
  with pytest.raises(ValueError, match="no documents"):
    text_file_corpus(_write(tmp_path / "empty.jsonl", "\n\n"))


def test_empty_and_unreadable_documents_are_refused_naming_the_file(tmp_path):
  good = _write(tmp_path / "good.txt", "some text")
  for name, text in (("empty.txt", ""), ("blank.txt", " \n\t\n")):
    with pytest.raises(ValueError, match=rf"{name}' holds no text"):
      text_file_corpus([good, _write(tmp_path / name, text)])
  corpus = text_file_corpus(_write(tmp_path / "lines.jsonl", '{"text": "a"}\n{"text": "  "}\n'))
  assert corpus[0] == "a"
  with pytest.raises(ValueError, match=r"lines.jsonl:2: field 'text' holds no text"):
    corpus[1]


def test_unreadable_files_are_refused_naming_the_file(tmp_path):
  locked = _write(tmp_path / "locked.txt", "text")
  os.chmod(locked, 0)
  try:
    if os.access(locked, os.R_OK):  # root reads anything: nothing to refuse
      pytest.skip("this user can read a file without permissions")
    with pytest.raises(ValueError, match=r"locked.txt' is not readable"):
      text_file_corpus(locked)
  finally:
    os.chmod(locked, 0o600)


def test_python_reference_topics_split_by_name_and_complete():
  from pydoc_data.topics import topics

  train, validation = python_reference_corpus("train"), python_reference_corpus("validation")
  # Every topic once, in sorted order of the names; the split is the hash rule, recomputed here.
  held = {n for n in topics if int(hashlib.sha256(n.encode()).hexdigest()[:16], 16) / 2**64 < 0.1}
  assert validation == [topics[n] for n in sorted(topics) if n in held]
  assert train == [topics[n] for n in sorted(topics) if n not in held]
  assert 0 < len(validation) < len(train)
  assert sum(map(len, train + validation)) > 400_000  # the reference, not a stub
  with pytest.raises(ValueError, match="split: expected one of"):
    python_reference_corpus("test")
  with pytest.raises(ValueError, match="validation_fraction: no topics in split 'validation'"):
    python_reference_corpus("validation", validation_fraction=0.0)
