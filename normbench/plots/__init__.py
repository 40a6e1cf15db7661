"""Figures drawn from results files (matplotlib imported only inside these modules' functions'
callers: import a submodule to draw). Plots read results; they never run measurements."""
