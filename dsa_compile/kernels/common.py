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


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def key_offsets(b, stride_kb, offs_n, stride_ks, PACKED: tl.constexpr):
    """Offsets of index keys ``offs_n`` of sequence b in a [B, Lk, width] cache. Packed
    FP8 rows are d_I + 4 bytes (d_I % 4 == 0): 4-byte aligned, but the compiler cannot
    know it from a stride that is not a multiple of 16 and would load single bytes."""
    base = b * stride_kb
    rows = offs_n.to(tl.int64) * stride_ks
    if PACKED:
        base = tl.multiple_of(base, 4)
        rows = tl.multiple_of(rows, 4)
    return base + rows


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, and available in the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def online_softmax_step(s, m_i, l_i, acc):
    """One key block of the online softmax. s: [M, N] logits in log2 units, -inf where
    masked; m_i / l_i: [M] running max / sum; acc: [M, Dv]. Returns (p [M, N] to
    multiply by the block's V and add to the returned acc, m_i, l_i, acc rescaled)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtract 0 there, not -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def online_softmax_finish(acc, m_i, l_i):
    """(out [M, Dv], lse [M] natural log) of an online softmax; a row that saw no key
    gets zeros and lse = -inf."""
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse
