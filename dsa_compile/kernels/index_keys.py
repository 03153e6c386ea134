"""Packing index keys into the FP8 cache format in one launch (reference/index_keys.py).

A decode step packs one new key per sequence and layer: the reference's dozen small
PyTorch ops are a dozen launches per layer under a CUDA graph, this kernel is one.
Byte-exact against the reference on an H100 and in Triton's interpreter
(tests/test_index_keys_fp8.py). It did not make the FP8 cache faster end to end (H100,
Llama-3-8B shape, 128K, B = 1: 93.7 tok/s against 98.9 with bf16 keys; the per-step pack
was not the cause, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_compile.reference.index_keys import _TINY, FP8_MAX, check_packable, packed_width

# Kernels may only read constexpr globals (the interpreter lets any through: the first
# GPU compile, 2026-12-07, failed on exactly that).
TINY = tl.constexpr(_TINY)
E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _e4m3_bits(v):
    """float32 v (|v| <= 448 or NaN) -> its float8 e4m3fn code as int32, rounded to
    nearest even like torch's cast. Spelled in integer arithmetic: Triton's interpreter
    (CI) drops the carry of a rounding that crosses a power of two."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(v)
    # Normal range (a >= 2^-6): 3 mantissa bits kept of 23, the carry runs into the exponent.
    ab = a.to(tl.int32, bitcast=True)
    keep = ((ab >> 23) - 127 + 7) * 8 + ((ab >> 20) & 7)
    rem = ab & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((keep & 1) == 1))
    normal = keep + up.to(tl.int32)
    # Subnormals (a < 2^-6): code = a / 2^-9 rounded half to even (a * 512 is exact).
    t = tl.where(a < 0.015625, a, 0.0) * 512.0
    fl = tl.floor(t)
    frac = t - fl
    fi = fl.to(tl.int32)
    sub = fi + ((frac > 0.5) | ((frac == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    return sign | tl.where(v != v, 0x7F, code)  # NaN keeps its sign, as in torch


@triton.jit
def pack_index_keys_kernel(X, OUT, n_rows, stride_x, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           ROWS: tl.constexpr):
    """ROWS keys per program: e4m3 values round(x / scale) in bytes 0..D-1 of a row,
    scale = amax|x| / 448 (NaN when the key holds a NaN) as float32 in bytes D..D+3."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (offs < D)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + offs[None, :], mask=ok,
                other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    has_nan = tl.sum((x != x).to(tl.int32), 1) > 0  # tl.max need not propagate NaN
    scale = tl.where(has_nan, float("nan"), tl.maximum(amax, TINY) / E4M3_MAX)
    k8 = _e4m3_bits(x / scale[:, None])
    width = D + 4
    out_row = OUT + rows.to(tl.int64) * width
    tl.store(out_row[:, None] + offs[None, :], k8.to(tl.uint8), mask=ok)
    bits = scale.to(tl.int32, bitcast=True)
    for j in tl.static_range(4):  # native (little-endian) byte order, as the reference
        tl.store(out_row + D + j, ((bits >> (8 * j)) & 0xFF).to(tl.uint8),
                 mask=rows < n_rows)


def pack_index_keys(k_idx: torch.Tensor) -> torch.Tensor:
    """float [..., d_I] (CUDA, last dim contiguous) -> packed uint8 [..., d_I + 4],
    byte for byte what :func:`dsa_compile.reference.index_keys.pack_index_keys` gives."""
    d = k_idx.shape[-1]
    check_packable(d)
    x = k_idx.reshape(-1, d)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((*k_idx.shape[:-1], packed_width(d)), dtype=torch.uint8,
                      device=k_idx.device)
    n = x.shape[0]
    if n:
        rows = 4
        pack_index_keys_kernel[(triton.cdiv(n, rows),)](
            x, out, n, x.stride(0), D=d, BLOCK_D=triton.next_power_of_2(d), ROWS=rows)
    return out

