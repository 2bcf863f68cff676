"""Synthetic recall tasks as grain datasets that batch like the LM data.

* ``MQAR``: multi-query associative recall (Zoology's semantics);
* ``SetDisjointness``: ``[1] A [2] B [3]`` -> the shared element (JRT, Algorithm 1);
* ``Counting``: count a letter in a random string, in four formats (Zhang et al. 2024).

Each task draws ``Example`` s (context, question, targets, weights) deterministically from a seed;
``task_dataset`` turns them into left-padded rows (``inputs``, ``targets``, ``segment_ids``,
``weights`` on the scored positions only) batched by grain, and ``read_ahead`` iterates them for
training. See ``base`` for the layout.
"""

from jaxrec.data.tasks.base import Example, Prompt, Task, make_row, read_ahead, task_dataset
from jaxrec.data.tasks.counting import FORMATS, Counting, CountingFormat, format_string
from jaxrec.data.tasks.mqar import MQAR
from jaxrec.data.tasks.sets import SetDisjointness

__all__ = [
  "FORMATS",
  "MQAR",
  "Counting",
  "CountingFormat",
  "Example",
  "Prompt",
  "SetDisjointness",
  "Task",
  "format_string",
  "make_row",
  "read_ahead",
  "task_dataset",
]
