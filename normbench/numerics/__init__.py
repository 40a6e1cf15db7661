"""Numerical stability of norm layers in low precision (the library behind ``normbench stability``).

- :mod:`~normbench.numerics.formats`: the floating-point formats and rounding to them;
- :mod:`~normbench.numerics.emulator`: rounded, autograd-aware arithmetic and reductions;
- :mod:`~normbench.numerics.layers`: the layer in float64 (reference), as shipped (framework) and
  emulated (native);
- :mod:`~normbench.numerics.cases`: named input generators; :mod:`~normbench.numerics.inputs`:
  the user's tensors;
- :mod:`~normbench.numerics.metrics`: error measures; :mod:`~normbench.numerics.summary`: safe
  ranges and analytic thresholds;
- :mod:`~normbench.numerics.runner`: :class:`StabilitySpec` and :func:`run`.
"""

from normbench.numerics.emulator import REDUCTIONS, Emulator
from normbench.numerics.formats import FORMATS, Format, get_format
from normbench.numerics.runner import StabilitySpec, cells, run

__all__ = ["Emulator", "REDUCTIONS", "Format", "FORMATS", "get_format", "StabilitySpec", "cells", "run"]
