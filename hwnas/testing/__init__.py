"""Helpers shared by the test suite and benchmarks/faults.py (not used by the library itself)."""
