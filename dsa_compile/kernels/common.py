"""Pieces shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Kernels run on CPU tensors only in Triton's interpreter (tests in CI); some choices
# (configs, bf16 dots) differ there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# DSA_TRITON_AUTOTUNE=0: every kernel takes the config autotuning picked on an H200
# (benchmarks/RESULTS.md) instead of searching (no tuning cost on first launch).
AUTOTUNE = os.environ.get("DSA_TRITON_AUTOTUNE") != "0"


def kernel_configs(interpreted: triton.Config, tuned: triton.Config,
                   search: list[triton.Config]) -> list[triton.Config]:
    """A kernel's autotune configs: one small config in the interpreter, the H200's pick
    without autotuning, else the search space. The one place these switches are read."""
    if INTERPRET:
        return [interpreted]
    return search if AUTOTUNE else [tuned]


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
