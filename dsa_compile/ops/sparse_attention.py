"""`dsa::sparse_attention`: attention of each query over only its selected keys."""

from __future__ import annotations

import torch
from torch import Tensor

from dsa_compile import reference
from dsa_compile.ops.checks import (
    check,
    check_attention_args,
    check_indices,
    check_indices_range,
    check_same_device,
    check_tensor,
)
from dsa_compile.ops.dispatch import use_triton
from dsa_compile.reference.sparse_attention import query_chunk


@torch.library.custom_op("dsa::sparse_attention", mutates_args=())
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    scale: float,
    softcap: float = 0.0,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-sparse attention: query t of head h attends to the keys in
    ``indices[b, g, t, :]`` (g = 0 when G = 1, else h's KV head), ignoring -1 slots.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv]; Hq % Hkv == 0 (GQA/MQA/MHA).
        indices: int32/int64 [B, G, Lq, top_k], G = 1 (shared by all heads, as in DSA)
            or G = Hkv. Valid entries of a row are distinct keys in [0, Lk).
        scale: multiplier of q . k (usually D ** -0.5).
        softcap: if > 0, logits become softcap * tanh(logits / softcap).
        bias: optional float [B, G, Lq, top_k]: added to the score of the key in the same
            slot of ``indices`` (a general additive mask, gathered at the selection).

    Returns:
        (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32). A query with no
        valid key gets a zero output and lse = -inf.

    Raises:
        ValueError: wrong rank/dtype/device, mismatched batch or heads, indices out of range.
    """
    _check(q, k, v, indices, softcap, bias)
    check_indices_range("sparse_attention", indices, k.shape[2])
    return reference.sparse_attention(q, k, v, indices, scale, softcap, bias)


def _check(q, k, v, indices, softcap, bias):
    check_attention_args("sparse_attention", q, k, v, softcap)
    check_indices("sparse_attention", indices, q, k)
    if bias is not None:
        check_tensor("sparse_attention", "bias", bias, 4, inner_contiguous=False)
        check_same_device("sparse_attention", q=q, bias=bias)
        check(tuple(bias.shape) == tuple(indices.shape), "sparse_attention",
              f"bias must match indices {tuple(indices.shape)} slot for slot, "
              f"got {tuple(bias.shape)}")


@sparse_attention.register_fake
def _(q, k, v, indices, scale, softcap=0.0, bias=None):
    _check(q, k, v, indices, softcap, bias)
    b, hq, lq, _ = q.shape
    out = q.new_empty((b, hq, lq, v.shape[-1]))
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse


@sparse_attention.register_kernel("cuda")
def _(q, k, v, indices, scale, softcap=0.0, bias=None):
    _check(q, k, v, indices, softcap, bias)
    if not use_triton():
        return reference.sparse_attention(q, k, v, indices, scale, softcap, bias)
    from dsa_compile.kernels import sparse_attention as triton_sparse_attention

    return triton_sparse_attention(q, k, v, indices, scale, softcap, bias)


def _setup(ctx, inputs, output):
    q, k, v, indices, scale, softcap, bias = inputs
    ctx.save_for_backward(q, k, v, indices, bias)
    ctx.scale, ctx.softcap = scale, softcap


def _backward(ctx, grad_out, grad_lse):
    """Recompute-based backward, chunked over queries so memory stays O(chunk * top_k)."""
    q, k, v, indices, bias = ctx.saved_tensors
    lq = q.shape[2]
    chunk = query_chunk(q.shape[0], k.shape[1], indices.shape[-1], max(q.shape[-1], v.shape[-1]))
    dq = torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    kf = k.detach().float().requires_grad_()
    vf = v.detach().float().requires_grad_()
    for s in range(0, lq, chunk):
        with torch.enable_grad():
            qc = q[:, :, s : s + chunk].detach().float().requires_grad_()
            out, lse = reference.sparse_attention(
                qc, kf, vf, indices[:, :, s : s + chunk], ctx.scale, ctx.softcap,
                None if bias is None else bias[:, :, s : s + chunk],
            )
            outs, grads = [out], [grad_out[:, :, s : s + chunk].float()]
            if grad_lse is not None:
                finite = torch.isfinite(lse)
                outs.append(torch.where(finite, lse, 0))
                grads.append(grad_lse[:, :, s : s + chunk].float())
            gq, gk, gv = torch.autograd.grad(outs, [qc, kf, vf], grads, allow_unused=True)
        dq[:, :, s : s + chunk] = gq
        if gk is not None:
            dk += gk
        dv += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


sparse_attention.register_autograd(_backward, setup_context=_setup)
