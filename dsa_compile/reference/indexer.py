"""Lightning indexer and top-k selection: the pure PyTorch spec.

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])        j = 1..H_I

Query t sits at absolute position ``q_offset + t``; with ``causal`` it sees keys
``s <= q_offset + t``. ``key_mask[b, s] == False`` hides key s. Masked scores are -inf
and are never selected; a NaN score of a visible key (a NaN indexer weight, say) ranks as
the lowest finite score, so a query that sees keys always selects some. Everything is
computed in float32 and chunked over queries, so memory is O(chunk * Lk), never
O(Lq * Lk) for the selection.
"""

from __future__ import annotations

import torch

from dsa_compile.reference.index_keys import is_packed, unpack_index_keys

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


def relu_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's formula, unmasked: I[b, t, s] = sum_j w[b, t, j] *
    ReLU(q_idx[b, t, j] . k_idx[b, s]) as float32 [B, Lq, Lk] (differentiable).

    q_idx: [B, Lq, H_I, d_I]; k_idx: [B, Lk, d_I], or packed FP8 keys uint8
    [B, Lk, d_I + 4] (reference/index_keys.py: the scale multiplies each key's score);
    w: [B, Lq, H_I].
    """
    b, c, h, d = q_idx.shape
    lk = k_idx.shape[1]
    key_scale = None
    if is_packed(k_idx):
        k_idx, key_scale = unpack_index_keys(k_idx)
    # Plain matmuls on contiguous views: [B, C*H, d] @ [B, d, Lk] -> [B, C, H, Lk], then
    # the head weights contract H as [B*C, 1, H] @ [B*C, H, Lk].
    dots = torch.matmul(q_idx.float().reshape(b, c * h, d), k_idx.float().transpose(1, 2))
    dots = (torch.relu(dots) if dots.requires_grad else torch.relu_(dots)).view(b * c, h, lk)
    scores = torch.matmul(w.float().reshape(b * c, 1, h), dots).view(b, c, lk)
    return scores if key_scale is None else scores * key_scale[:, None, :]


def _chunk_scores(q_idx, k_idx, w, start, q_offset, causal, key_mask,
                  mask=None) -> torch.Tensor:
    """Index scores for one chunk of queries: [B, C, Lk'] float32, -inf where masked.

    With ``causal`` only the keys some query of the chunk can see are scored
    (Lk' = min(Lk, q_offset + start + C)); later keys would be -inf anyway.
    """
    c = q_idx.shape[1]
    lk = k_idx.shape[1]
    if causal:
        lk = max(0, min(lk, q_offset + start + c))
    scores = relu_scores(q_idx, k_idx[:, :lk], w)
    vis = visible_mask(c, lk, q_offset, causal, q_idx.device, start)
    if vis is not None:
        scores = scores.masked_fill_(~vis[None], float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill_(~key_mask[:, None, :lk], float("-inf"))
    if mask is not None:
        scores = scores.masked_fill_(~mask[:, start : start + c, :lk], float("-inf"))
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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense index scores (calibration and analysis; O(Lq * Lk) output by nature).

    Args:
        q_idx: [B, Lq, H_I, d_I] indexer queries.
        k_idx: [B, Lk, d_I] indexer keys (one per token, shared by all indexer heads).
        w: [B, Lq, H_I] per-query head weights.
        q_offset: absolute position of query 0.
        causal: hide keys after each query's position.
        key_mask: optional bool [B, Lk], True where the key exists.
        mask: optional bool [B or 1, Lq, Lk], True where query t may see key s (any
            pattern; combined with ``causal`` and ``key_mask``).

    Returns:
        float32 [B, Lq, Lk], -inf where the key is not visible. Differentiable.
    """
    b, lq, h, _ = q_idx.shape
    lk = k_idx.shape[1]
    chunk = _query_chunk(b, h, lk)
    parts = []
    for s in range(0, max(lq, 1), chunk):  # Lq = 0: one empty chunk (torch.cat needs one)
        part = _chunk_scores(
            q_idx[:, s : s + chunk], k_idx, w[:, s : s + chunk], s, q_offset, causal, key_mask,
            mask,
        )
        parts.append(torch.nn.functional.pad(part, (0, lk - part.shape[-1]), value=float("-inf")))
    return torch.cat(parts, dim=1)


def topk_set(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact selected set of each row of ``scores`` [..., Lk] (Lk > 0), in no order:
    (values, int64 indices), both [..., min(top_k, Lk)]; a slot whose value is -inf
    holds no selected key. The rules are :func:`select_topk`'s."""
    k = min(top_k, scores.shape[-1])
    vals, idx = torch.topk(scores, k, dim=-1, sorted=False)
    # torch.topk breaks ties arbitrarily and ranks NaN above everything. A row is exact
    # when exactly k scores reach its k-th value: that fails for a tie at the k-th value,
    # a NaN among the top k (amin is NaN, nothing reaches it) and a row with fewer than k
    # visible keys (-inf is reached by all). One test, one sync; only such rows are
    # redone by a stable sort, NaN as the lowest finite score (as the Triton select).
    kth = vals.amin(dim=-1, keepdim=True)
    redo = (scores >= kth).sum(-1) != k
    if bool(redo.any()):
        rows = torch.nan_to_num(scores[redo], nan=torch.finfo(scores.dtype).min,
                                posinf=float("inf"), neginf=float("-inf"))
        idx[redo] = torch.sort(rows, dim=-1, descending=True, stable=True).indices[..., :k]
        vals[redo] = torch.gather(rows, -1, idx[redo])
    return vals, idx


def select_topk(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k of each row of ``scores`` [..., Lk] as int32 [..., top_k].

    The selected set is the top_k largest finite scores, ties broken by the smaller key
    index; within a row the indices are in ascending key order and unused slots (fewer
    than top_k visible keys) are -1 at the end. -inf hides a key; NaN counts as the
    lowest finite score (selected after every finite one). Lk = 0 gives only -1. (The
    CUDA path uses this too, on its Triton-computed score chunks.)
    """
    width = scores.shape[-1]
    if width == 0:  # no key at all
        return torch.full((*scores.shape[:-1], top_k), -1, dtype=torch.int32,
                          device=scores.device)
    vals, idx = topk_set(scores, top_k)
    k = idx.shape[-1]
    # Unused slots sort last as `width`; int32 sorts faster than int64.
    idx = torch.where(vals > float("-inf"), idx, width).to(torch.int32)
    idx = torch.sort(idx, dim=-1).values
    idx = idx.masked_fill_(idx == width, -1)
    if k < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_k - k), -1)], dim=-1)
    return idx


def indexer_topk(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    top_k: int,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
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
                q_idx[:, s : s + chunk], k_idx, w[:, s : s + chunk], s, q_offset, causal,
                key_mask, mask,
            )
            out[:, s : s + chunk] = select_topk(scores, top_k)
    return out
