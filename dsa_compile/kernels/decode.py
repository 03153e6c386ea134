"""DSA decode in Triton: few queries per sequence (Lq = 1 .. 8), long caches.

One decode step (or a speculative-verification step of Lq drafted tokens) is

    index scores over the cached index keys  ->  exact top-k  ->  sparse attention

and at Lq = 1 none of the prefill kernels fills the GPU: they put one program on each
(query, KV head) and one on each score row. Every kernel here splits the long axis
(the keys, or the selected keys) over many programs instead, and the whole step runs
as a fixed sequence of launches with no host synchronisation and no data-dependent
shapes, so it can be captured in a CUDA graph:

1. ``decode_scores_kernel`` -- grid (key blocks, B). A program loads one block of
   index keys once and scores it for all Lq x H_I query heads of its sequence in one
   tl.dot; it also adds the block's histogram of the top 8 bits of each score's
   order-preserving integer key to a per-row histogram (level 1 of the radix select).
2. ``topk_level_kernel`` (twice) -- grid (segments, rows). Every program reads the
   previous level's histogram, finds the digit that holds the k-th largest key, and
   histograms the next 12 bits of the keys that share the prefix found so far. After
   8 + 12 + 12 bits the k-th largest key T is known exactly, whatever the input:
   massive ties only make one bin tall, they need no candidate buffer and no fallback.
3. ``topk_count_kernel`` -- per segment, how many keys are above T and how many equal.
4. ``topk_write_kernel`` -- each segment sums the counts of the segments before it,
   which gives its first output slot, and writes its selected keys there in position
   order: the output is ascending without a sort, and the first ``need`` keys equal to
   T (by position) are taken, so ties go to the smaller index. -1 fills the rest.
5. ``decode_attention_kernel`` -- grid (splits, Hkv, B), flash-decoding: a program
   takes one slice of each query's selected keys for one KV head, gathers those K/V
   rows once for all Hq / Hkv query heads, runs an online softmax and writes a partial
   (out, lse); ``decode_combine_kernel`` merges the splits by log-sum-exp.

Selection order (the contract of :func:`dsa_compile.reference.select_topk`): larger
scores first, -inf never selected, -0.0 equal to +0.0, ties to the smaller key index.
How a NaN score ranks is decided in one place, :func:`_score_key`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsa_compile.kernels.common import (
    INTERPRET,
    LOG2E,
    dot,
    key_offsets,
    online_softmax_finish,
    online_softmax_step,
    tanh,
)
from dsa_compile.reference.index_keys import is_packed, unpack_index_keys

# False (reference.select_topk since f4b666e): a NaN score of a visible key ranks as
# the lowest finite score (-FLT_MAX) and is written like any other key. True: NaN ranks
# above +inf, takes a slot and comes out as -1 (torch.topk's order with the -inf test
# dropping the slot; the reference before f4b666e). Only _score_key and the count/write
# kernels' "dropped" tests depend on it.
NAN_RANKS_HIGHEST_DROPPED = False
_NAN_KEY = 0x7FFFFFFF  # the key of a NaN when it ranks highest (above +inf: 0x7F800000)

# Radix digits: 8 bits (level 1, fused in the score kernel), then 12 and 12.
_NB1, _NB2, _NB3 = 256, 4096, 4096
_HIST = _NB1 + _NB2 + _NB3  # int32 histogram words per row
_STATE = 8  # int32 words of selection state per row


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs before the kernels write."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Selection keys
# ---------------------------------------------------------------------------------------


@triton.jit
def _score_key(x, NAN_HIGH: tl.constexpr):
    """float32 scores -> (int32 keys whose signed order is the selection order, live).

    live: the key can be selected (not -inf). -0.0 and +0.0 get one key. A NaN is live
    and ranks highest (NAN_HIGH) or as the lowest finite value.
    """
    x = x + 0.0  # -0.0 -> +0.0
    nan = x != x
    live = (x > float("-inf")) | nan
    if not NAN_HIGH:
        x = tl.where(nan, -3.4028234663852886e38, x)
    i = x.to(tl.int32, bitcast=True)
    key = i ^ ((i >> 31) & 0x7FFFFFFF)
    if NAN_HIGH:
        key = tl.where(nan, 0x7FFFFFFF, key)
    return key, live


@triton.jit
def _pick(hist, need, NB: tl.constexpr):
    """The bin d of ``hist`` [NB] (bins ordered low to high) that holds the need-th
    largest key, and the number of keys in the bins above d."""
    bins = tl.arange(0, NB)
    above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # keys in bins > d
    hit = (above < need) & (above + hist >= need)
    return tl.sum(tl.where(hit, bins, 0), 0), tl.sum(tl.where(hit, above, 0), 0)


@triton.jit
def _load_keys(s_row, start, n, BLOCK: tl.constexpr, NAN_HIGH: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(s_row + offs, mask=inb, other=float("-inf"))
    key, live = _score_key(x, NAN_HIGH)
    return offs, key, live & inb


# ---------------------------------------------------------------------------------------
# 1. Index scores (+ level-1 histogram)
# ---------------------------------------------------------------------------------------


@triton.jit
def decode_scores_kernel(
    QI, KI, KS, W, QPOS, KM, OUT, HIST, ROWLEN,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_sb, stride_ss,
    stride_wb, stride_wt, stride_wh,
    stride_mb,
    stride_ob, stride_ot,
    lk,
    LQ: tl.constexpr, BLOCK_T: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
    HAS_MASK: tl.constexpr, WITH_HIST: tl.constexpr, NAN_HIGH: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, KEY_SCALE: tl.constexpr,
):
    """Scores of TILES blocks of BLOCK_N keys for all Lq queries of sequence b; with
    WITH_HIST also the level-1 radix histogram of each row and (program 0) ROWLEN.
    KEY_SCALE: KI holds e4m3 keys (packed rows, stride_ks bytes apart), read as such and
    widened in registers; each key's score is multiplied by its scale KS."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < LQ
    # Rows m = t * BLOCK_H + h of one [BLOCK_T * BLOCK_H, D] query matrix.
    m = tl.arange(0, BLOCK_T * BLOCK_H)
    mt = m // BLOCK_H
    mh = m % BLOCK_H
    m_ok = (mt < LQ) & (mh < H)
    qpos = tl.load(QPOS + b * LQ + offs_t, mask=t_ok, other=-1)  # [BT]
    if WITH_HIST:
        if pid_n == 0:  # the rows' lengths for the top-k kernels
            tl.store(ROWLEN + b * LQ + offs_t, tl.minimum(tl.maximum(qpos + 1, 0), lk),
                     mask=t_ok)
    q = tl.load(QI + b * stride_qb + mt[:, None] * stride_qt + mh[:, None] * stride_qh
                + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [M, BD]
    w = tl.load(W + b * stride_wb + mt * stride_wt + mh * stride_wh, mask=m_ok,
                other=0.0).to(tl.float32)  # [M]
    last = tl.max(qpos, 0)
    for tile in range(TILES):
        offs_n = (pid_n * TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)  # keys
        n_ok = offs_n < lk
        visible = (offs_n[None, :] <= qpos[:, None]) & n_ok[None, :] & t_ok[:, None]
        if HAS_MASK:
            km = tl.load(KM + b * stride_mb + offs_n, mask=n_ok, other=0)
            visible &= (km != 0)[None, :]
        # Blocks no query sees load nothing (their scores are -inf).
        load_ok = n_ok & (offs_n <= last)
        kt = tl.load(KI + key_offsets(b, stride_kb, offs_n, stride_ks, KEY_SCALE)[None, :]
                     + offs_d[:, None],
                     mask=load_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BD, BN]
        if KEY_SCALE:
            kt = kt.to(q.dtype)  # e4m3 values are exact in bf16 / fp16 / fp32
        s = tl.maximum(dot(q, kt, IEEE, UPCAST), 0.0) * w[:, None]  # [M, BN]
        acc = tl.sum(tl.reshape(s, [BLOCK_T, BLOCK_H, BLOCK_N]), 1)  # [BT, BN]
        if KEY_SCALE:
            # The per-key scale is positive: it commutes with the ReLU and the head sum.
            ks = tl.load(KS + b * stride_sb + offs_n.to(tl.int64) * stride_ss, mask=load_ok,
                         other=0.0)
            acc *= ks[None, :]
        # + 0.0 turns a -0.0 sum into +0.0, so equal scores compare equal bit for bit.
        scores = tl.where(visible, acc + 0.0, float("-inf"))
        o_ptrs = OUT + b * stride_ob + offs_t[:, None] * stride_ot + offs_n[None, :]
        tl.store(o_ptrs, scores, mask=t_ok[:, None] & n_ok[None, :])
        if WITH_HIST:
            bins = tl.arange(0, 256)
            for t in tl.static_range(BLOCK_T):
                if t < LQ:
                    row = tl.sum(tl.where(offs_t[:, None] == t, scores, 0.0), 0)  # [BN]
                    key, live = _score_key(row, NAN_HIGH)
                    hist = tl.histogram((key >> 24) + 128, 256, mask=live)
                    tl.atomic_add(HIST + (b * LQ + t) * (256 + 4096 + 4096) + bins, hist,
                                  mask=hist > 0, sem="relaxed")


# Score kernel launch shape (keys per tile, tiles per program, warps, pipeline stages).
# H200, bf16, 8 x 128 indexer (benchmarks/results/decode_h200.log): 4 pipelined tiles
# of 128 keys per program took 0.0799 ms at B=8 x 128K against 0.0945 ms for one tile
# (runs 3 and 2), and were better from B * Lk = 256K keys on (32K x 8, 8K x 32), worse
# below (fewer programs than SMs: 32K x 1 0.0095 vs 0.0059 ms), equal at 128K x 1.
SCORE_CONFIG = {"block_n": 128, "tiles": 4, "num_warps": 4, "num_stages": 3}
SCORE_CONFIG_SMALL = {"block_n": 128, "tiles": 1, "num_warps": 4, "num_stages": 1}
SCORE_SMALL_KEYS = 1 << 18  # B * Lk below this takes SCORE_CONFIG_SMALL


def decode_index_scores(q_idx, k_idx, w, q_pos, key_mask=None, hist=None, row_len=None,
                        out=None, config=None) -> torch.Tensor:
    """Index scores of a few queries per sequence over a cache of index keys.

        I[b, t, s] = sum_j w[b, t, j] * ReLU(q_idx[b, t, j] . k_idx[b, s])

    Args:
        q_idx: [B, Lq, H_I, d_I]; k_idx: [B, Lk, d_I] (the index-key cache); w:
            [B, Lq, H_I]; float32 or bfloat16 (fp16 works too), last dimension
            contiguous. Lq <= 16. k_idx may be packed FP8 keys, uint8 [B, Lk, d_I + 4]
            (reference/index_keys.py): d_I + 4 bytes read per key instead of 2 d_I.
        q_pos: int32 [B, Lq], absolute position of each query: key s is visible to
            query t of sequence b iff s <= q_pos[b, t] (and key_mask[b, s]).
        key_mask: optional bool [B, Lk], False for keys that do not exist (padding).
        hist: optional zeroed ``TopkScratch.hist`` (int32 [B * Lq, 8448]); receives the
            level-1 radix histogram of each row (used by :func:`decode_topk`); then
            ``row_len`` (int32 [B * Lq]) receives clamp(q_pos + 1, 0, Lk) too.
        out: optional float32 [B, Lq, Lk] contiguous output.
        config: optional launch shape overriding SCORE_CONFIG (block_n, tiles,
            num_warps, num_stages), for tuning.

    Returns:
        float32 [B, Lq, Lk], -inf where the key is not visible.
    """
    b, lq, h, d = q_idx.shape
    lk = k_idx.shape[1]
    for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("w", w)):
        if x.stride(-1) != 1:
            raise ValueError(f"decode_index_scores: {name} must be contiguous in its last dim")
    if lq > 16:
        raise ValueError(f"decode_index_scores: at most 16 queries per sequence, got {lq}")
    if out is None:
        out = _empty((b, lq, lk), torch.float32, q_idx.device)
    if out.numel() == 0:
        return out
    q_pos = q_pos.to(torch.int32).contiguous()
    km = out if key_mask is None else key_mask.contiguous().view(torch.uint8)
    block_t = triton.next_power_of_2(lq)
    block_h = max(triton.next_power_of_2(h), 16 // block_t)  # tl.dot needs M >= 16
    base = SCORE_CONFIG if b * lk >= SCORE_SMALL_KEYS else SCORE_CONFIG_SMALL
    cfg = dict(base, **(config or {}))
    block_n, tiles = (32, 2) if INTERPRET else (cfg["block_n"], cfg["tiles"])
    if hist is not None and row_len is None:
        raise ValueError("decode_index_scores: hist needs row_len")
    packed = is_packed(k_idx)
    # Packed FP8 keys: the kernel reads the e4m3 bytes and the scales in place.
    keys, k_scale = unpack_index_keys(k_idx) if packed else (k_idx, out[:, 0])
    decode_scores_kernel[(triton.cdiv(lk, block_n * tiles), b)](
        q_idx, keys, k_scale, w, q_pos, km, out, hist if hist is not None else out,
        row_len if row_len is not None else q_pos,
        q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
        keys.stride(0), keys.stride(1), k_scale.stride(0), k_scale.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        km.stride(0) if key_mask is not None else 0,
        out.stride(0), out.stride(1),
        lk,
        LQ=lq, BLOCK_T=block_t, H=h, BLOCK_H=block_h,
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, TILES=tiles,
        HAS_MASK=key_mask is not None, WITH_HIST=hist is not None,
        NAN_HIGH=NAN_RANKS_HIGHEST_DROPPED,
        IEEE=q_idx.dtype == torch.float32,
        UPCAST=INTERPRET and q_idx.dtype == torch.bfloat16,
        KEY_SCALE=packed,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ---------------------------------------------------------------------------------------
# 2-4. Exact multi-program top-k
# ---------------------------------------------------------------------------------------


@triton.jit
def _level1_hist_kernel(S, HIST, ROWLEN, stride_sr, n, HAS_LEN: tl.constexpr,
                        SEG: tl.constexpr, BLOCK: tl.constexpr, NAN_HIGH: tl.constexpr):
    """Level-1 histogram (top 8 bits) of rows that did not come from the score kernel."""
    seg = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    n = tl.minimum(n, tl.load(ROWLEN + r)) if HAS_LEN else n
    s_row = S + r * stride_sr
    hist = tl.zeros([256], tl.int32)
    for start in range(seg * SEG, tl.minimum(seg * SEG + SEG, n), BLOCK):
        _offs, key, live = _load_keys(s_row, start, n, BLOCK, NAN_HIGH)
        hist += tl.histogram((key >> 24) + 128, 256, mask=live)
    tl.atomic_add(HIST + r * (256 + 4096 + 4096) + tl.arange(0, 256), hist, mask=hist > 0,
                  sem="relaxed")


@triton.jit
def _hist_add(h_ptr, bins, cand, BLOCK: tl.constexpr):
    """Add the candidates' ``bins`` [BLOCK] to a global histogram. A block whose
    candidates all fall into one bin (ties) adds its count with one atomic."""
    lo = tl.min(tl.where(cand, bins, 1 << 30), 0)
    hi = tl.max(tl.where(cand, bins, -1), 0)
    count = tl.sum(cand.to(tl.int32), 0)
    if count > 0:
        if lo == hi:
            tl.atomic_add(h_ptr + lo, count, sem="relaxed")
        else:
            tl.atomic_add(h_ptr + bins, tl.full([BLOCK], 1, tl.int32), mask=cand,
                          sem="relaxed")


@triton.jit
def topk_level_kernel(S, HIST, STATE, ROWLEN, stride_sr, n, top_k,
                      LEVEL: tl.constexpr, HAS_LEN: tl.constexpr, SEG: tl.constexpr,
                      BLOCK: tl.constexpr, NAN_HIGH: tl.constexpr):
    """Radix level 2 (LEVEL=2: keys >> 24 == P1, histogram of bits 12..23) or 3
    (LEVEL=3: keys >> 12 == P2, histogram of bits 0..11).

    State per row, written by segment 0: [P1, need1, done] at 0..2 (level 2),
    [P2, need2, done] at 3..5 (level 3). ``done``: the row has at most top_k live keys
    (all are selected, no threshold).
    """
    seg = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    h_row = HIST + r * (256 + 4096 + 4096)
    st = STATE + r * 8
    if LEVEL == 2:
        h1 = tl.load(h_row + tl.arange(0, 256))
        live = tl.sum(h1, 0)
        done = (live <= top_k).to(tl.int32)
        need0 = tl.minimum(live, top_k)
        d, above = _pick(h1, need0, 256)
        prefix = d - 128
        need = need0 - above
    else:
        prev = tl.load(st + tl.arange(0, 4), mask=tl.arange(0, 4) < 3, other=0)
        prefix0 = tl.sum(tl.where(tl.arange(0, 4) == 0, prev, 0), 0)
        need0 = tl.sum(tl.where(tl.arange(0, 4) == 1, prev, 0), 0)
        done = tl.sum(tl.where(tl.arange(0, 4) == 2, prev, 0), 0)
        h2 = tl.load(h_row + 256 + tl.arange(0, 4096))
        d, above = _pick(h2, need0, 4096)
        prefix = prefix0 * 4096 + d
        need = need0 - above
    SHIFT: tl.constexpr = 24 if LEVEL == 2 else 12  # the prefix is key >> SHIFT
    LO: tl.constexpr = 12 if LEVEL == 2 else 0  # the next digit is bits LO .. LO + 11
    out_st = st + (LEVEL - 2) * 3
    h_next = h_row + 256 + (LEVEL - 2) * 4096
    if seg == 0:
        vals = tl.where(tl.arange(0, 4) == 0, prefix,
                        tl.where(tl.arange(0, 4) == 1, need, done))
        tl.store(out_st + tl.arange(0, 4), vals, mask=tl.arange(0, 4) < 3)
    if done == 0:
        n_row = tl.minimum(n, tl.load(ROWLEN + r)) if HAS_LEN else n
        s_row = S + r * stride_sr
        for start in range(seg * SEG, tl.minimum(seg * SEG + SEG, n_row), BLOCK):
            _offs, key, ok = _load_keys(s_row, start, n_row, BLOCK, NAN_HIGH)
            cand = ok & ((key >> SHIFT) == prefix)
            _hist_add(h_next, (key >> LO) & 4095, cand, BLOCK)


@triton.jit
def _threshold(HIST, STATE, r):
    """(T, need_T): the k-th largest key and how many keys equal to T are selected
    (T = INT_MIN, need_T = 0 when the row has at most top_k live keys)."""
    st = STATE + r * 8 + 3
    prev = tl.load(st + tl.arange(0, 4), mask=tl.arange(0, 4) < 3, other=0)
    prefix0 = tl.sum(tl.where(tl.arange(0, 4) == 0, prev, 0), 0)
    need0 = tl.sum(tl.where(tl.arange(0, 4) == 1, prev, 0), 0)
    done = tl.sum(tl.where(tl.arange(0, 4) == 2, prev, 0), 0)
    h3 = tl.load(HIST + r * (256 + 4096 + 4096) + 256 + 4096 + tl.arange(0, 4096))
    d, above = _pick(h3, need0, 4096)
    thr = prefix0 * 4096 + d
    need_t = need0 - above
    thr = tl.where(done != 0, -2147483648, thr)
    need_t = tl.where(done != 0, 0, need_t)
    return thr, need_t


@triton.jit
def topk_count_kernel(S, HIST, STATE, ROWLEN, CNT, stride_sr, n, nseg,
                      HAS_LEN: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr,
                      NAN_HIGH: tl.constexpr):
    """CNT[r, 0, seg]: keys of the segment that are selected for sure (key > T, written
    to the output); CNT[r, 1, seg]: keys equal to T."""
    seg = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    thr, need_t = _threshold(HIST, STATE, r)
    if seg == 0:
        tl.store(STATE + r * 8 + 6 + tl.arange(0, 2),
                 tl.where(tl.arange(0, 2) == 0, thr, need_t))
    n = tl.minimum(n, tl.load(ROWLEN + r)) if HAS_LEN else n
    s_row = S + r * stride_sr
    gt = tl.zeros([], tl.int32)
    eq = tl.zeros([], tl.int32)
    for start in range(seg * SEG, tl.minimum(seg * SEG + SEG, n), BLOCK):
        _offs, key, ok = _load_keys(s_row, start, n, BLOCK, NAN_HIGH)
        above = ok & (key > thr)
        if NAN_HIGH:
            above &= key != 0x7FFFFFFF  # selected NaN keys are dropped (written as -1)
        gt += tl.sum(above.to(tl.int32), 0)
        eq += tl.sum((ok & (key == thr)).to(tl.int32), 0)
    tl.store(CNT + r * 2 * nseg + seg, gt)
    tl.store(CNT + r * 2 * nseg + nseg + seg, eq)


@triton.jit
def topk_write_kernel(S, HIST, STATE, ROWLEN, CNT, OUT, stride_sr, stride_or, n, nseg, top_k,
                      HAS_LEN: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr,
                      NAN_HIGH: tl.constexpr):
    """Write the selection of each segment at its place in the ascending output row."""
    seg = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    fin = tl.load(STATE + r * 8 + 6 + tl.arange(0, 2))
    thr = tl.sum(tl.where(tl.arange(0, 2) == 0, fin, 0), 0)
    need_t = tl.sum(tl.where(tl.arange(0, 2) == 1, fin, 0), 0)
    ties_written = tl.full([], 1, tl.int32)
    if NAN_HIGH:
        ties_written = (thr != 0x7FFFFFFF).to(tl.int32)  # tied NaNs are dropped
    # Counts of the segments before this one, and of all segments.
    gt_before = tl.zeros([], tl.int32)
    eq_before = tl.zeros([], tl.int32)
    gt_all = tl.zeros([], tl.int32)
    eq_all = tl.zeros([], tl.int32)
    for j0 in range(0, nseg, 256):
        j = j0 + tl.arange(0, 256)
        gt = tl.load(CNT + r * 2 * nseg + j, mask=j < nseg, other=0)
        eq = tl.load(CNT + r * 2 * nseg + nseg + j, mask=j < nseg, other=0)
        gt_before += tl.sum(tl.where(j < seg, gt, 0), 0)
        eq_before += tl.sum(tl.where(j < seg, eq, 0), 0)
        gt_all += tl.sum(gt, 0)
        eq_all += tl.sum(eq, 0)
    slot0 = gt_before + tl.minimum(eq_before, need_t) * ties_written
    total = gt_all + tl.minimum(eq_all, need_t) * ties_written
    o_row = OUT + r * stride_or
    n = tl.minimum(n, tl.load(ROWLEN + r)) if HAS_LEN else n
    s_row = S + r * stride_sr
    ties = eq_before
    for start in range(seg * SEG, tl.minimum(seg * SEG + SEG, n), BLOCK):
        offs, key, ok = _load_keys(s_row, start, n, BLOCK, NAN_HIGH)
        eq = ok & (key == thr)
        take = (ok & (key > thr)) | (eq & (ties + tl.cumsum(eq.to(tl.int32), 0) <= need_t))
        write = take
        if NAN_HIGH:
            write &= key != 0x7FFFFFFF
        slot = slot0 + tl.cumsum(write.to(tl.int32), 0) - 1
        tl.store(o_row + slot, offs.to(tl.int32), mask=write)
        slot0 += tl.sum(write.to(tl.int32), 0)
        ties += tl.sum(eq.to(tl.int32), 0)
    # -1 in the unused slots [total, top_k), spread over the segments.
    per = tl.cdiv(top_k, nseg)
    for start in range(seg * per, tl.minimum(seg * per + per, top_k), BLOCK):
        slots = start + tl.arange(0, BLOCK)
        tl.store(o_row + slots, tl.full([BLOCK], -1, tl.int32),
                 mask=(slots >= total) & (slots < tl.minimum(seg * per + per, top_k)))
    # Leave the row's histograms zeroed for the next use (nothing reads them any more).
    per_h = tl.cdiv(256 + 4096 + 4096, nseg)
    h_end = tl.minimum(seg * per_h + per_h, 256 + 4096 + 4096)
    for start in range(seg * per_h, h_end, BLOCK):
        words = start + tl.arange(0, BLOCK)
        tl.store(HIST + r * (256 + 4096 + 4096) + words, tl.zeros([BLOCK], tl.int32),
                 mask=words < h_end)


@dataclass
class TopkScratch:
    """Device scratch of :func:`decode_topk` for ``rows`` rows of width ``width``:
    hist (int32 [rows, 8448]: radix histograms; zero between uses -- allocated zeroed,
    and the last top-k kernel clears it), state (int32 [rows, 8]) and counts (int32
    [rows, 2, segments])."""

    hist: torch.Tensor
    state: torch.Tensor
    counts: torch.Tensor
    seg: int

    @staticmethod
    def allocate(rows: int, width: int, device, seg: int | None = None) -> TopkScratch:
        seg = seg or topk_segment(rows, width)
        nseg = max(1, triton.cdiv(width, seg))
        return TopkScratch(
            hist=torch.zeros((rows, _HIST), dtype=torch.int32, device=device),
            state=_empty((rows, _STATE), torch.int32, device),
            counts=_empty((rows, 2, nseg), torch.int32, device),
            seg=seg,
        )


def topk_segment(rows: int, width: int) -> int:
    """Keys per top-k program: small rows in few programs, long rows over many SMs."""
    if INTERPRET:
        return 64
    # Measured on an H200 (benchmarks/results/decode_h200.log): B=1 x 128K best at
    # 512-1024 keys per program, B=8 x 128K at 2048.
    return max(512, min(4096, triton.next_power_of_2(max(1, rows * width // 512))))


def decode_topk(scores: torch.Tensor, top_k: int, row_len: torch.Tensor | None = None,
                scratch: TopkScratch | None = None, hist_ready: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k of long score rows, many programs per row (radix select).

    Args:
        scores: float32 [..., Lk] (rows contiguous in the last dimension, the leading
            dimensions flattenable to rows). -inf marks keys that cannot be selected.
        top_k: slots per row (> 0).
        row_len: optional int32 [rows]: row r only has keys 0 .. row_len[r] - 1 (later
            ones are not read and not selected), e.g. q_pos + 1 in decode.
        scratch: a :class:`TopkScratch` for these rows (allocated if None). Its ``hist``
            is zero between uses (the last kernel clears it); zeroed here again unless
            ``hist_ready``.
        hist_ready: ``scratch.hist`` already holds the level-1 histograms
            (:func:`decode_index_scores` with ``hist=``).
        out: optional int32 [..., top_k] output, contiguous.

    Returns:
        int32 [..., top_k]: the selected keys ascending, -1 in unused slots, ties to the
        smaller index -- exactly :func:`dsa_compile.reference.select_topk`.
    """
    lk = scores.shape[-1]
    s2 = scores.reshape(-1, lk)
    if s2.stride(-1) != 1:
        raise ValueError("decode_topk: scores must be contiguous in the last dimension")
    rows = s2.shape[0]
    if out is None:
        out = _empty((*scores.shape[:-1], top_k), torch.int32, scores.device)
    o2 = out.view(rows, top_k)
    if rows == 0:
        return out
    if lk == 0:
        return out.fill_(-1)
    if scratch is None:
        scratch = TopkScratch.allocate(rows, lk, scores.device)
        hist_ready = False
    seg = scratch.seg
    nseg = scratch.counts.shape[-1]
    if triton.cdiv(lk, seg) > nseg:
        raise ValueError("decode_topk: scratch was allocated for shorter rows")
    has_len = row_len is not None
    rl = row_len if has_len else o2
    block = min(seg, 64 if INTERPRET else 1024)
    grid = (nseg, rows)
    common = dict(HAS_LEN=has_len, SEG=seg, BLOCK=block, NAN_HIGH=NAN_RANKS_HIGHEST_DROPPED,
                  num_warps=4)
    if not hist_ready:
        scratch.hist.zero_()
        _level1_hist_kernel[grid](s2, scratch.hist, rl, s2.stride(0), lk, **common)
    for level in (2, 3):
        topk_level_kernel[grid](s2, scratch.hist, scratch.state, rl, s2.stride(0), lk, top_k,
                                LEVEL=level, **common)
    topk_count_kernel[grid](s2, scratch.hist, scratch.state, rl, scratch.counts, s2.stride(0),
                            lk, nseg, **common)
    topk_write_kernel[grid](s2, scratch.hist, scratch.state, rl, scratch.counts, o2, s2.stride(0),
                            o2.stride(0), lk, nseg, top_k, **common)
    return out


# ---------------------------------------------------------------------------------------
# 5. Split-K sparse attention + log-sum-exp combine
# ---------------------------------------------------------------------------------------


@triton.jit
def decode_attention_kernel(
    Q, K, V, IDX, OP, LP, OUT, LSE, TICKET,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ig, stride_it,
    stride_ob, stride_oh, stride_ot,
    HKV, TOPK, chunk, scale, softcap,
    LQ: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PER_HEAD_INDICES: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, FUSED: tl.constexpr,
):
    """Partial attention of slots [split * chunk, (split + 1) * chunk) for one KV head:
    OP [B, Hq, Lq, splits, DV] float32 (normalised) and LP [B, Hq, Lq, splits] (lse).

    FUSED: the program that finishes last for its (b, KV head) -- counted in TICKET
    [B * Hkv], zero between steps -- merges that head's splits into OUT / LSE (what
    :func:`decode_combine_kernel` does, without a launch of its own)."""
    split = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    splits = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < R
    heads = g * R + rows
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    lo = split * chunk
    hi = tl.minimum(lo + chunk, TOPK)
    for t in range(LQ):
        # Each query has its own selection: the K/V rows of one slice serve the R
        # query heads of this KV head (the M rows of the dot), not the other queries.
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + t * stride_qt
                    + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BR, BD]
        idx_base = IDX + b * stride_ib + t * stride_it
        if PER_HEAD_INDICES:
            idx_base += g * stride_ig
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            idx = tl.load(idx_base + offs_n, mask=offs_n < hi, other=-1).to(tl.int64)
            valid = idx >= 0
            kt = tl.load(k_base + idx[None, :] * stride_kt + offs_d[:, None],
                         mask=valid[None, :] & (offs_d[:, None] < D), other=0.0)  # [BD, BN]
            s = dot(q, kt, IEEE, UPCAST) * scale
            if SOFTCAP:
                s = softcap * tanh(s / softcap)
            s = tl.where(valid[None, :], s * LOG2E, float("-inf"))  # [BR, BN], log2 units
            p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
            vt = tl.load(v_base + idx[:, None] * stride_vt + offs_dv[None, :],
                         mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BN, BDV]
            acc += dot(p.to(vt.dtype), vt, IEEE, UPCAST)
        out, lse = online_softmax_finish(acc, m_i, l_i)
        prow = ((b * HKV * R + heads) * LQ + t) * splits + split  # [BR]
        tl.store(OP + prow[:, None] * DV + offs_dv[None, :], out,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(LP + prow, lse, mask=row_ok)
    if FUSED:
        # Every thread's partial stores precede the ticket (barrier), which releases
        # them at GPU scope; the last program acquires them and reads past L1 (.cg).
        tl.debug_barrier()
        ticket = TICKET + b * HKV + g
        if tl.atomic_add(ticket, 1, sem="acq_rel") == splits - 1:
            tl.debug_barrier()
            for t in range(LQ):
                prow = ((b * HKV * R + heads) * LQ + t) * splits  # [BR], split 0
                m = tl.full([BLOCK_R], float("-inf"), tl.float32)
                for sp in range(splits):
                    m = tl.maximum(m, tl.load(LP + prow + sp, mask=row_ok,
                                              other=float("-inf"), cache_modifier=".cg"))
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                total = tl.zeros([BLOCK_R], tl.float32)
                acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
                for sp in range(splits):
                    wgt = tl.exp(tl.load(LP + prow + sp, mask=row_ok, other=float("-inf"),
                                         cache_modifier=".cg") - m_safe)  # 0: empty split
                    part = tl.load(OP + (prow + sp)[:, None] * DV + offs_dv[None, :],
                                   mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0,
                                   cache_modifier=".cg")
                    total += wgt
                    acc += part * wgt[:, None]
                res = acc / tl.where(total > 0, total, 1.0)[:, None]
                o_ptrs = (OUT + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot
                          + offs_dv[None, :])
                tl.store(o_ptrs, res.to(OUT.dtype.element_ty),
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV))
                row = (b * HKV * R + heads) * LQ + t
                tl.store(LSE + row, tl.where(total > 0, m_safe + tl.log(
                    tl.where(total > 0, total, 1.0)), float("-inf")), mask=row_ok)
            tl.atomic_xchg(ticket, 0, sem="relaxed")  # ready for the next step / replay


@triton.jit
def decode_combine_kernel(OP, LP, OUT, LSE, stride_ob, stride_oh, stride_ot, HQ,
                          LQ: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                          DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the splits of one (b, head, query) row by log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Lq + t
    t = row % LQ
    bh = row // LQ
    h = bh % HQ
    b = bh // HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    lse = tl.load(LP + row * SPLITS + offs_s, mask=s_ok, other=float("-inf"))  # [BS]
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wgt = tl.exp(lse - m_safe)  # 0 for empty splits
    total = tl.sum(wgt, 0)
    part = tl.load(OP + (row * SPLITS + offs_s[:, None]) * DV + offs_dv[None, :],
                   mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BS, BDV]
    out = tl.sum(part * wgt[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + t * stride_ot + offs_dv
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)),
                                 float("-inf")))


# The split-K merge inside the attention kernel (its last program per KV head, ordered
# by a ticket) instead of decode_combine_kernel's launch: one dependent launch fewer per
# step. Correct on the H100 (tests/test_decode_kernels.py merge forms, 2026-12-07) but
# never faster there (benchmarks/RESULTS.md, decode.py): 0.0159-0.0168 ms against
# 0.0084-0.0088 at B = 1 (32K, 128K), equal at B = 8 (0.0325 / 0.0322): the merging
# program runs after the others instead of beside them. So off.
FUSED_COMBINE = False


def attention_splits(batch: int, hkv: int, top_k: int) -> int:
    """Splits of the selected keys so that B * Hkv * splits programs fill the GPU."""
    if INTERPRET:
        return max(1, min(4, triton.cdiv(top_k, 16)))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.next_power_of_2(triton.cdiv(2 * sms, max(1, batch * hkv)))
    return max(1, min(want, triton.cdiv(top_k, 64), 64))


@dataclass
class AttentionScratch:
    """Partial outputs of the split-K attention: out float32 [B, Hq, Lq, splits, Dv],
    lse float32 [B, Hq, Lq, splits]."""

    out: torch.Tensor
    lse: torch.Tensor
    ticket: torch.Tensor  # int32 [B * Hkv], zeros: programs done per (b, KV head)

    @staticmethod
    def allocate(b, hq, lq, dv, splits, device, hkv=None) -> AttentionScratch:
        return AttentionScratch(
            out=_empty((b, hq, lq, splits, dv), torch.float32, device),
            lse=_empty((b, hq, lq, splits), torch.float32, device),
            ticket=torch.zeros(b * (hkv or hq), dtype=torch.int32, device=device),
        )


def decode_sparse_attention(q, k, v, indices, scale, softcap=0.0, splits=None,
                            scratch: AttentionScratch | None = None, fused: bool | None = None):
    """Sparse attention of a few queries per sequence, split over the selected keys.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; Hq % Hkv == 0; last
            dimension contiguous; float32 / bfloat16 / float16.
        indices: int32/int64 [B, G, Lq, top_k], G = 1 (shared) or Hkv; -1 slots are
            ignored; valid entries distinct and in [0, Lk).
        scale: multiplier of q . k. softcap: if > 0, s -> softcap * tanh(s / softcap).
        splits: slices of the top_k slots (default: enough programs for the GPU).
        scratch: an :class:`AttentionScratch` of matching shape (allocated if None).
        fused: merge the splits inside the attention kernel (its last program per KV
            head) instead of a second launch; None = :data:`FUSED_COMBINE`.

    Returns:
        (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32); a query with no
        valid key gets zeros and lse = -inf (the contract of dsa::sparse_attention).
    """
    b, hq, lq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    r = hq // hkv
    g, top_k = indices.shape[1], indices.shape[-1]
    for name, x in (("q", q), ("k", k), ("v", v), ("indices", indices)):
        if x.stride(-1) != 1:
            raise ValueError(f"decode_sparse_attention: {name} must be contiguous in its "
                             "last dimension")
    out = _empty((b, hq, lq, dv), q.dtype, q.device)
    lse = _empty((b, hq, lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if scratch is None:
        splits = splits or attention_splits(b, hkv, top_k)
        scratch = AttentionScratch.allocate(b, hq, lq, dv, splits, q.device, hkv)
    splits = scratch.lse.shape[-1]
    chunk = triton.cdiv(top_k, splits)
    block_n = 16 if INTERPRET else min(64, max(16, triton.next_power_of_2(chunk)))
    fused = FUSED_COMBINE if fused is None else fused
    if fused and scratch.ticket.numel() < b * hkv:
        raise ValueError("decode_sparse_attention: scratch.ticket needs B * Hkv entries "
                         "(AttentionScratch.allocate(..., hkv=Hkv))")
    decode_attention_kernel[(splits, hkv, b)](
        q, k, v, indices, scratch.out, scratch.lse, out, lse, scratch.ticket,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        hkv, top_k, chunk, float(scale), float(softcap) if softcap > 0 else 1.0,
        LQ=lq, R=r, BLOCK_R=max(16, triton.next_power_of_2(r)),
        D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        PER_HEAD_INDICES=g > 1, SOFTCAP=softcap > 0, IEEE=q.dtype == torch.float32,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, BLOCK_N=block_n, FUSED=fused,
        num_warps=4, num_stages=2,
    )
    if not fused:
        decode_combine_kernel[(b * hq * lq,)](
            scratch.out, scratch.lse, out, lse, out.stride(0), out.stride(1), out.stride(2),
            hq, LQ=lq, SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)), num_warps=4,
        )
    return out, lse


# ---------------------------------------------------------------------------------------
# The whole step
# ---------------------------------------------------------------------------------------


@dataclass
class DecodeScratch:
    """Everything :func:`decode_attention` needs besides its inputs and output, sized by
    shapes alone (so a step can be captured in a CUDA graph and replayed)."""

    scores: torch.Tensor  # float32 [B, Lq, Lk]
    indices: torch.Tensor  # int32 [B, 1, Lq, top_k]
    row_len: torch.Tensor  # int32 [B * Lq]
    topk: TopkScratch
    attn: AttentionScratch

    @staticmethod
    def allocate(q, k, v, k_idx, top_k, splits=None) -> DecodeScratch:
        b, hq, lq, _ = q.shape
        lk = k_idx.shape[1]
        dev = q.device
        splits = splits or attention_splits(b, k.shape[1], top_k)
        return DecodeScratch(
            scores=_empty((b, lq, lk), torch.float32, dev),
            indices=_empty((b, 1, lq, top_k), torch.int32, dev),
            row_len=_empty((b * lq,), torch.int32, dev),
            topk=TopkScratch.allocate(b * lq, lk, dev),
            attn=AttentionScratch.allocate(b, hq, lq, v.shape[-1], splits, dev, k.shape[1]),
        )


def decode_attention(q, k, v, q_idx, k_idx, w, top_k, scale, q_pos, key_mask=None,
                     softcap=0.0, scratch: DecodeScratch | None = None) -> torch.Tensor:
    """One DSA decode (or verification) step: index scores over the cached index keys,
    exact top-k per query, sparse attention over the selected keys.

    Args:
        q: [B, Hq, Lq, D] queries (Lq <= 16; 1 for decode, a few for speculative
            verification); k: [B, Hkv, Lk, D], v: [B, Hkv, Lk, Dv]: the KV cache (Lk its
            capacity; keys past each query's position are never read).
        q_idx: [B, Lq, H_I, d_I], w: [B, Lq, H_I]: the indexer's queries and head weights;
            k_idx: [B, Lk, d_I]: the cache of index keys (float32 or bfloat16), or
            packed FP8 keys uint8 [B, Lk, d_I + 4] (reference/index_keys.py).
        top_k: keys per query (> 0); with fewer visible keys all are taken.
        scale: multiplier of q . k. softcap: optional logit soft-cap (0 = off).
        q_pos: int [B, Lq]: absolute position of each query; query t of sequence b sees
            key s iff s <= q_pos[b, t] and key_mask[b, s] (left padding: False).
        key_mask: optional bool [B, Lk].
        scratch: a :class:`DecodeScratch` from ``DecodeScratch.allocate`` with the same
            shapes (allocated if None; pass one to replay a captured CUDA graph without
            allocations).

    Returns:
        [B, Hq, Lq, Dv] in q's dtype: equal to dense attention when top_k covers every
        visible key; a query that sees no key gets zeros. No host synchronisation.
    """
    b, hq, lq, _ = q.shape
    if scratch is None:
        scratch = DecodeScratch.allocate(q, k, v, k_idx, top_k)
    # The score kernel adds the level-1 histograms to scratch.topk.hist (zero: the last
    # top-k kernel of the previous step cleared it) and writes the rows' lengths.
    scores = decode_index_scores(q_idx, k_idx, w, q_pos, key_mask, hist=scratch.topk.hist,
                                 row_len=scratch.row_len, out=scratch.scores)
    idx = decode_topk(scores, top_k, scratch.row_len, scratch.topk, hist_ready=True,
                      out=scratch.indices.view(b, lq, top_k))
    out, _lse = decode_sparse_attention(q, k, v, idx.view(b, 1, lq, top_k), scale, softcap,
                                        scratch=scratch.attn)
    return out
