"""Triton kernels for the DSA ops (CUDA; on CPU only under TRITON_INTERPRET=1)."""
