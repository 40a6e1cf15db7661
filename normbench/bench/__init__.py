"""Timing engine, implementation registry and byte model behind ``normbench profile``.

The Python API of the command::

    from normbench.bench import make_spec, run
    records = run(make_spec(norm="l2,l1,linf", dtype="fp32,bf16", shape="32x64x56x56"))

- :mod:`~normbench.bench.spec`: the grid (:class:`ProfileSpec`, :func:`make_spec`, presets);
- :mod:`~normbench.bench.runner`: :func:`run` and one cell's measurement;
- :mod:`~normbench.bench.timing`: warm-up, repeats, median and IQR, CPU and CUDA timers, interleaved
  rounds, rotation over input copies;
- :mod:`~normbench.bench.impls`: the implementation registry (``torch``, ``eager``, ``analytic``,
  ``paper``);
- :mod:`~normbench.bench.bytes`: the fewest bytes each pass moves;
- :mod:`~normbench.bench.memory`: bytes saved for backward, peak memory;
- :mod:`~normbench.bench.bandwidth`: the device's copy bandwidth.
"""

from normbench.bench.impls import IMPLS, Impl, register
from normbench.bench.runner import KEY_FIELDS, RECORD_FIELDS, run
from normbench.bench.spec import PRESETS, ProfileSpec, ShapeGroup, make_spec
from normbench.bench.timing import CpuTimer, Measurement, Rotation, TimingSpec, measure, measure_interleaved

__all__ = [
    "IMPLS", "Impl", "register", "KEY_FIELDS", "RECORD_FIELDS", "run", "PRESETS", "ProfileSpec",
    "ShapeGroup", "make_spec", "CpuTimer", "Measurement", "TimingSpec", "measure", "measure_interleaved", "Rotation",
]
