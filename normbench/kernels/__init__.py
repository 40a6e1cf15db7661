"""Implementations of the Lp normalization core: the plain formula (``reference``, autograd
backward) and fast paths (``analytic``: a custom autograd Function). Depends on nothing else in
normbench."""
