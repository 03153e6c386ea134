"""Token-sparse attention over selected keys: the pure PyTorch spec.

For query t of head h (KV head g = h // (Hq // Hkv)), with S_t the valid entries of
``indices[b, g or 0, t, :]`` (entries of -1 are ignored):

    s_j  = scale * q[t] . k[j]          (then softcap * tanh(s_j / softcap) if softcap > 0)
    out  = sum_{j in S_t} softmax(s)_j v[j],     lse = logsumexp_{j in S_t} s_j

A key listed twice in a row counts once, on every path (the op contract asks for distinct
entries; the mask paths cannot count a key twice, so the gather path drops repeats).
A query with no valid key gets out = 0 and lse = -inf. Chunked over queries: memory
is O(chunk * top_k * D), never O(Lq * Lk).

Three evaluations of the same formula, picked per call: gathering the selected K/V rows
(long keys), or, when the keys the chunk can select are few, attention over all of them
with every unselected key masked to -inf -- through PyTorch's fused CPU attention
kernel when no gradient or softcap is needed (up to ``FUSED_RATIO * top_k`` keys), else
plain GEMMs (up to ``DENSE_GEMM_RATIO * top_k``). At short length row gathers cost more
than the extra math: SmolLM2 shape, L = 2048, top_k = 256, one thread: 0.96 s gathered,
0.12 s fused.
"""

from __future__ import annotations

import torch

# Elements of the gathered [B, Hkv, C, top_k, D] keys (or of the [B, Hq, C, keys] scores
# on the GEMM path) kept in memory at once.
_CHUNK_ELEMENTS = 1 << 23
DENSE_GEMM_RATIO = 8
FUSED_RATIO = 16  # the fused CPU kernel beats row gathers up to here (measured, SmolLM2 shape)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, Lk, D], idx: [B, G, C, K] (clamped, >= 0) -> [B, Hkv, C, K, D]: only the
    selected rows are copied, whatever x's strides (a cache view: not the whole cache).
    Few ops: a decode step calls this twice per layer."""
    b, hkv, lk, d = x.shape
    c, k = idx.shape[2:]
    if not x.is_contiguous():
        rows_b = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        return x[rows_b, torch.arange(hkv, device=x.device).view(1, hkv, 1, 1), idx]
    # One index_select over the flat [B * Hkv * Lk] rows (G = 1 broadcasts over Hkv).
    base = torch.arange(0, b * hkv * lk, lk, device=x.device).view(b, hkv, 1, 1)
    return x.view(b * hkv * lk, d).index_select(0, (base + idx).view(-1)).view(b, hkv, c, k, d)


def _chunk_scores(q, k, indices, scale, softcap, bias=None):
    """Scores of one chunk over its gathered keys: q [B, Hkv, R, C, D], indices
    [B, G, C, K], bias [B, G, C, K] or None -> [B, Hkv, R, C, K], -inf in -1 slots."""
    kg = gather_rows(k, indices.clamp_min(0).long())
    s = torch.einsum("bgrcd,bgckd->bgrck", q, kg) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias[:, :, None]
    return s.masked_fill((indices < 0)[:, :, None], float("-inf"))


def _drop_repeats(idx: torch.Tensor) -> torch.Tensor:
    """idx [..., K] with every repeat of a key after its first slot set to -1."""
    from torch._subclasses.fake_tensor import is_fake

    if idx.shape[-1] < 2:
        return idx
    if not is_fake(idx):
        # A valid entry can only repeat one before it if it does not exceed their maximum:
        # ascending rows (indexer_topk's output) pass this O(K) test and are returned as is.
        seen = torch.cummax(idx, dim=-1).values[..., :-1]
        if not bool(((idx[..., 1:] >= 0) & (idx[..., 1:] <= seen)).any()):
            return idx
    ordered, slot = torch.sort(idx, dim=-1, stable=True)  # equal keys keep slot order
    repeat = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    repeat = torch.cat([torch.zeros_like(repeat[..., :1]), repeat], dim=-1)
    return idx.masked_fill(torch.zeros_like(repeat).scatter_(-1, slot, repeat), -1)


def _softmax_out(s: torch.Tensor, v_rows: torch.Tensor, eq: str):
    """(out, lse) from masked scores ``s`` [..., keys] (-inf = not attended)."""
    lse = torch.logsumexp(s, dim=-1)
    # Clamping -inf (no valid key) keeps exp(-inf - lse) at 0 instead of NaN.
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return torch.einsum(eq, p, v_rows), lse


def _chunk_gathered(q, k, v, idx, scale, softcap, bias=None):
    """q [B, Hkv, R, C, D], idx [B, G, C, K]: gather the K selected rows of k and v."""
    idx = _drop_repeats(idx)  # the mask paths count a repeated key once; so must this one
    s = _chunk_scores(q, k, idx, scale, softcap, bias)
    vg = gather_rows(v, idx.clamp_min(0).long())
    return _softmax_out(s, vg, "bgrck,bgcke->bgrce")


def _reach(indices: torch.Tensor, lk: int) -> int:
    """1 + the largest selected key (0 if none); ``lk`` when tracing, where the value
    is data-dependent and unknowable."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(indices) or indices.numel() == 0:
        return lk if indices.numel() else 0
    return int(indices.max()) + 1


def _slot_bias(idx, bias, reach):
    """Per-slot ``bias`` [B, G, C, K] scattered to key columns: [B, G, C, reach]."""
    slot = torch.where(idx >= 0, idx, reach).long()
    full = torch.zeros((*idx.shape[:-1], reach + 1), dtype=torch.float32, device=idx.device)
    return full.scatter_(-1, slot, bias.float())[..., :reach]


def _chunk_dense(q, k, v, idx, scale, softcap, bias=None):
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
    if bias is not None:
        s = s + _slot_bias(idx, bias, reach)[:, :, None]
    s = s.masked_fill(~chosen[:, :, None, :, :reach], float("-inf"))  # G broadcasts to Hkv
    return _softmax_out(s, vr, "bgrck,bgke->bgrce")


def _chunk_fused(q, k_rep, v_rep, idx, scale, bias=None):
    """:func:`_chunk_dense` through PyTorch's fused CPU attention kernel (no softcap, no
    autograd): q [B, Hkv, R, C, D], k_rep / v_rep [B, Hq, Lk, D] (KV heads repeated)."""
    b, hkv, r, c, d = q.shape
    reach = _reach(idx, k_rep.shape[2])
    if reach == 0:  # no query of the chunk has a key (the kernel cannot take 0 keys)
        return (q.new_zeros((b, hkv, r, c, v_rep.shape[-1])),
                q.new_full((b, hkv, r, c), float("-inf")))
    slot = torch.where(idx >= 0, idx, reach).long()
    mask = torch.full((*idx.shape[:-1], reach + 1), float("-inf"), device=idx.device)
    mask = mask.scatter_(-1, slot, 0.0)[..., :reach]  # [B, G, C, reach]
    if bias is not None:
        mask = mask + _slot_bias(idx, bias, reach)
    if idx.shape[1] > 1:  # per-KV-head selections: one mask per query head
        mask = mask[:, :, None].expand(b, hkv, r, c, reach).reshape(b, hkv * r, c, reach)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(b, hkv * r, c, d), k_rep[:, :, :reach], v_rep[:, :, :reach],
        attn_mask=mask, scale=scale)
    # The kernel gives out = 0, lse = 0 for a row without keys; the contract says -inf.
    empty = ~(idx >= 0).any(-1)[:, :, None].expand(b, hkv, r, c)  # G broadcasts to Hkv
    return out.view(b, hkv, r, c, -1), lse.view(b, hkv, r, c).masked_fill(empty, float("-inf"))


def _use_fused(q, k, v, indices, softcap) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (softcap == 0 and q.device.type == "cpu" and not grad
            and q.shape[-1] == v.shape[-1]  # the kernel wants one head size for q, k, v
            and not any(is_fake(t) for t in (q, k, v, indices)))


def query_chunk(b: int, hkv: int, k: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, b * hkv * k * d))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over only its selected keys.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; Hq % Hkv == 0.
        indices: int [B, G, Lq, top_k] with G in {1, Hkv}; -1 marks an unused slot.
            Valid entries of a row must be in [0, Lk) and should be distinct; a key
            listed twice counts once.
        scale: multiplier of q . k.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        bias: optional float [B, G, Lq, top_k], added to the (soft-capped) score of the
            key in the same slot of ``indices`` (an additive attention mask, gathered).

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
    # Few queries (decode) gather fewer rows than the dense paths read (and repeat per
    # query head): gather whenever that is so.
    few = lq * topk < reach
    fused = not few and reach <= FUSED_RATIO * topk and _use_fused(q, k, v, indices, softcap)
    gemm = not few and not fused and reach <= DENSE_GEMM_RATIO * topk
    if fused or gemm:
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * hq * max(reach, 1)))
    else:
        chunk = query_chunk(b, hkv, topk, max(d, v.shape[-1]))
    # Outputs are allocated once and filled per chunk: small long-lived allocations between
    # the per-chunk buffers would fragment the heap and grow RSS chunk after chunk.
    out = q.new_empty((b, hkv, r, lq, v.shape[-1]), dtype=torch.float32)
    lse = q.new_empty((b, hkv, r, lq), dtype=torch.float32)
    if fused:
        k_rep = kf[:, :, None, :reach].expand(b, hkv, r, reach, d).reshape(b, hq, reach, d)
        dv = v.shape[-1]
        v_rep = vf[:, :, None, :reach].expand(b, hkv, r, reach, dv).reshape(b, hq, reach, dv)
    for s0 in range(0, lq, chunk):
        idx = indices[:, :, s0 : s0 + chunk]
        qc = qf[:, :, :, s0 : s0 + chunk]
        bc = None if bias is None else bias[:, :, s0 : s0 + chunk].float()
        if fused:
            o, l_ = _chunk_fused(qc, k_rep, v_rep, idx, scale, bc)
        elif gemm:
            o, l_ = _chunk_dense(qc, kf, vf, idx, scale, softcap, bc)
        else:
            o, l_ = _chunk_gathered(qc, kf, vf, idx, scale, softcap, bc)
        out[:, :, :, s0 : s0 + chunk] = o
        lse[:, :, :, s0 : s0 + chunk] = l_
    out = out.reshape(b, hq, lq, v.shape[-1])
    lse = lse.reshape(b, hq, lq)
    return out.to(q.dtype), lse
