"""Shared test setup: the fp64 oracles in tests/oracle.py are importable as ``oracle``."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Triton kernels run on the CPU in tests; set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
