"""normbench: analysis and benchmarking of normalization layers in deep networks.

The layers live in :mod:`normbench.nn`; the commands ``profile``, ``stability`` and ``plot``
each have a library package behind them, and :mod:`normbench.cli` only parses, calls and renders.
"""

__version__ = "0.1.0"
