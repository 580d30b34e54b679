"""Numerical kernels shared by the tuners (sparse delta matmul, stable rank)."""
