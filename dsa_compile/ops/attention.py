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
from torch._subclasses.fake_tensor import is_fake

from dsa_compile import reference
from dsa_compile.config import DENSE_BELOW_DEFAULT, dense_threshold
from dsa_compile.ops.checks import (
    check_attention_args,
    check_general_masks,
    check_indexer_args,
    check_same_device_groups,
    fail,
)
from dsa_compile.ops.dispatch import use_triton
from dsa_compile.reference.dense import MASKED_BIAS


def dense_rows(lq: int, lk: int, top_k: int, q_offset: int, causal: bool, dense_below: int) -> int:
    """How many leading queries take the dense path (query t sees q_offset + t + 1 keys)."""
    threshold = dense_threshold(top_k, dense_below)
    if threshold == 0:
        return 0
    if not causal:
        return lq if lk <= threshold else 0
    return min(max(threshold - q_offset, 0), lq)


def dense_attention(q, k, v, scale, causal, q_offset, key_mask, softcap, mask=None,
                    bias=None) -> Tensor:
    """Dense attention through SDPA (flash/efficient kernels where they apply).

    A query that sees no key gets zeros (SDPA may give NaN there), as the sparse path
    does -- except under an additive ``bias``, where the model's own softmax over its
    biased scores is reproduced (an all-``finfo.min`` row averages every key).
    """
    if softcap > 0:
        return reference.dense_attention(q, k, v, scale, causal, q_offset, key_mask, softcap,
                                         mask, bias)[0]
    lq, lk = q.shape[2], k.shape[2]
    if causal and q_offset >= lk - 1:  # every query sees every key (a decode step)
        causal = False
    gqa = bool(q.shape[1] != k.shape[1])
    general = mask is not None or bias is not None
    if key_mask is None and not general and (not causal or q_offset == lk - lq == 0):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = reference.indexer.visible_mask(lq, lk, q_offset, True, q.device)
    keep = keep[None, None]
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    if mask is not None:
        keep = keep & mask[:, None]
    if bias is not None:
        attn = bias[:, None].to(q.dtype).masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale,
                                              enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=gqa)
    return torch.where(keep.any(-1, keepdim=True), out, torch.zeros_like(out))


def _selectable(mask, bias):
    """The general keep-mask the indexer applies: ``mask`` and the keys ``bias`` leaves
    visible (above :data:`MASKED_BIAS`), [B or 1, Lq, Lk] bool, or None."""
    if bias is None:
        return mask
    visible = bias > MASKED_BIAS
    return visible if mask is None else visible & mask


def _rows(t, rows, keys=None):
    """``t[:, rows, :keys]`` for an optional general mask [B or 1, Lq, Lk]."""
    return None if t is None else t[:, rows, :keys]


DECODE_MAX_QUERIES = 16
"""Steps of at most this many queries (decode, speculative verification) run a decode
path: the CUDA decode kernels (:func:`dsa_compile.kernels.decode.decode_attention`) or,
on CPU, :func:`dsa_compile.reference.decode.decode_attention`."""
DECODE_DEVICES = ("cuda",)
"""Device types whose decode steps run the CUDA kernels (tests add "cpu": the interpreter)."""


def decode_crossover(batch: int, device_type: str = "cuda") -> int:
    """Visible keys above which a decode step is faster sparse than dense. CUDA: measured
    on the H200 (benchmarks/RESULTS.md, decode.py; one Llama-3-8B-shaped layer, top_k
    2048): dense wins below ~16K keys at B = 1, ~6K at B = 8, 4K at B = 32. CPU: measured
    on the 2-core box (benchmarks/RESULTS.md, decode_cpu.py; SmolLM2 shape, top_k 256,
    float32): 0.95x at 2K keys and 1.13x at 3K for B = 1, 1.10x at 2K for B = 4.
    Used in place of the default ``dense_below`` for such steps (0 still forces sparse)."""
    if device_type == "cpu":
        return 3072 if batch <= 1 else 2048
    return 16384 if batch <= 1 else 6144 if batch <= 8 else 4096


def _decode_path(q, k, v, mask, bias) -> str | None:
    """Which decode path a step takes: "kernels" (the CUDA decode kernels), "reference"
    (the CPU decode function), or None (the general path: many queries, an additive
    bias, a general mask over several queries, :func:`force_reference`, and on CPU a
    step that needs gradients or is being traced: the decode function is plain
    data-dependent PyTorch, which the op's backward would trace)."""
    # A general mask is a key mask when there is one query per row.
    if (q.shape[2] > DECODE_MAX_QUERIES or bias is not None or not use_triton()
            or (mask is not None and q.shape[2] != 1)):
        return None
    if q.device.type in DECODE_DEVICES:
        return "kernels"
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return "reference" if q.device.type == "cpu" and not grad and not is_fake(q) else None


def _decode(path, q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask,
            softcap, mask) -> Tensor:
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    if mask is not None:
        row = mask[:, 0].expand(b, lk)
        key_mask = row if key_mask is None else key_mask & row
    if path == "reference":
        return reference.decode_attention(q, k, v, q_idx, k_idx, w, top_k, scale, q_offset,
                                          causal, key_mask, softcap)
    from dsa_compile.kernels.decode import decode_attention

    if causal:
        pos = q_offset + torch.arange(lq, device=q.device, dtype=torch.int32)
    else:
        pos = torch.full((lq,), lk - 1, device=q.device, dtype=torch.int32)
    key_mask = None if key_mask is None else key_mask.contiguous()
    q, k, v, q_idx, k_idx, w = (x if x.stride(-1) == 1 else x.contiguous()
                                for x in (q, k, v, q_idx, k_idx, w))
    return decode_attention(q, k, v, q_idx, k_idx, w, top_k, scale, pos.expand(b, lq),
                            key_mask, softcap)


def _attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask, softcap,
               dense_below, mask=None, bias=None) -> Tensor:
    b, _, lq, lk = *q.shape[:3], k.shape[2]
    if lq == 0 or lk == 0:
        return q.new_zeros((b, q.shape[1], lq, v.shape[-1]))
    decode = _decode_path(q, k, v, mask, bias)
    if decode and dense_below == DENSE_BELOW_DEFAULT:
        dense_below = decode_crossover(b, q.device.type)
    n_dense = dense_rows(lq, lk, top_k, q_offset, causal, dense_below)
    if decode and n_dense == 0:
        return _decode(decode, q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset,
                       key_mask, softcap, mask)
    parts = []
    if n_dense > 0:
        keys = min(lk, max(q_offset + n_dense, 0)) if causal else lk
        rows = slice(0, n_dense)
        parts.append(dense_attention(
            q[:, :, rows], k[:, :, :keys], v[:, :, :keys], scale, causal, q_offset,
            key_mask[:, :keys] if key_mask is not None else None, softcap,
            _rows(mask, rows, keys), _rows(bias, rows, keys)))
    if n_dense < lq:
        rows = slice(n_dense, lq)
        m, bs = _rows(mask, rows), _rows(bias, rows)
        indices = torch.ops.dsa.indexer_topk(
            q_idx[:, rows], k_idx, w[:, rows], top_k, q_offset + n_dense, causal, key_mask,
            _selectable(m, bs))
        slot_bias = None
        if bs is not None:  # each selected key's bias, in its slot: [B, 1, Lq', top_k]
            slot_bias = torch.gather(bs.expand(b, -1, -1).float(), 2,
                                     indices.clamp_min(0).long()).unsqueeze(1)
        out, _ = torch.ops.dsa.sparse_attention(
            q[:, :, rows], k, v, indices.unsqueeze(1), scale, softcap, slot_bias)
        if bs is not None:
            out = _biased_empty_rows(out, indices, q[:, :, rows], k, v, scale, causal,
                                     q_offset + n_dense, key_mask, softcap, m, bs)
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _biased_empty_rows(out, indices, q, k, v, scale, causal, q_offset, key_mask, softcap,
                       mask, bias) -> Tensor:
    """Rows whose every key the additive ``bias`` hides get what the dense model computes
    for them (its softmax over the biased scores: an all-``finfo.min`` row averages every
    key), not the sparse contract's zeros. Such rows are padding queries."""
    empty = (indices < 0).all(-1)  # [B, Lq]
    if not bool(empty.any()):
        return out
    out = out.clone()
    for b in empty.any(-1).nonzero().flatten().tolist():
        t = empty[b].nonzero().flatten()
        one = slice(b, b + 1)

        def pick(x, one=one, t=t):
            return None if x is None else x[one if x.shape[0] > 1 else slice(0, 1), t]

        vis = reference.indexer.visible_mask(q.shape[2], k.shape[2], q_offset, causal, q.device)
        vis = None if vis is None else vis[t][None]  # rows t of the causal pattern
        m = pick(mask)
        m = vis if m is None else (m if vis is None else m & vis)
        if key_mask is not None:
            km = key_mask[one, None, :]
            m = km.expand(1, t.numel(), -1) if m is None else m & km
        out[one, :, t] = dense_attention(q[one, :, t], k[one], v[one], scale, False, 0, None,
                                         softcap, m, pick(bias))
    return out


def _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below, mask,
           bias):
    check_attention_args("attention", q, k, v, softcap)
    check_indexer_args("attention", q_idx, k_idx, w, top_k, q_offset, key_mask)
    check_same_device_groups("attention", {"q": q, "k": k, "v": v},
                             {"q_idx": q_idx, "k_idx": k_idx, "w": w, "key_mask": key_mask,
                              "mask": mask, "bias": bias})
    if not (q_idx.shape[:2] == (q.shape[0], q.shape[2]) and k_idx.shape[1] == k.shape[2]):
        fail("attention", f"indexer inputs q_idx {tuple(q_idx.shape)} / k_idx "
             f"{tuple(k_idx.shape)} do not match q {tuple(q.shape)} / k {tuple(k.shape)} "
             f"(need q_idx [B, Lq, ...], k_idx [B, Lk, ...])")
    if dense_below < 0:
        fail("attention", f"dense_below must be >= 0, got {dense_below}")
    check_general_masks("attention", q, k.shape[2], mask, bias)


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
    mask: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """DSA attention of one site: indexer top-k selection, then sparse attention.

    Args:
        q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv] (Hq % Hkv == 0).
        q_idx: [B, Lq, H_I, d_I]; k_idx: [B, Lk, d_I]; w: [B, Lq, H_I] (indexer inputs).
        top_k: keys per query (> 0). scale: multiplier of q . k.
        causal, q_offset: query t sits at absolute position q_offset + t (q_offset may be
            negative: ``tril(diagonal=-1)`` masks).
        key_mask: optional bool [B, Lk], True where the key exists.
        softcap: logit soft-cap (0 = off).
        dense_below: queries with at most max(top_k, dense_below) visible keys use dense
            attention; 0 forces the sparse path everywhere.
        mask: optional bool [B or 1, Lq, Lk], True where query t may attend key s: any
            pattern (a mask the passes could not prove causal or key padding, e.g. one
            built from ``cache_position``). Masked keys are never selected.
        bias: optional float [B or 1, Lq, Lk] added to the scores (an additive attention
            mask of unknown content); keys at or below -1e4 are never selected, the
            others' bias is added to their scores, so the result is exact when top_k
            covers the visible keys.

    Returns:
        [B, Hq, Lq, Dv] in q's dtype. Differentiable in q, k, v (selection is discrete).
    """
    _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below, mask,
           bias)
    # Contiguous, as the fake impl promises (Inductor asserts the strides it was told).
    return _attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset, key_mask,
                      softcap, dense_below, mask, bias).contiguous()


@attention.register_fake
def _(q, k, v, q_idx, k_idx, w, top_k, scale, causal=True, q_offset=0, key_mask=None,
      softcap=0.0, dense_below=0, mask=None, bias=None):
    _check(q, k, v, q_idx, k_idx, w, top_k, q_offset, key_mask, softcap, dense_below, mask,
           bias)
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v.shape[-1]))


_TENSOR_ARGS = 6  # q, k, v, q_idx, k_idx, w lead the schema


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_ARGS])
    ctx.rest = inputs[_TENSOR_ARGS:]  # top_k ... bias, in schema order


def _backward(ctx, grad):
    q, k, v, q_idx, k_idx, w = ctx.saved_tensors
    nones = [None] * (_TENSOR_ARGS - 3 + len(ctx.rest))
    if q.shape[2] == 0 or k.shape[2] == 0:  # the forward returned constant zeros
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), *nones
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attention(*leaves, q_idx, k_idx, w, *ctx.rest)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    return dq, dk, dv, *nones


attention.register_autograd(_backward, setup_context=_setup)
