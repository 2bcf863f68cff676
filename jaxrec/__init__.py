"""jaxrec: recurrent and long-context language models in JAX.

``import jaxrec`` loads the core ops and generation; the other subpackages (``jaxrec.models``,
``jaxrec.train``, ...) load on first attribute access, so ``jaxrec.models.load_pretrained`` works
after a plain ``import jaxrec``.
"""

import importlib

from jaxrec import ops
from jaxrec.inference.generate import Generation, generate
from jaxrec.inference.sampler import Sampler

__version__ = "0.1.0"
__all__ = ["Generation", "Sampler", "generate", "ops"]

_SUBPACKAGES = ("data", "inference", "layers", "linearize", "models", "sharding", "train", "typing")


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"jaxrec.{name}")
  raise AttributeError(f"module 'jaxrec' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_SUBPACKAGES])
