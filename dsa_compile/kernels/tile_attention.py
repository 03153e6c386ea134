"""Token-sparse attention for query tiles: the union of neighbouring queries' keys,
gathered once (Triton).

The per-query kernel (:mod:`dsa_compile.kernels.sparse_attention`) gathers top_k K/V
rows for every (query, KV head): with GQA 32/8 that is 1 MB per query per KV head at
top_k 2048 for 4 FLOP per byte, so it is bound by gather bandwidth. Real selections are
local: 16 consecutive queries of SmolLM2 need about 3x the keys of one query, not 16x
(benchmarks/selections.py). So, for a tile of BQ consecutive queries of one index
group:

1. :func:`tile_unions` builds the tile's *union* of selected keys, ascending, and for
   each union key a BQ-bit membership word (bit j: query j of the tile selected it).
   One program per tile ORs the bits into a zeroed per-program scratch row of Lk words,
   then scans it, compacts the set words with a prefix sum and zeroes them again.
2. :func:`tile_attention_fwd_kernel` loads the tile's BQ x R query rows (R = Hq / Hkv
   heads of one KV head, BQ * R ~ 64 rows for the tensor cores), streams the union in
   blocks of BLOCK_N keys -- every union K/V row gathered once for all of them -- and
   masks each row's scores to its query's members inside the online softmax.

Exact for any selection (random included): membership masking gives every query
exactly its own keys; locality only changes how much work a tile does (union size U
against BQ * top_k gathers and BQ x top_k useful scores). Backward is the op's
recompute-based one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from dsa_compile.kernels.common import (
    INTERPRET,
    LOG2E,
    dot,
    kernel_configs,
    online_softmax_finish,
    online_softmax_step,
    tanh,
)

UNION_BYTES = 1 << 30
"""Memory for one chunk of tiles' unions (int32 keys + int32 membership words): tiles
are processed in chunks whose worst-case unions fit it."""


def block_q_for(r: int) -> int:
    """Queries per tile for R query heads per KV head: BQ * R ~ 64 score rows, BQ in
    [2, 32] (membership words are 32 bits)."""
    return max(2, min(32, 64 // max(r, 1)))


LARGE_UNION = 0.6
"""A tile whose union holds more than this share of its queries' slots (BQ * top_k)
runs per query when a per-query kernel is given (``large_unions``). Measured on an H100
(benchmarks/RESULTS.md; R = 4, BQ = 16): random selections at 32K (union 7.0 x top_k)
ran 1.45x faster by tiles, at 128K (11.4 x top_k) 1.20x slower."""

TILE_MIN_QUERIES = 64
"""Calls with fewer queries (decode, short chunks) keep the per-query kernel."""


def use_tiles(lq: int, r: int, bias: torch.Tensor | None) -> bool:
    """Whether :func:`tile_sparse_attention` serves a call of ``lq`` queries with ``r``
    query heads per KV head (a slot bias needs the per-query kernel)."""
    return bias is None and lq >= TILE_MIN_QUERIES


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs before the kernels write."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def tile_union_kernel(
    IDX, SCRATCH, UIDX, UBITS, UCOUNT,
    stride_ib, stride_ig, stride_it,
    stride_ub, stride_ug, stride_ut,
    stride_cb, stride_cg,
    G, LQ, TOPK, NTILES, NWORK, LK,
    BQ: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    scratch = SCRATCH + pid.to(tl.int64) * LK
    for work in range(pid, NWORK, tl.num_programs(0)):
        tile = work % NTILES
        bg = work // NTILES
        b = (bg // G).to(tl.int64)
        g = (bg % G).to(tl.int64)
        hi = tl.full([], 0, tl.int32)  # one past the largest selected key
        for j in range(BQ):
            t = (tile * BQ + j).to(tl.int64)
            row = IDX + b * stride_ib + g * stride_ig + t * stride_it
            slots = tl.where(t < LQ, TOPK, 0)  # the last tile may be partial
            for s in range(0, slots, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                idx = tl.load(row + offs, mask=offs < slots, other=-1)
                ok = idx >= 0
                tl.atomic_or(scratch + idx, tl.full([BLOCK], 1, tl.int32) << j, mask=ok,
                             sem="relaxed")
                hi = tl.maximum(hi, tl.max(tl.where(ok, idx + 1, 0), 0).to(tl.int32))
        tl.debug_barrier()
        base = b * stride_ub + g * stride_ug + tile.to(tl.int64) * stride_ut
        count = tl.full([], 0, tl.int32)
        for s in range(0, hi, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            # .cg: read the words the atomics wrote in L2, never a stale L1 line.
            bits = tl.load(scratch + offs, mask=offs < hi, other=0, cache_modifier=".cg")
            hit = bits != 0
            pos = count + tl.cumsum(hit.to(tl.int32), 0) - 1
            tl.store(UIDX + base + pos, offs, mask=hit)
            tl.store(UBITS + base + pos, bits, mask=hit)
            tl.store(scratch + offs, tl.zeros([BLOCK], tl.int32), mask=hit)
            count += tl.sum(hit.to(tl.int32), 0)
        tl.store(UCOUNT + b * stride_cb + g * stride_cg + tile, count)
        tl.debug_barrier()


def tile_unions(indices: torch.Tensor, lk: int, block_q: int) -> tuple[torch.Tensor, ...]:
    """The union of each tile's selections and its membership words.

    Args:
        indices: int32/int64 [B, G, Lq, top_k], last dimension contiguous; -1 slots are
            ignored; valid entries distinct per row and in [0, lk).
        lk: number of keys. block_q: queries per tile (<= 32).

    Returns:
        (keys int32 [B, G, T, U], bits int32 [B, G, T, U], count int32 [B, G, T]) with
        T = ceil(Lq / block_q), U = min(block_q * top_k, lk): tile i's union keys
        ascending in keys[..., i, :count[i]], bit j of bits set where query
        i * block_q + j selected the key. Slots past count are not written.
    """
    b, g, lq, top_k = indices.shape
    n_tiles = triton.cdiv(lq, block_q)
    cap = max(1, min(block_q * top_k, lk))
    keys = torch.empty((b, g, n_tiles, cap), dtype=torch.int32, device=indices.device)
    bits = torch.empty_like(keys)
    count = _empty((b, g, n_tiles), torch.int32, indices.device)
    work = b * g * n_tiles
    if INTERPRET:
        programs, block = min(work, 4), 64
    else:
        sms = torch.cuda.get_device_properties(indices.device).multi_processor_count
        programs, block = min(work, 4 * sms), 1024
    scratch = torch.zeros((programs, max(lk, 1)), dtype=torch.int32, device=indices.device)
    tile_union_kernel[(programs,)](
        indices, scratch, keys, bits, count,
        indices.stride(0), indices.stride(1), indices.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        count.stride(0), count.stride(1),
        g, lq, top_k, n_tiles, work, max(lk, 1),
        BQ=block_q, BLOCK=block, num_warps=4,
    )
    return keys, bits, count


def _configs():
    return kernel_configs(
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
         for bn in (32, 64, 128)
         for w in (4, 8)
         for s in (1, 2, 3)])


@triton.autotune(configs=_configs(), key=["R", "BQ", "D", "DV", "SOFTCAP"])
@triton.jit
def tile_attention_fwd_kernel(
    Q, K, V, UIDX, UBITS, UCOUNT, OUT, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ub, stride_ug, stride_ut,
    stride_cb, stride_cg,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh, stride_lt,
    HKV, LQ, scale, softcap, union_limit,
    R: tl.constexpr, BQ: tl.constexpr, BLOCK_M: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PER_HEAD_INDICES: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1)
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)  # row = query j of the tile * R + head r of the group
    qj = rows // R
    t = tile * BQ + qj
    row_ok = (rows < BQ * R) & (t < LQ)
    heads = g * R + rows % R
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + t[:, None] * stride_qt
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)  # [BM, BD]

    ig = g if PER_HEAD_INDICES else 0
    u_base = b * stride_ub + ig * stride_ug + tile * stride_ut
    n = tl.load(UCOUNT + b * stride_cb + ig * stride_cg + tile)
    ours = n <= union_limit  # else the per-query kernel serves this tile
    n = tl.where(ours, n, 0)
    row_ok = row_ok & (tl.zeros([BLOCK_M], tl.int32) + ours.to(tl.int32) != 0)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = offs_n < n
        idx = tl.load(UIDX + u_base + offs_n, mask=ok, other=0).to(tl.int64)
        bits = tl.load(UBITS + u_base + offs_n, mask=ok, other=0)
        kt = tl.load(k_base + idx[None, :] * stride_kt + offs_d[:, None],
                     mask=ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BD, BN]
        s = dot(q, kt, IEEE, UPCAST) * scale
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        member = ((bits[None, :] >> qj[:, None].to(tl.int32)) & 1) != 0  # [BM, BN]
        s = tl.where(member & row_ok[:, None], s * LOG2E, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        vt = tl.load(v_base + idx[:, None] * stride_vt + offs_dv[None, :],
                     mask=ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BN, BDV]
        acc += dot(p.to(vt.dtype), vt, IEEE, UPCAST)

    out, lse = online_softmax_finish(acc, m_i, l_i)
    o_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + t[:, None] * stride_ot
    tl.store(o_ptrs + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * stride_lb + heads * stride_lh + t * stride_lt, lse, mask=row_ok)


def tile_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    block_q: int | None = None,
    large_unions: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dsa_compile.kernels.sparse_attention` (no slot bias) by query tiles.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; last dimension
            contiguous. indices: int32/int64 [B, G, Lq, top_k], G = 1 or Hkv, last
            dimension contiguous, -1 slots ignored, valid entries distinct per row.
        block_q: queries per tile (default :func:`block_q_for`), at most 32.
        large_unions: the per-query kernel's launcher ``(q, k, v, indices, scale,
            softcap, None, out, lse, count, block_q, limit)``, run for the tiles whose
            union exceeds :data:`LARGE_UNION` of their slots (decided on the device);
            None: every tile by tiles.

    Returns:
        (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32), as the per-query
        kernel: a query with no valid key gets zeros and lse = -inf.
    """
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    r = hq // hkv
    g, top_k = indices.shape[1], indices.shape[-1]
    bq = block_q or block_q_for(r)
    if not 1 <= bq <= 32:
        raise ValueError(f"tile_sparse_attention: block_q must be in [1, 32], got {bq}")
    out = _empty((b, hq, lq, dv), q.dtype, q.device)
    lse = _empty((b, hq, lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    cap = max(1, min(bq * top_k, lk))
    limit = int(LARGE_UNION * bq * top_k) if large_unions is not None else cap
    tiles_per_chunk = max(1, UNION_BYTES // (8 * b * g * cap))
    rows_per_chunk = tiles_per_chunk * bq
    for s in range(0, lq, rows_per_chunk):
        rows = slice(s, min(lq, s + rows_per_chunk))
        ic = indices[:, :, rows]
        keys, bits, count = tile_unions(ic, lk, bq)
        qc, oc, lc = q[:, :, rows], out[:, :, rows], lse[:, :, rows]
        grid = (keys.shape[2], b * hkv)
        tile_attention_fwd_kernel[grid](
            qc, k, v, keys, bits, count, oc, lc,
            qc.stride(0), qc.stride(1), qc.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            count.stride(0), count.stride(1),
            oc.stride(0), oc.stride(1), oc.stride(2),
            lc.stride(0), lc.stride(1), lc.stride(2),
            hkv, qc.shape[2], float(scale), float(softcap) if softcap > 0 else 1.0, limit,
            R=r, BQ=bq, BLOCK_M=max(16, triton.next_power_of_2(bq * r)),
            D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
            BLOCK_DV=max(16, triton.next_power_of_2(dv)),
            PER_HEAD_INDICES=g > 1, SOFTCAP=softcap > 0,
            IEEE=q.dtype == torch.float32,
            UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        )
        if large_unions is not None:
            large_unions(qc, k, v, ic, scale, softcap, None, oc, lc, count, bq, limit)
    return out, lse
