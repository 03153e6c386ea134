"""`dsa::indexer_topk` and `dsa::indexer_scores`: lightning-indexer ops.

CPU (and any device without a kernel) runs the reference; CUDA runs the Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsa_compile import reference
from dsa_compile.ops.checks import check_general_masks, check_indexer_args
from dsa_compile.ops.dispatch import indexer_fp8, use_triton


@torch.library.custom_op("dsa::indexer_topk", mutates_args=())
def indexer_topk(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    top_k: int,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Each query's top_k keys by lightning-indexer score.

    I[t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s]); query t sits at absolute
    position q_offset + t and, with ``causal``, sees keys s <= q_offset + t.

    Args:
        q_idx: [B, Lq, H_I, d_I] float32/bfloat16/float16.
        k_idx: [B, Lk, d_I], one indexer key per token shared by all indexer heads.
        w: [B, Lq, H_I] per-query head weights.
        top_k: slots per query (> 0); may exceed the visible keys.
        q_offset: absolute position of query 0 (decode / chunked prefill).
        causal: apply the causal mask before selection.
        key_mask: optional bool [B, Lk], True where the key exists (padding = False).
        mask: optional bool [B or 1, Lq, Lk], True where query t may select key s (any
            pattern, on top of ``causal`` and ``key_mask``).

    Returns:
        int32 [B, Lq, top_k]: the selected keys in ascending order; -1 in unused slots.
        Ties go to the smaller key index. Masked keys are never selected.

    Raises:
        ValueError: wrong rank, dtype, device or shape, top_k <= 0, q_offset < 0.
    """
    _check_topk(q_idx, k_idx, w, top_k, q_offset, key_mask, mask)
    return reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask, mask)


def _check_topk(q_idx, k_idx, w, top_k, q_offset, key_mask, mask, op="indexer_topk"):
    check_indexer_args(op, q_idx, k_idx, w, top_k, q_offset, key_mask)
    check_general_masks(op, q_idx.transpose(1, 2), k_idx.shape[1], mask, None)


@indexer_topk.register_fake
def _(q_idx, k_idx, w, top_k, q_offset=0, causal=True, key_mask=None, mask=None):
    _check_topk(q_idx, k_idx, w, top_k, q_offset, key_mask, mask)
    b, lq = q_idx.shape[:2]
    return q_idx.new_empty((b, lq, top_k), dtype=torch.int32)


@indexer_topk.register_kernel("cuda")
def _(q_idx, k_idx, w, top_k, q_offset=0, causal=True, key_mask=None, mask=None):
    _check_topk(q_idx, k_idx, w, top_k, q_offset, key_mask, mask)
    if not use_triton():
        return reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask, mask)
    from dsa_compile.kernels import indexer_topk as triton_indexer_topk

    return triton_indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask,
                               fp8=indexer_fp8(), mask=mask)


@torch.library.custom_op("dsa::indexer_scores", mutates_args=())
def indexer_scores(
    q_idx: Tensor,
    k_idx: Tensor,
    w: Tensor,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Dense lightning-indexer scores, for calibration and analysis.

    Args: as :func:`indexer_topk` without ``top_k``.

    Returns:
        float32 [B, Lq, Lk]; -inf where the key is not visible. Differentiable in
        q_idx, k_idx and w. O(Lq * Lk) memory: do not use on the inference path.
    """
    _check_topk(q_idx, k_idx, w, None, q_offset, key_mask, mask, "indexer_scores")
    return reference.indexer_scores(q_idx, k_idx, w, q_offset, causal, key_mask, mask)


@indexer_scores.register_fake
def _(q_idx, k_idx, w, q_offset=0, causal=True, key_mask=None, mask=None):
    _check_topk(q_idx, k_idx, w, None, q_offset, key_mask, mask, "indexer_scores")
    b, lq = q_idx.shape[:2]
    return q_idx.new_empty((b, lq, k_idx.shape[1]), dtype=torch.float32)


def _scores_setup(ctx, inputs, output):
    q_idx, k_idx, w, q_offset, causal, key_mask, mask = inputs
    ctx.save_for_backward(q_idx, k_idx, w, key_mask, mask)
    ctx.q_offset, ctx.causal = q_offset, causal


def _scores_backward(ctx, grad):
    q_idx, k_idx, w, key_mask, mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q_idx, k_idx, w)]
        scores = reference.indexer_scores(*leaves, ctx.q_offset, ctx.causal, key_mask, mask)
        # Masked entries are -inf constants; their gradient is zero.
        grads = torch.autograd.grad(scores, leaves, grad.masked_fill(scores.isinf(), 0))
    return *grads, None, None, None, None


indexer_scores.register_autograd(_scores_backward, setup_context=_scores_setup)
