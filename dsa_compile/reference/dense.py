"""Dense attention with the same arguments as the DSA ops: the exactness baseline."""

from __future__ import annotations

import torch

from dsa_compile.reference.indexer import visible_mask

MASKED_BIAS = -1e4
"""An additive mask value at or below this hides the key: its softmax weight underflows
to exactly 0 in float32 next to any unmasked key (the passes use the same bound)."""


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = True,
    q_offset: int = 0,
    key_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float32. q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], v: [B, Hkv, Lk, Dv].

    Query t sits at absolute position q_offset + t. ``mask`` (bool [B or 1, Lq, Lk], True =
    may attend) and ``bias`` (float [B or 1, Lq, Lk], added to the scores as the model adds
    its additive mask) are general masks shared by all heads. Returns (out [B, Hq, Lq, Dv]
    in q's dtype, lse [B, Hq, Lq] float32); a query with no visible key gets zeros, -inf.
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
    if bias is not None:
        s = s + bias[:, None].float()
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.clamp_min(torch.finfo(torch.float32).min)[..., None])
    return torch.einsum("bhqk,bhkd->bhqd", p, vf).to(q.dtype), lse


def grouped_probs(q: torch.Tensor, k: torch.Tensor, scale: float,
                  visible: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention probabilities per query head, float32, grouped by the KV head each
    query head reads: [B, Hkv, Hq / Hkv, Lq, Lk].

    q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D]; ``visible`` (bool, broadcastable to [Lq, Lk])
    hides the keys where it is False. ``.sum((1, 2)) / Hq`` is the head-summed attention,
    DSA's selection target.
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    logits = torch.einsum("bgrqd,bgkd->bgrqk", q.float().reshape(b, hkv, hq // hkv, lq, d),
                          k.float()) * scale
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits.softmax(-1)
