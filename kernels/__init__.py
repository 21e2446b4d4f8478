"""Triton kernels for CUDA tensors (packaged as ringfuse.kernels)."""
