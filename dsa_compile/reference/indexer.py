"""Lightning indexer and top-k selection: the pure PyTorch spec.

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])        j = 1..H_I

Query t sits at absolute position ``q_offset + t``; with ``causal`` it sees keys
``s <= q_offset + t``. ``key_mask[b, s] == False`` hides key s. Masked scores are -inf
and are never selected. Everything is computed in float32 and chunked over queries,
so memory is O(chunk * Lk), never O(Lq * Lk) for the selection.
"""

from __future__ import annotations

import torch

# Elements of the per-chunk [B, C, H_I, Lk] product kept in memory at once.
_CHUNK_ELEMENTS = 1 << 24


def visible_mask(
    lq: int, lk: int, q_offset: int, causal: bool, device: torch.device, start: int = 0
) -> torch.Tensor | None:
    """Causal visibility of queries ``start .. start + lq``: bool [lq, lk], None if not causal."""
    if not causal:
        return None
    pos = torch.arange(start, start + lq, device=device) + q_offset
    return torch.arange(lk, device=device)[None, :] <= pos[:, None]


def _chunk_scores(q_idx, k_idx, w, start, q_offset, causal, key_mask) -> torch.Tensor:
    """Index scores for one chunk of queries: [B, C, Lk] float32, -inf where masked."""
    dots = torch.einsum("bchd,bsd->bchs", q_idx.float(), k_idx.float())
    scores = torch.einsum("bchs,bch->bcs", torch.relu(dots), w.float())
    vis = visible_mask(q_idx.shape[1], k_idx.shape[1], q_offset, causal, q_idx.device, start)
    if vis is not None:
        scores = scores.masked_fill(~vis[None], float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    return scores


def _query_chunk(batch: int, heads: int, lk: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, batch * heads * lk))


def indexer_scores(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense index scores (calibration and analysis; O(Lq * Lk) output by nature).

    Args:
        q_idx: [B, Lq, H_I, d_I] indexer queries.
        k_idx: [B, Lk, d_I] indexer keys (one per token, shared by all indexer heads).
        w: [B, Lq, H_I] per-query head weights.
        q_offset: absolute position of query 0.
        causal: hide keys after each query's position.
        key_mask: optional bool [B, Lk], True where the key exists.

    Returns:
        float32 [B, Lq, Lk], -inf where the key is not visible. Differentiable.
    """
    b, lq, h, _ = q_idx.shape
    chunk = _query_chunk(b, h, k_idx.shape[1])
    parts = [
        _chunk_scores(
            q_idx[:, s : s + chunk], k_idx, w[:, s : s + chunk], s, q_offset, causal, key_mask
        )
        for s in range(0, lq, chunk)
    ]
    return torch.cat(parts, dim=1)


def select_topk(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k of each row of ``scores`` [..., Lk] as int32 [..., top_k].

    The selected set is the top_k largest finite scores, ties broken by the smaller key
    index; within a row the indices are in ascending key order and unused slots (fewer
    than top_k visible keys) are -1 at the end.
    """
    lk = scores.shape[-1]
    k = min(top_k, lk)
    # The k-th largest value is unique even when its key is not: take every key above
    # it, then the first (smallest-index) keys equal to it until the row holds k.
    kth = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = scores > kth
    tied = (scores == kth) & (scores > float("-inf"))
    need = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= need))
    # Chosen keys keep their position, the rest sort after every key: the k smallest
    # positions are the chosen keys in ascending order, then the padding.
    pos = torch.arange(lk, device=scores.device).expand_as(scores)
    pos = torch.where(chosen, pos, torch.full_like(pos, lk))
    order = torch.topk(pos, k, dim=-1, largest=False, sorted=True).values
    order = torch.where(order == lk, torch.full_like(order, -1), order)
    if k < top_k:
        pad = order.new_full((*order.shape[:-1], top_k - k), -1)
        order = torch.cat([order, pad], dim=-1)
    return order.to(torch.int32)


def indexer_topk(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    top_k: int,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of each query's top_k keys by index score.

    Args: as :func:`indexer_scores`, plus ``top_k`` (> 0).

    Returns:
        int32 [B, Lq, top_k]: selected key indices in ascending order, -1 in unused
        slots (when fewer than top_k keys are visible). Ties go to the smaller index.
    """
    b, lq, h, _ = q_idx.shape
    chunk = _query_chunk(b, h, k_idx.shape[1])
    out = torch.empty(b, lq, top_k, dtype=torch.int32, device=q_idx.device)
    with torch.no_grad():
        for s in range(0, lq, chunk):
            scores = _chunk_scores(
                q_idx[:, s : s + chunk], k_idx, w[:, s : s + chunk], s, q_offset, causal, key_mask
            )
            out[:, s : s + chunk] = select_topk(scores, top_k)
    return out
