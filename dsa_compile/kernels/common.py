"""Pieces shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Kernels run on CPU tensors only in Triton's interpreter (tests in CI); some choices
# (configs, bf16 dots) differ there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; IEEE keeps fp32 inputs exact (no TF32)."""
    # UPCAST works around the CPU interpreter's wrong bf16 tl.dot (triton 3.9).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
