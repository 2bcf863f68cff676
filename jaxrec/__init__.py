"""jaxrec: recurrent and long-context language models in JAX."""

from jaxrec import ops

__version__ = "0.1.0"
__all__ = ["ops"]
