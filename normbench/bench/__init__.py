"""Timing engine, implementation registry and byte model behind ``normbench profile``."""
