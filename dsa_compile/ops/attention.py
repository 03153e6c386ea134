"""`dsa::attention`: the whole DSA attention of one site, with dense dispatch.

    lightning indexer -> top-k -> sparse attention

Queries with at most ``max(top_k, dense_below)`` visible keys use dense attention
(exact there, and faster at short length); ``dense_below = 0`` forces the sparse path
for every query. The passes emit this op so that the dispatch, which depends on
sequence length, lives inside one graph node instead of Python control flow that
would specialise a dynamic-shape graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsa_compile import reference
from dsa_compile.ops.checks import check, check_attention_args, check_indexer_args


def dense_rows(lq: int, lk: int, top_k: int, q_offset: int, causal: bool, dense_below: int) -> int:
    """How many leading queries take the dense path (query t sees q_offset + t + 1 keys)."""
    if dense_below <= 0:
        return 0
    threshold = max(top_k, dense_below)
    if not causal:
        return lq if lk <= threshold else 0
    return min(max(threshold - q_offset, 0), lq)


def dense_attention(q, k, v, scale, causal, q_offset, key_mask, softcap) -> Tensor:
    """Dense attention through SDPA (flash/efficient kernels where they apply)."""
    if softcap > 0:
        return reference.dense_attention(q, k, v, scale, causal, q_offset, key_mask, softcap)[0]
    lq, lk = q.shape[2], k.shape[2]
    gqa = bool(q.shape[1] != k.shape[1])
    if key_mask is None and (not causal or q_offset == lk - lq == 0):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        mask = reference.indexer.visible_mask(lq, lk, q_offset, True, q.device)
    mask = mask[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    # A query that sees no key gets zeros (SDPA gives NaN there), as the sparse path does.
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


def _attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask, softcap,
               dense_below) -> Tensor:
    lq, lk = q.shape[2], k.shape[2]
    n_dense = dense_rows(lq, lk, top_k, q_offset, causal, dense_below)
    parts = []
    if n_dense > 0:
        keys = min(lk, q_offset + n_dense) if causal else lk
        mask = key_mask[:, :keys] if key_mask is not None else None
        parts.append(
            dense_attention(q[:, :, :n_dense], k[:, :, :keys], v[:, :, :keys], scale, causal,
                            q_offset, mask, softcap)
        )
    if n_dense < lq:
        indices = torch.ops.dsa.indexer_topk(
            q_idx[:, n_dense:], k_idx, w[:, n_dense:], top_k, q_offset + n_dense, causal, key_mask
        )
        out, _ = torch.ops.dsa.sparse_attention(
            q[:, :, n_dense:], k, v, indices.unsqueeze(1), scale, softcap
        )
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below):
    check_attention_args("attention", q, k, v, softcap)
    check_indexer_args("attention", q_idx, k_idx, w, top_k, q_offset, key_mask)
    check(
        q_idx.shape[:2] == (q.shape[0], q.shape[2]) and k_idx.shape[1] == k.shape[2],
        "attention",
        f"indexer inputs q_idx {tuple(q_idx.shape)} / k_idx {tuple(k_idx.shape)} do not match "
        f"q {tuple(q.shape)} / k {tuple(k.shape)} (need q_idx [B, Lq, ...], k_idx [B, Lk, ...])",
    )
    check(dense_below >= 0, "attention", f"dense_below must be >= 0, got {dense_below}")


@torch.library.custom_op("dsa::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    top_k: int,
    scale: float,
    causal: bool = True,
    q_offset: int = 0,
    key_mask: Tensor | None = None,
    softcap: float = 0.0,
    dense_below: int = 0,
) -> Tensor:
    """DSA attention of one site: indexer top-k selection, then sparse attention.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv] (Hq % Hkv == 0).
        q_idx: [B, Lq, H_I, d_I]; k_idx: [B, Lk, d_I]; w: [B, Lq, H_I] (indexer inputs).
        top_k: keys per query (> 0). scale: multiplier of q . k.
        causal, q_offset: query t sits at absolute position q_offset + t.
        key_mask: optional bool [B, Lk], True where the key exists.
        softcap: logit soft-cap (0 = off).
        dense_below: queries with at most max(top_k, dense_below) visible keys use dense
            attention; 0 forces the sparse path everywhere.

    Returns:
        [B, Hq, Lq, Dv] in q's dtype. Differentiable in q, k, v (selection is discrete).
    """
    _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below)
    # Contiguous, as the fake impl promises (Inductor asserts the strides it was told).
    return _attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask,
                      softcap, dense_below).contiguous()


@attention.register_fake
def _(q, k, v, q_idx, k_idx, w, top_k, scale, causal=True, q_offset=0, key_mask=None,
      softcap=0.0, dense_below=0):
    _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below)
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v.shape[-1]))


def _setup(ctx, inputs, output):
    q, k, v, q_idx, k_idx, w, *rest = inputs
    ctx.save_for_backward(q, k, v, q_idx, k_idx, w, rest[4])
    ctx.rest = rest


def _backward(ctx, grad):
    q, k, v, q_idx, k_idx, w, key_mask = ctx.saved_tensors
    top_k, scale, causal, q_offset, _, softcap, dense_below = ctx.rest
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attention(*leaves, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask,
                         softcap, dense_below)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    return dq, dk, dv, *([None] * 10)


attention.register_autograd(_backward, setup_context=_setup)
