"""Triton and CUDA kernels, each beside the torch version that runs where it cannot (CPU, no Triton).

May import: torch, triton. Nothing else from raytp.
"""
