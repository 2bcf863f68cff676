"""jaxrec: recurrent and long-context language models in JAX."""

from jaxrec import ops
from jaxrec.inference.generate import Generation, generate
from jaxrec.inference.sampler import Sampler

__version__ = "0.1.0"
__all__ = ["Generation", "Sampler", "generate", "ops"]
