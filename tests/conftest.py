"""Shared test setup: the fp64 oracles in tests/oracle.py are importable as ``oracle``; under
pytest-xdist (README's ``pytest -n 2``) each worker, and every process it starts, computes on one
thread, so two workers on two cores do not oversubscribe them (OpenMP threads that outnumber the
cores spin against each other)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Triton kernels run on the CPU in tests; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
