"""Exact top-k selection of score rows in Triton: radix select, no sort.

Each program owns one row of a float32 score chunk [B, rows, width] (-inf = hidden key,
never selected; NaN ranks as the lowest finite score, as in the reference, so a NaN
indexer still selects keys). Scores map to int32 keys whose signed order is the float
order (the score kernel already turned -0.0 into +0.0). Histograms of 8-bit digits,
most significant first, narrow the k-th largest key down to a prefix P at bit `shift`:
every key with key >> shift > P is selected, and `need` more come from the keys with
key >> shift == P. A last pass compacts the survivors in key order, so the output is
ascending without a sort and the tied keys taken are the smallest indices (the op
contract's tie rule).

Histograms are the costly part (on an H200 the full-row radix path took 3.96 ms for
8192 rows of 32K scores, the sampled path below 1.79 ms; benchmarks/RESULTS.md), so
long rows first find a safe lower bound from a sample:

1. Sample: one SAMPLE-wide piece of the row every ``stride`` keys (~1/20 of the row for
   top_k = 2048). Radix-select its r-th largest key, r ~ 1.25 * top_k * sampled / n,
   so that ~1.25 * top_k keys of the whole row are expected at or above it.
2. One pass over the row copies the keys at or above that bound (and their indices) to
   a per-row scratch of CAP = 2 * top_k slots, in key order.
3. The exact radix select and the compaction run on that scratch only.

If the bound was too high (fewer than top_k candidates) or too low (more than CAP), the
row takes the plain path: radix select over the whole row. Both paths give the same
answer; the sample only decides how much work it takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_compile.kernels.common import kernel_configs

# Sample pieces are this many keys wide; the sample aims at rank ~SAMPLE_RANK.
SAMPLE = 256
SAMPLE_RANK = 128
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)  # torch.finfo(torch.float32).min


def _configs():
    return kernel_configs(
        triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=2),
        [triton.Config({"BLOCK": blk}, num_warps=w, num_stages=2)
         for blk in (512, 1024, 2048)
         for w in (4, 8)])


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (signed compare); NaN-free input."""
    i = x.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_keys(src, stride, start, n, BLOCK: tl.constexpr, IS_KEYS: tl.constexpr):
    """Keys [BLOCK] at positions start.. of a score row (float32) or a key scratch (int32),
    and which of them are live (in range and, for scores, not -inf)."""
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    if IS_KEYS:
        key = tl.load(src + offs, mask=inb, other=0)
        live = inb
    else:
        x = tl.load(src + offs * stride, mask=inb, other=float("-inf"))
        x = tl.where(x != x, FLOAT32_LOWEST, x)  # NaN: the lowest finite score
        key = _ordered_key(x)
        live = x > float("-inf")
    return key, live


@triton.jit
def _digit_pick(hist, need, NB: tl.constexpr):
    """Bin d of ``hist`` [NB] holding the need-th largest key, the count above d, hist[d]."""
    bins = tl.arange(0, NB)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # keys in bins > d
    hit = (above < need) & (above + hist >= need)
    d = tl.sum(tl.where(hit, bins, 0), 0)
    return d, tl.sum(tl.where(hit, above, 0), 0), tl.sum(tl.where(hit, hist, 0), 0)


@triton.jit
def _refine(src, stride, n, step, prefix, need, shift, done,
            LO: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
            IS_KEYS: tl.constexpr):
    """One lower digit: among keys whose bits above LO + BITS equal ``prefix``, the
    BITS-wide digit at LO that holds the need-th largest."""
    if done == 0:
        hist = tl.zeros([NB], tl.int32)
        for start in range(0, n, step):
            key, live = _load_keys(src, stride, start, n, BLOCK, IS_KEYS)
            cand = live & ((key >> (LO + BITS)) == prefix)
            hist += tl.histogram((key >> LO) & ((1 << BITS) - 1), NB, mask=cand)
        d, above, cnt = _digit_pick(hist, need, NB)
        prefix = (prefix << BITS) + d
        shift = LO
        need -= above
        done = (cnt == need).to(tl.int32)
    return prefix, need, shift, done


@triton.jit
def _radix_select(src, stride, n, step, k,
                  BLOCK: tl.constexpr, IS_KEYS: tl.constexpr):
    """The top min(k, live) keys among blocks [start, start + BLOCK), start = 0, step, ...
    below n, as (prefix, shift, need, live): keys with key >> shift > prefix, plus the
    first ``need`` (in position order) with key >> shift == prefix."""
    NB: tl.constexpr = 256  # 8-bit digits: 8 + 8 + 8 + 8 bits
    hist = tl.zeros([NB], tl.int32)
    for start in range(0, n, step):
        key, live = _load_keys(src, stride, start, n, BLOCK, IS_KEYS)
        hist += tl.histogram((key >> 24) + NB // 2, NB, mask=live)
    live_count = tl.sum(hist, 0)
    need = tl.minimum(live_count, k)
    shift = tl.zeros([], tl.int32) + 24
    prefix = tl.zeros([], tl.int32) - (NB // 2 + 1)  # below every top digit: takes all
    done = (live_count <= k).to(tl.int32)
    if done == 0:
        d, above, cnt = _digit_pick(hist, need, NB)
        prefix = d - NB // 2
        need -= above
        done = (cnt == need).to(tl.int32)
    prefix, need, shift, done = _refine(src, stride, n, step, prefix, need, shift, done,
                                        16, 8, NB, BLOCK, IS_KEYS)
    prefix, need, shift, done = _refine(src, stride, n, step, prefix, need, shift, done,
                                        8, 8, NB, BLOCK, IS_KEYS)
    prefix, need, shift, done = _refine(src, stride, n, step, prefix, need, shift, done,
                                        0, 8, NB, BLOCK, IS_KEYS)
    return prefix, shift, need, live_count


@triton.jit
def _emit(src, stride, n, idx_src, prefix, shift, need, o_row, TOPK: tl.constexpr,
          BLOCK: tl.constexpr, IS_KEYS: tl.constexpr):
    """Write the selection of :func:`_radix_select` to ``o_row`` in position order (the
    index is the position, or idx_src[position] for a scratch), then -1 up to TOPK."""
    offs = tl.arange(0, BLOCK)
    written = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for start in range(0, n, BLOCK):
        key, live = _load_keys(src, stride, start, n, BLOCK, IS_KEYS)
        p = key >> shift
        eq = live & (p == prefix)
        take = (live & (p > prefix)) | (eq & (ties + tl.cumsum(eq.to(tl.int32), 0) <= need))
        if IS_KEYS:
            index = tl.load(idx_src + start + offs, mask=take, other=0)
        else:
            index = (start + offs).to(tl.int32)
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(o_row + slot, index, mask=take)
        written += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(eq.to(tl.int32), 0)
    for start in range(0, TOPK, BLOCK):
        slot = start + offs
        tl.store(o_row + slot, tl.full([BLOCK], -1, tl.int32),
                 mask=(slot >= written) & (slot < TOPK))


@triton.autotune(configs=_configs(), key=["TOPK", "CAUSAL", "width_log2"])
@triton.jit
def select_topk_kernel(
    S, OUT, SK, SI,
    stride_sb, stride_st, stride_ss,
    stride_ob, stride_ot,
    width, row0, q_offset, width_log2, stride_sample,
    TOPK: tl.constexpr, CAP: tl.constexpr, SAMPLED: tl.constexpr, CAUSAL: tl.constexpr,
    SAMPLE_W: tl.constexpr, SAMPLE_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(0)
    s_row = S + b * stride_sb + r * stride_st
    o_row = OUT + b * stride_ob + (row0 + r) * stride_ot
    n = tl.zeros([], tl.int64) + width
    if CAUSAL:
        # Keys past the query's position are -inf: do not read them.
        n = tl.minimum(n, row0 + r + q_offset + 1)

    plain = tl.full([], 1, tl.int32)
    if SAMPLED:
        if n > 4 * stride_sample:
            # 1. A lower bound from the sample: its r-th largest key.
            pieces = (n + stride_sample - 1) // stride_sample
            sampled = (pieces - 1) * SAMPLE_W + tl.minimum(n - (pieces - 1) * stride_sample,
                                                           SAMPLE_W)
            rank = (SAMPLE_K * sampled + n - 1) // n + 2
            prefix, shift, _need, live = _radix_select(s_row, stride_ss, n, stride_sample,
                                                       rank, SAMPLE_W, False)
            if live > rank:
                # 2. Copy the keys at or above the bound to the row's scratch, in order.
                sk_row = SK + (b * rows + r) * CAP
                si_row = SI + (b * rows + r) * CAP
                offs = tl.arange(0, BLOCK)
                count = tl.zeros([], tl.int32)
                for start in range(0, n, BLOCK):
                    key, ok = _load_keys(s_row, stride_ss, start, n, BLOCK, False)
                    keep = ok & ((key >> shift) >= prefix)
                    slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
                    keep &= slot < CAP
                    tl.store(sk_row + slot, key, mask=keep)
                    tl.store(si_row + slot, (start + offs).to(tl.int32), mask=keep)
                    count += tl.sum(keep.to(tl.int32), 0)
                # All candidates were kept (none dropped at CAP) and they hold the top k.
                if (count >= TOPK) & (count < CAP):
                    # 3. Exact selection on the scratch.
                    prefix, shift, need, _live = _radix_select(sk_row, 1, count, BLOCK, TOPK,
                                                               BLOCK, True)
                    _emit(sk_row, 1, count, si_row, prefix, shift, need, o_row, TOPK, BLOCK,
                          True)
                    plain = tl.zeros([], tl.int32)
    if plain != 0:
        prefix, shift, need, _live = _radix_select(s_row, stride_ss, n, BLOCK, TOPK,
                                                   BLOCK, False)
        _emit(s_row, stride_ss, n, s_row, prefix, shift, need, o_row, TOPK, BLOCK, False)


def _scratch(shape, device) -> torch.Tensor:
    """The sampled path's per-row candidate scratch (int32); tests wrap it to watch it."""
    return torch.empty(shape, dtype=torch.int32, device=device)


def select_topk_rows(scores: torch.Tensor, out: torch.Tensor, row0: int, q_offset: int,
                     causal: bool) -> None:
    """Each row's top keys, written into ``out[:, row0 : row0 + rows]``.

    Args:
        scores: float32 [B, rows, width]; -inf marks hidden keys (never selected), NaN
            counts as the lowest finite score. With
            ``causal``, row i's keys past position row0 + i + q_offset must be -inf (they
            are not read).
        out: int32 [B, Lq, top_k] with its last dimension contiguous; rows row0 ..
            row0 + rows get the selected keys ascending, ties to the smaller index, -1 in
            unused slots (as :func:`dsa_compile.reference.select_topk`).
    """
    b, rows, width = scores.shape
    top_k = out.shape[-1]
    if out.stride(-1) != 1:
        raise ValueError("select_topk_rows: out must be contiguous in its last dimension")
    cap = 2 * top_k
    # Sample ~1/stride of each row so that its rank SAMPLE_RANK matches ~1.25 * top_k.
    stride = SAMPLE * max(1, (5 * top_k) // (4 * SAMPLE_RANK))
    sampled = stride >= 4 * SAMPLE and width > 4 * stride
    if sampled:
        sk = _scratch((b * rows, cap), scores.device)
        si = _scratch((b * rows, cap), scores.device)
    else:
        sk = si = out  # unused
    select_topk_kernel[(rows, b)](
        scores, out, sk, si,
        scores.stride(0), scores.stride(1), scores.stride(2),
        out.stride(0), out.stride(1),
        width, row0, q_offset, max(width - 1, 1).bit_length(), stride,  # tuned per 2^n
        TOPK=top_k, CAP=cap, SAMPLED=sampled, CAUSAL=causal,
        SAMPLE_W=SAMPLE, SAMPLE_K=(5 * top_k) // 4,
    )
