"""Exact top-k of indexer scores that are never stored: the streamed selection.

The stored-score path (kernels/select_topk.py) writes float32 scores for every visible
(query, key) pair and reads them back several times: at 128K that is ~34 GB written and
re-read, most of the indexer's time. Here each row's scores are streamed instead:

1. The score kernel computes the scores of a sample of key columns only (a SAMPLE-wide
   piece every ``stride`` keys, ~1/20 of a row for top_k = 2048; narrow pieces, so a
   query's recent window, where real selections crowd, holds several of them), and
   :func:`bound_kernel` radix-selects each row's lower bound: the sample rank that
   ~1.25 * top_k keys of the whole row are expected to reach.
2. The score kernel, in collect mode, computes every score and appends the (ordered key,
   index) pairs at or above their row's bound to a per-row scratch of CAP = 2 * top_k
   slots (one atomic per row and tile reserves the slots; the count goes on past CAP so
   that an overflow is seen).
3. :func:`finish_kernel` radix-selects the top_k among a row's candidates and sorts the
   chosen indices (ascending, as the op contract says).
4. A row where that cannot be exact -- fewer than top_k candidates (the bound was too
   high), more than CAP (too low), or equal scores cut at the k-th place (the scratch is
   in arrival order, not key order, so the tie rule could not be applied) -- is flagged,
   and :func:`fallback_kernel` recomputes that row's scores into a per-program row and
   runs the stored-row selection on it. No host synchronisation: the flags stay on the
   device and every launch has a fixed grid.

Both paths give the contract's answer; the sample only decides how much work it takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_compile.kernels.common import INTERPRET, dot, key_offsets
from dsa_compile.kernels.select_topk import _configs, _emit, _load_keys, _radix_select

INT32_MAX = tl.constexpr(2147483647)
# Sample pieces are SAMPLE keys wide; the sample aims at rank ~SAMPLE_RANK of its keys.
SAMPLE = 16
SAMPLE_RANK = 128
# Fallback programs per batch row (each owns one float32 score row of the chunk's width).
FALLBACK_PROGRAMS = 4 if INTERPRET else 256
# Fallback score blocks: keys per block.
FALLBACK_BLOCK_N = 32 if INTERPRET else 128


@triton.jit
def _visible_width(row, width, q_offset, CAUSAL: tl.constexpr):
    """Keys 0 .. n-1 are visible to absolute query row ``row`` (causal at q_offset)."""
    n = tl.zeros([], tl.int64) + width
    if CAUSAL:
        n = tl.minimum(n, row + q_offset + 1)
    return n


@triton.autotune(configs=_configs(), key=["TOPK", "CAUSAL"])
@triton.jit
def bound_kernel(
    SS, BOUND, CNT, stride_sr, width, row0, q_offset, stride_sample,
    CAUSAL: tl.constexpr, SAMPLE_W: tl.constexpr, SAMPLE_K: tl.constexpr,
    TOPK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: the ordered-key lower bound of step 1 (INT32_MAX where the row is too
    short to sample or its sample holds too few live keys: nothing is collected, so the
    row falls back), and its candidate count zeroed."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(0)
    n = _visible_width(row0 + r, width, q_offset, CAUSAL)
    bound = tl.zeros([], tl.int32) + INT32_MAX
    if n > 4 * stride_sample:
        pieces = (n + stride_sample - 1) // stride_sample
        sampled = (pieces - 1) * SAMPLE_W + tl.minimum(n - (pieces - 1) * stride_sample,
                                                       SAMPLE_W)
        rank = (SAMPLE_K * sampled + n - 1) // n + 2
        prefix, shift, _need, live = _radix_select(SS + (b * rows + r) * stride_sr, 1, sampled,
                                                   BLOCK, rank, BLOCK, False)
        if live > rank:
            # key >> shift >= prefix  <=>  key >= prefix << shift (arithmetic shift).
            bound = prefix << shift
    tl.store(BOUND + b * rows + r, bound)
    tl.store(CNT + b * rows + r, 0)


@triton.autotune(configs=_configs(), key=["TOPK"])
@triton.jit
def finish_kernel(
    SK, SI, CNT, FAIL, OUT, stride_ob, stride_ot, row0,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: the top TOPK of its candidates, ascending, or the row flagged in FAIL."""
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(0)
    cnt = tl.load(CNT + b * rows + r)
    fail = tl.full([], 1, tl.int32)
    if (cnt >= TOPK) & (cnt <= CAP):
        sk_row = SK + (b * rows + r) * CAP
        si_row = SI + (b * rows + r) * CAP
        o_row = OUT + b * stride_ob + (row0 + r) * stride_ot
        prefix, shift, need, _live = _radix_select(sk_row, 1, cnt, BLOCK, TOPK, BLOCK, True)
        # Take every key above the k-th prefix and every key equal to it; exact only if
        # the equal ones are exactly ``need`` (else the tie rule needs key order: fall back).
        offs = tl.arange(0, BLOCK)
        written = tl.zeros([], tl.int32)
        ties = tl.zeros([], tl.int32)
        for start in range(0, cnt, BLOCK):
            key, live = _load_keys(sk_row, 1, start, cnt, BLOCK, True)
            p = key >> shift
            take = live & (p >= prefix)
            index = tl.load(si_row + start + offs, mask=take, other=0)
            slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(o_row + slot, index, mask=take & (slot < TOPK))
            written += tl.sum(take.to(tl.int32), 0)
            ties += tl.sum((live & (p == prefix)).to(tl.int32), 0)
        if ties == need:
            tl.debug_barrier()  # the row's stores above are read back by other threads
            slots = tl.arange(0, TOPK_P2)
            chosen = tl.load(o_row + slots, mask=slots < TOPK, other=INT32_MAX)
            tl.store(o_row + slots, tl.sort(chosen), mask=slots < TOPK)
            fail = tl.zeros([], tl.int32)
    tl.store(FAIL + b * rows + r, fail)


@triton.autotune(configs=_configs(), key=["TOPK", "H", "D", "CAUSAL"])
@triton.jit
def fallback_kernel(
    QI, KI, W, KM, KS, FAIL, FS, OUT,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_sb,
    stride_wb, stride_wt, stride_wh,
    stride_mb, stride_ms, stride_fr,
    stride_ob, stride_ot,
    rows, width, row0, q_offset,
    H: tl.constexpr, H_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KEY_SCALE: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
):
    """Flagged rows, exactly: scores recomputed into this program's row of FS (the same
    products and the same head order as the score kernel), then the stored-row select."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    programs = tl.num_programs(0)
    fs_row = FS + (b * programs + pid) * stride_fr
    offs_h = tl.arange(0, H_P)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    for r in range(pid, rows, programs):
        if tl.load(FAIL + b * rows + r) != 0:
            t = (row0 + r).to(tl.int64)
            n = _visible_width(t, width, q_offset, CAUSAL)
            q = tl.load(QI + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
                        + offs_d[None, :], mask=h_ok[:, None] & (offs_d[None, :] < D),
                        other=0.0)  # [H_P, BD]
            for start in range(0, n, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                n_ok = offs_n < n
                rows = key_offsets(b, stride_kb, offs_n, stride_ks, KEY_SCALE)
                kt = tl.load(KI + rows[None, :] + offs_d[:, None],
                             mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BD, BN]
                s = dot(q, kt, IEEE, UPCAST)  # [H_P, BN]
                acc = tl.zeros([BLOCK_N], tl.float32)
                for h in range(H):
                    wh = tl.load(W + b * stride_wb + t * stride_wt + h * stride_wh).to(tl.float32)
                    s_h = tl.sum(tl.where(offs_h[:, None] == h, s, 0.0), 0)
                    acc += tl.maximum(s_h, 0.0) * wh
                if KEY_SCALE:
                    acc *= tl.load(KS + b * stride_sb + offs_n, mask=n_ok, other=0.0)
                visible = n_ok
                if HAS_MASK:
                    km = tl.load(KM + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0)
                    visible &= km != 0
                tl.store(fs_row + offs_n, tl.where(visible, acc + 0.0, float("-inf")), mask=n_ok)
            tl.debug_barrier()  # the row is read back by other threads of this program
            o_row = OUT + b * stride_ob + t * stride_ot
            prefix, shift, need, _live = _radix_select(fs_row, 1, n, BLOCK, TOPK, BLOCK, False)
            _emit(fs_row, 1, n, fs_row, prefix, shift, need, o_row, TOPK, BLOCK, False)
            tl.debug_barrier()  # the next flagged row overwrites fs_row


def sample_geometry(top_k: int) -> tuple[int, int, int] | None:
    """(stride, SAMPLE_W, SAMPLE_K) of the sampled bound for ``top_k``, or None where
    top_k is too small to sample (the sample would be most of the row)."""
    stride = SAMPLE * max(1, (5 * top_k) // (4 * SAMPLE_RANK))
    if stride < 4 * SAMPLE:
        return None
    return stride, SAMPLE, (5 * top_k) // 4


def first_streamed_width(top_k: int, stride: int) -> int:
    """Rows that see more keys than this are streamed: enough sample pieces for a bound,
    and at least twice top_k keys (shorter rows keep most of their keys: stored path)."""
    return max(4 * stride, 2 * top_k)


def sampled_width(width: int, stride: int, sample_w: int) -> int:
    """Sampled columns of a row of ``width`` keys: pieces of sample_w every stride keys."""
    pieces = -(-width // stride)
    return (pieces - 1) * sample_w + min(width - (pieces - 1) * stride, sample_w)


def cap_for(top_k: int) -> int:
    """Candidate slots per row: twice the selection (the bound aims at ~1.25 x)."""
    return 2 * top_k


def _buffer(shape, dtype, device) -> torch.Tensor:
    """Scratch allocation; tests replace it to poison or watch the scratch."""
    return torch.empty(shape, dtype=dtype, device=device)
