"""Token-sparse attention over selected keys: the pure PyTorch spec.

For query t of head h (KV head g = h // (Hq // Hkv)), with S_t the valid entries of
``indices[b, g or 0, t, :]`` (entries of -1 are ignored):

    s_j  = scale * q[t] . k[j]          (then softcap * tanh(s_j / softcap) if softcap > 0)
    out  = sum_{j in S_t} softmax(s)_j v[j],     lse = logsumexp_{j in S_t} s_j

A query with no valid key gets out = 0 and lse = -inf. Chunked over queries: memory
is O(chunk * top_k * D), never O(Lq * Lk).

Two evaluations of the same formula, picked per call: gathering the selected K/V rows
(long keys), or, when the keys the chunk can select are few (at most
``DENSE_GEMM_RATIO * top_k``), dense GEMMs over them with every unselected key masked --
far faster on CPU at short length, where row gathers cost more than the extra math.
"""

from __future__ import annotations

import torch

# Elements of the gathered [B, Hkv, C, top_k, D] keys (or of the [B, Hq, C, keys] scores
# on the GEMM path) kept in memory at once.
_CHUNK_ELEMENTS = 1 << 23
DENSE_GEMM_RATIO = 8


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, Lk, D], idx: [B, G, C, K] (clamped, >= 0) -> [B, Hkv, C, K, D]."""
    b, hkv, lk, d = x.shape
    g, c, k = idx.shape[1:]
    idx = idx.expand(b, hkv, c, k) if g == 1 else idx
    base = (torch.arange(b, device=x.device)[:, None] * hkv + torch.arange(hkv, device=x.device))
    flat = (base[:, :, None, None] * lk + idx).reshape(-1)
    return x.reshape(b * hkv * lk, d).index_select(0, flat).view(b, hkv, c, k, d)


def _chunk_probs(q, k, indices, scale, softcap):
    """Scores for one chunk. q: [B, Hkv, R, C, D] -> (scores [B,Hkv,R,C,K], valid, kg)."""
    valid = indices >= 0  # [B, G, C, K]
    kg = _gather_rows(k, indices.clamp_min(0).long())
    s = torch.einsum("bgrcd,bgckd->bgrck", q, kg) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    return s, valid


def _softmax_out(s: torch.Tensor, v_rows: torch.Tensor, eq: str):
    """(out, lse) from masked scores ``s`` [..., keys] (-inf = not attended)."""
    lse = torch.logsumexp(s, dim=-1)
    # Clamping -inf (no valid key) keeps exp(-inf - lse) at 0 instead of NaN.
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return torch.einsum(eq, p, v_rows), lse


def _chunk_gathered(q, k, v, idx, scale, softcap):
    """q [B, Hkv, R, C, D], idx [B, G, C, K]: gather the K selected rows of k and v."""
    s, _ = _chunk_probs(q, k, idx, scale, softcap)
    vg = _gather_rows(v, idx.clamp_min(0).long())
    return _softmax_out(s, vg, "bgrck,bgcke->bgrce")


def _reach(indices: torch.Tensor, lk: int) -> int:
    """1 + the largest selected key (0 if none); ``lk`` when tracing, where the value
    is data-dependent and unknowable."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(indices) or indices.numel() == 0:
        return lk if indices.numel() else 0
    return int(indices.max()) + 1


def _chunk_dense(q, k, v, idx, scale, softcap):
    """Same result as :func:`_chunk_gathered` from dense GEMMs over the keys up to the
    chunk's last selected one, every unselected key masked to -inf."""
    reach = _reach(idx, k.shape[2])
    kr, vr = k[:, :, :reach], v[:, :, :reach]
    s = torch.einsum("bgrcd,bgkd->bgrck", q, kr) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    slot = torch.where(idx >= 0, idx, reach).long()  # -1 slots land in a spare column
    chosen = torch.zeros((*idx.shape[:-1], reach + 1), dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, slot, True)
    s = s.masked_fill(~chosen[:, :, None, :, :reach], float("-inf"))  # G broadcasts to Hkv
    return _softmax_out(s, vr, "bgrck,bgke->bgrce")


def _query_chunk(b: int, hkv: int, k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, b * hkv * k * d))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over only its selected keys.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; Hq % Hkv == 0.
        indices: int [B, G, Lq, top_k] with G in {1, Hkv}; -1 marks an unused slot.
            Valid entries of a row must be distinct and in [0, Lk).
        scale: multiplier of q . k.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).

    Returns:
        out [B, Hq, Lq, Dv] in q's dtype (zeros for a query with no valid key) and
        lse [B, Hq, Lq] float32 (-inf for such a query). Differentiable in q, k, v.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    r = hq // hkv
    topk = indices.shape[-1]
    qf = q.float().view(b, hkv, r, lq, d)
    kf, vf = k.float(), v.float()
    # Keys past the last selected one are never needed (causal rows select a prefix).
    reach = _reach(indices, k.shape[2])
    if reach <= DENSE_GEMM_RATIO * topk:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * hq * max(reach, 1)))
    else:
        chunk = _query_chunk(b, hkv, topk, max(d, v.shape[-1]))
    # Outputs are allocated once and filled per chunk: small long-lived allocations between
    # the per-chunk buffers would fragment the heap and grow RSS chunk after chunk.
    out = q.new_empty((b, hkv, r, lq, v.shape[-1]), dtype=torch.float32)
    lse = q.new_empty((b, hkv, r, lq), dtype=torch.float32)
    for s0 in range(0, lq, chunk):
        idx = indices[:, :, s0 : s0 + chunk]
        qc = qf[:, :, :, s0 : s0 + chunk]
        if reach <= DENSE_GEMM_RATIO * topk:
            o, l_ = _chunk_dense(qc, kf, vf, idx, scale, softcap)
        else:
            o, l_ = _chunk_gathered(qc, kf, vf, idx, scale, softcap)
        out[:, :, :, s0 : s0 + chunk] = o
        lse[:, :, :, s0 : s0 + chunk] = l_
    out = out.reshape(b, hq, lq, v.shape[-1])
    lse = lse.reshape(b, hq, lq)
    return out.to(q.dtype), lse
