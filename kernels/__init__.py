"""Triton kernels and their plain-torch references (the CPU execution path)."""
