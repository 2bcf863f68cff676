"""What a forward pass observes, reported with ``nnx.sow`` and collected with ``nnx.capture``.

A layer reports what it sees (an MoE layer its routing, a ParaRNN layer its Newton solve) by
sowing it as an ``nnx.Intermediate`` under a name; whoever wants the observations runs the model
under ``nnx.capture(fn, nnx.Intermediate)`` and reads them by name (flax's
``examples/gemma/sow_lib.py``, maxtext's MoE loss). Two names are reserved for the train step,
which knows no other:

* ``AUX_LOSS``: a scalar, already weighted, added to the objective; the terms of every module
  that sows one are summed.
* ``METRICS``: a dict of scalars reported under their own keys (``moe/entropy``); a key sown by
  several modules is reported as their mean.

Outside ``nnx.capture``, flax 0.12's ``Module.sow`` stores the value as a new ``Intermediate``
attribute of the module (deprecated), which would grow the module at every call and carry
tracers out of a jitted one. ``sow`` here reports only while a capture collects, the same test
``Module.sow`` makes (``nnx.capture`` gives every module of the captured graph a
``__captures__`` store for the call), and is otherwise a no-op: a model called for decoding or
scoring observes nothing and stays as it was.
"""

from typing import Any

from flax import nnx

AUX_LOSS = "aux_loss"
METRICS = "metrics"


def sow(module: nnx.Module, name: str, value: Any) -> None:
  """Reports ``value`` under ``name`` for ``module`` if a capture collects ``nnx.Intermediate``
  s; every call appends to the tuple of values sown under ``name``."""
  if _capturing(module):
    module.sow(nnx.Intermediate, name, value)


def sown(module: nnx.Module, name: str) -> tuple:
  """The values ``module`` has sown under ``name`` so far in the current capture (``()``
  outside one): how a model reads what its layers reported, to pool it, within the same call."""
  for store in getattr(module, "__captures__", ()):
    if type(store) is nnx.Intermediate:
      return store.get_value().get(name, ())
  return ()


def _capturing(module: nnx.Module) -> bool:
  return any(type(store) is nnx.Intermediate for store in getattr(module, "__captures__", ()))
