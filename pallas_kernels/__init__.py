"""Pallas kernels, one folder each: the ``pallas_call`` s and their ``custom_vjp`` wrapper.

This package imports nothing from ``jaxrec`` (``jaxrec.ops`` dispatches to it with
``method="pallas"`` and tests it against its reference forms). Its entry points use the axis
letters of ``jaxrec.typing`` (``B`` batch, ``T`` time, ``H`` heads, ``K``/``V`` key/value widths,
``D`` state width, ...) through ``jaxtyping`` aliases written in each module.
"""
