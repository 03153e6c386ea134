"""Dense attention with the same arguments as the DSA ops: the exactness baseline."""

from __future__ import annotations

import torch

from dsa_compile.reference.indexer import visible_mask


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    q_offset: int = 0,
    key_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float32. q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], v: [B, Hkv, Lk, Dv].

    Query t sits at absolute position q_offset + t. Returns (out [B, Hq, Lq, Dv] in q's
    dtype, lse [B, Hq, Lq] float32); a query with no visible key gets zeros and -inf.
    O(Lq * Lk) memory: for tests and short sequences.
    """
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    vis = visible_mask(lq, k.shape[2], q_offset, causal, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return torch.einsum("bhqk,bhkd->bhqd", p, vf).to(q.dtype), lse
