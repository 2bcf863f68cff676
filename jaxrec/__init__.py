"""jaxrec: recurrent and long-context language models in JAX."""

from jaxrec import ops
from jaxrec.inference.generate import generate

__version__ = "0.1.0"
__all__ = ["generate", "ops"]
