"""Token-sparse attention forward in Triton.

One program owns one query t of one KV head g and computes all R = Hq / Hkv query
heads of that group at once: the R query rows (padded to at least 16 for the tensor
cores) are multiplied against BLOCK_N gathered keys, so every gathered K/V row is read
once and used by the whole group. Online softmax in float32 (exp2 domain), optional
logit soft-cap, and the log-sum-exp is written for the backward pass.

Query t is the fastest grid axis, so the programs in flight at a time share a KV head
and neighbouring queries: their gathered rows come from one head's K/V, which stays in
L2. Each (query, KV head) must still fetch top_k rows of K and V (2 * top_k * D * 2
bytes in bf16), so for small R the kernel is bound by gather bandwidth, not by FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_compile.kernels import tile_attention
from dsa_compile.kernels.common import (
    INTERPRET,
    LOG2E,
    dot,
    kernel_configs,
    online_softmax_finish,
    online_softmax_step,
    tanh,
)


def _configs():
    return kernel_configs(
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
        [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
         for bn in (32, 64, 128)
         for w in (4, 8)
         for s in (2, 3, 4)
         if not (bn == 128 and s == 4)])


def _prune(configs, named_args, **kwargs):
    """Drop key blocks much longer than the index list (they would only load -1 slots)."""
    top_k = named_args["TOPK"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(top_k))]
    return kept or configs[:1]


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs before the kernel writes."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.autotune(
    configs=_configs(),
    key=["R", "D", "DV", "TOPK", "SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def sparse_attention_fwd_kernel(
    Q, K, V, IDX, BIAS, OUT, LSE, COUNT,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ig, stride_it,
    stride_bb, stride_bg, stride_bt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh, stride_lt,
    stride_cb, stride_cg,
    HKV, TOPK, scale, softcap, union_limit,
    R: tl.constexpr, BLOCK_R: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PER_HEAD_INDICES: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    TILE_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1)
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)

    rows = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < R
    heads = g * R + rows

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + t * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BR, BD]

    idx_base = IDX + b * stride_ib + t * stride_it
    bias_base = BIAS + b * stride_bb + t * stride_bt
    if PER_HEAD_INDICES:
        idx_base += g * stride_ig
        bias_base += g * stride_bg
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    slots = TOPK
    if TILE_Q > 0:
        # Beside the tile kernel: this query is ours only if its tile's union of keys
        # (COUNT, [B, G, tiles]) is too large for the tile kernel to pay.
        ig = g if PER_HEAD_INDICES else 0
        ours = tl.load(COUNT + b * stride_cb + ig * stride_cg + t // TILE_Q) > union_limit
        slots = tl.where(ours, TOPK, 0)
        row_ok = row_ok & (tl.zeros([BLOCK_R], tl.int32) + ours.to(tl.int32) != 0)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for start in range(0, slots, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_base + offs_n, mask=offs_n < TOPK, other=-1).to(tl.int64)  # [BN]
        valid = idx >= 0
        kt = tl.load(
            k_base + idx[None, :] * stride_kt + offs_d[:, None],
            mask=valid[None, :] & (offs_d[:, None] < D), other=0.0,
        )  # [BD, BN]
        s = dot(q, kt, IEEE, UPCAST) * scale
        if SOFTCAP:
            s = softcap * tanh(s / softcap)
        if HAS_BIAS:  # the additive mask of each selected key, gathered per slot
            s += tl.load(bias_base + offs_n, mask=offs_n < TOPK, other=0.0)[None, :]
        s = tl.where(valid[None, :], s * LOG2E, float("-inf"))  # [BR, BN], log2 units
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        vt = tl.load(
            v_base + idx[:, None] * stride_vt + offs_dv[None, :],
            mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )  # [BN, BDV]
        acc += dot(p.to(vt.dtype), vt, IEEE, UPCAST)

    out, lse = online_softmax_finish(acc, m_i, l_i)
    o_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * stride_lb + heads * stride_lh + t * stride_lt, lse, mask=row_ok)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    bias: torch.Tensor | None = None,
    tiles: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over only its selected keys (Triton).

    Runs by query tiles (:mod:`dsa_compile.kernels.tile_attention`: each tile's union of
    keys gathered once) where :func:`~dsa_compile.kernels.tile_attention.use_tiles`
    says that is faster, else one program per (query, KV head); ``tiles`` forces one.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; Hq % Hkv == 0; any
            strides with the last dimension contiguous. float32/bfloat16/float16.
        indices: int32/int64 [B, G, Lq, top_k], G = 1 (shared by all heads) or Hkv;
            -1 slots are ignored; valid entries distinct and in [0, Lk).
        scale: multiplier of q . k.
        softcap: if > 0, logits become softcap * tanh(logits / softcap).
        bias: optional float32 [B, G, Lq, top_k], added to the score of each slot's key.

    Returns:
        (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32). A query with no
        valid key gets zeros and lse = -inf.
    """
    b, hq, lq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    r = hq // hkv
    for name, t in (("q", q), ("k", k), ("v", v), ("indices", indices)):
        if t.stride(-1) != 1:
            raise ValueError(f"sparse_attention: {name} must be contiguous in its last dimension")
    if tiles is None:
        tiles = tile_attention.use_tiles(lq, r, bias)
    if tiles:
        if bias is not None:
            raise ValueError("sparse_attention: the tile kernel takes no slot bias")
        # Tiles whose union is too large (near-random selections) run per query instead,
        # decided on the device per tile: no host sync, so it captures in a CUDA graph.
        return tile_attention.tile_sparse_attention(q, k, v, indices, scale, softcap,
                                                    large_unions=_rows)
    out = _empty((b, hq, lq, dv), q.dtype, q.device)
    lse = _empty((b, hq, lq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    _rows(q, k, v, indices, scale, softcap, bias, out, lse)
    return out, lse


def _rows(q, k, v, indices, scale, softcap, bias, out, lse, count=None, tile_q=0, limit=0):
    """Launch the per-query kernel into out / lse; with ``count`` ([B, G, tiles] union
    sizes of tiles of ``tile_q`` queries), only for the queries of tiles whose union
    exceeds ``limit`` (the tile kernel writes the others)."""
    b, hq, lq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    r = hq // hkv
    g, top_k = indices.shape[1], indices.shape[-1]
    grid = (lq, b * hkv)
    if bias is not None:
        bias = bias.float().expand(indices.shape).contiguous()
    bs = bias if bias is not None else indices  # any tensor: unused without HAS_BIAS
    cnt = count if count is not None else lse  # any tensor: unused without TILE_Q
    sparse_attention_fwd_kernel[grid](
        q, k, v, indices, bs, out, lse, cnt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        bs.stride(0), bs.stride(1), bs.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        cnt.stride(0), cnt.stride(1),
        hkv, top_k, float(scale), float(softcap) if softcap > 0 else 1.0, limit,
        R=r, BLOCK_R=max(16, triton.next_power_of_2(r)),
        D=d, DV=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        PER_HEAD_INDICES=g > 1, SOFTCAP=softcap > 0, HAS_BIAS=bias is not None,
        IEEE=q.dtype == torch.float32,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        TILE_Q=tile_q if count is not None else 0,
    )
