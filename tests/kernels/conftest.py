"""Kernels compile on the caller's thread here (normbench.kernels.background's ``wait`` mode), so
that ``impl="auto"`` runs the kernels from its first call and each test checks what it names;
tests/kernels/test_background.py switches to ``background`` where it tests that mode."""

import os

os.environ.setdefault("NORMBENCH_KERNEL_COMPILE", "wait")
