"""The override harness: run a model with each SDPA call swapped, no compiler needed.

:func:`attention_override` runs a model with every ``F.scaled_dot_product_attention``
call replaced by a chosen attention -- dense, a sliding window, the oracle top-k, the
DSA op with the site's :class:`~dsa_compile.indexer.Indexer` -- or recorded (the
post-RoPE q and k that calibration needs). A site is the innermost module running when
SDPA is called (``model.layers.3.self_attn`` in a Hugging Face Llama); its indexer is
found in :data:`~dsa_compile.indexer.REGISTRY` by the site's parameters, the same
registry the ``dsa`` backend uses, so both see the same (calibrated) indexers.

Only calls the DSA rewrite would take are swapped: no ``attn_mask``, no dropout, more
than one query, causal or not. Others run dense and are counted in ``skipped``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dsa_compile.config import DSAConfig
from dsa_compile.indexer import (
    GROUPED_REGISTRY,
    REGISTRY,
    GroupedIndexer,
    Indexer,
    site_anchors,
)
from dsa_compile.reference.dense import grouped_probs

MODES = ("dense", "window", "oracle", "dsa", "capture")


@dataclasses.dataclass
class SiteCall:
    """One SDPA call: its site and its (post-projection, post-RoPE) inputs.

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv].
    """

    name: str
    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    causal: bool


def model_anchors(model: nn.Module, name: str) -> tuple[list[str], list[Tensor]]:
    """:func:`~dsa_compile.indexer.site_anchors` of site ``name`` of ``model``."""
    return site_anchors(dict(model.named_parameters()), name)


def indexer_for(model: nn.Module, call: SiteCall, config: DSAConfig) -> Indexer:
    """The site's indexer from the registry (a training-free one on first use)."""
    fqns, anchors = model_anchors(model, call.name)
    hq, hkv, d = call.q.shape[1], call.k.shape[1], call.q.shape[-1]
    return REGISTRY.get_or_create(call.name, fqns, anchors, hq, hkv, d, config,
                                  device=call.q.device)


def grouped_indexer_for(model: nn.Module, call: SiteCall) -> GroupedIndexer:
    """The site's per-KV-group indexer from :data:`GROUPED_REGISTRY` (a training-free one,
    fitted on its first call, when there is none)."""
    fqns, anchors = model_anchors(model, call.name)
    found = GROUPED_REGISTRY.lookup(anchors)
    if found is None:
        hq, hkv, d = call.q.shape[1], call.k.shape[1], call.q.shape[-1]
        found = GroupedIndexer(hq, hkv, d).to(call.q.device)
        GROUPED_REGISTRY.register(call.name, fqns, anchors, found)
    return found


def site_dsa_attention(call: SiteCall, indexer: Indexer, config: DSAConfig,
                       k: Tensor | None = None, v: Tensor | None = None) -> Tensor:
    """DSA attention of one SDPA call with ``indexer``, sparse path forced: the one
    place outside the passes that turns a site into ``dsa.attention`` (the harness's
    "dsa" mode, calibration's checks and the ONNX exporter's SDPA override run it).

    ``k`` / ``v``: [B, Hkv, Lk, D] in place of the call's (a caller that undid a K/V
    repeat); the queries end at the last key (q_offset = Lk - Lq). Returns
    [B, Hq, Lq, Dv].
    """
    k = call.k if k is None else k
    v = call.v if v is None else v
    q_idx, k_idx, w = indexer(call.q, k)
    return torch.ops.dsa.attention(call.q, k, v, q_idx, k_idx, w, config.top_k, call.scale,
                                   causal=call.causal, q_offset=k.shape[2] - call.q.shape[2],
                                   softcap=config.softcap, dense_below=0)


def grouped_dsa_attention(call: SiteCall, indexer: GroupedIndexer, config: DSAConfig) -> Tensor:
    """DSA with per-KV-group selection: group g's indexer picks top_k keys for the Hq / Hkv
    query heads of KV head g, and ``dsa::sparse_attention`` runs with indices
    [B, Hkv, Lq, top_k]. Queries with at most ``config.dense_threshold()`` visible keys
    run dense, as in ``dsa::attention``. -> [B, Hq, Lq, Dv]."""
    from dsa_compile.ops.attention import dense_rows

    q, k, v = call.q, call.k, call.v
    lq, lk = q.shape[2], k.shape[2]
    offset = lk - lq if call.causal else 0
    n_dense = dense_rows(lq, lk, config.top_k, offset, call.causal, config.dense_below)
    parts = []
    if n_dense > 0:
        keep = None
        if call.causal:  # query t sits at offset + t
            pos = torch.arange(n_dense, device=q.device)[:, None] + offset
            keep = torch.arange(lk, device=q.device)[None, :] <= pos
        parts.append(F.scaled_dot_product_attention(q[:, :, :n_dense], k, v, attn_mask=keep,
                                                    scale=call.scale,
                                                    enable_gqa=q.shape[1] != k.shape[1]))
    if n_dense < lq:
        qs = q[:, :, n_dense:]
        indices = torch.stack([
            torch.ops.dsa.indexer_topk(q_idx, k_idx, w, config.top_k, offset + n_dense,
                                       call.causal, None)
            for q_idx, k_idx, w in indexer(qs, k)], dim=1)  # [B, Hkv, Lq', top_k]
        parts.append(torch.ops.dsa.sparse_attention(qs, k, v, indices, call.scale,
                                                    config.softcap)[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def window_attention(call: SiteCall, width: int) -> Tensor:
    """Causal sliding window: query t sees keys t - width + 1 .. t. -> [B, Hq, Lq, Dv]."""
    lq, lk = call.q.shape[2], call.k.shape[2]
    pos = torch.arange(lq, device=call.q.device)[:, None] + (lk - lq)
    key = torch.arange(lk, device=call.q.device)[None, :]
    mask = (key <= pos) & (key > pos - width)
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask,
                                          scale=call.scale,
                                          enable_gqa=call.q.shape[1] != call.k.shape[1])


def head_summed_attention(q: Tensor, k: Tensor, scale: float, causal: bool,
                          start: int = 0, q_offset: int = 0) -> Tensor:
    """Dense attention summed over query heads and L1-normalised: [B, Lq, Lk] float32.

    The DSA distillation target. Queries are rows ``start ..`` of the site; with GQA each
    KV head serves ``Hq / Hkv`` query heads.
    """
    lq, lk = q.shape[2], k.shape[2]
    visible = None
    if causal:
        pos = torch.arange(lq, device=q.device)[:, None] + start + q_offset
        visible = torch.arange(lk, device=q.device)[None, :] <= pos
    return grouped_probs(q, k, scale, visible).sum((1, 2)) / q.shape[1]


def oracle_indices(call: SiteCall, top_k: int, chunk: int = 256,
                   per_group: bool = False) -> Tensor:
    """Top-k keys by head-summed dense attention (the best any shared selection can do).

    Returns int32 [B, Lq, top_k] in the indexer_topk contract (ascending, -1 unused);
    with ``per_group``, [B, Hkv, Lq, top_k]: each KV group's top-k by its own heads' sum.
    """
    from dsa_compile.reference.indexer import select_topk

    if per_group:
        g = call.q.shape[1] // call.k.shape[1]
        return torch.stack([oracle_indices(SiteCall(call.name, call.module,
                                                    call.q[:, h * g : (h + 1) * g],
                                                    call.k[:, h : h + 1], call.v[:, h : h + 1],
                                                    call.scale, call.causal), top_k, chunk)
                            for h in range(call.k.shape[1])], dim=1)
    lq, lk = call.q.shape[2], call.k.shape[2]
    parts = []
    for s in range(0, lq, chunk):
        p = head_summed_attention(call.q[:, :, s : s + chunk], call.k, call.scale,
                                  call.causal, start=s, q_offset=lk - lq)
        if call.causal:
            pos = torch.arange(p.shape[1], device=p.device)[:, None] + s + lk - lq
            p = p.masked_fill(torch.arange(lk, device=p.device)[None, :] > pos, float("-inf"))
        parts.append(select_topk(p, top_k))
    return torch.cat(parts, dim=1)


class _SDPAOverride(TorchFunctionMode):
    def __init__(self, model: nn.Module, handler: Callable[[SiteCall], Tensor | None]):
        super().__init__()
        self.model, self.handler = model, handler
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.skipped = 0
        self.swapped = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not self.stack:
            return func(*args, **kwargs)
        call = self._site_call(*args, **kwargs)
        out = self.handler(call) if call is not None else None
        if out is None:
            self.skipped += call is None
            return func(*args, **kwargs)
        self.swapped += 1
        return out

    def _site_call(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False) -> SiteCall | None:
        if attn_mask is not None or dropout_p != 0.0 or query.shape[2] < 2:
            return None
        if query.shape[1] != key.shape[1] and not enable_gqa:
            return None
        module = self.stack[-1]
        scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        return SiteCall(self.names.get(module, ""), module, query, key, value, float(scale),
                        bool(is_causal))


@contextlib.contextmanager
def attention_override(model: nn.Module, mode: str = "dense", config: DSAConfig | None = None,
                       window: int | None = None,
                       handler: Callable[[SiteCall], Tensor | None] | None = None,
                       per_group: bool = False) -> Iterator[_SDPAOverride]:
    """Run ``model`` inside the block with its SDPA calls swapped.

    Args:
        model: any module whose attention calls ``F.scaled_dot_product_attention``
            (Hugging Face models with ``attn_implementation="sdpa"``, the default).
        mode: "dense" (unchanged), "window" (last ``window`` keys, default top_k),
            "oracle" (top_k by head-summed dense attention), "dsa" (the DSA op with
            each site's registry indexer, sparse path forced), or "capture" with
            ``handler`` (called with every :class:`SiteCall`; return None to run dense).
        config: top_k and indexer shape (default DSAConfig()).
        per_group: "dsa" and "oracle" select per KV group (G = Hkv: each KV head's query
            heads get their own top_k keys, from the site's :class:`GroupedIndexer` in
            :data:`GROUPED_REGISTRY` for "dsa") instead of one selection shared by all
            heads. Harness only: the compiled path shares one selection.

    Yields the override; its ``swapped`` / ``skipped`` count the calls.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = config or DSAConfig()
    width = window or config.top_k

    def dispatch(call: SiteCall) -> Tensor | None:
        if mode == "dense":
            return None
        if mode == "capture":
            return handler(call)
        if mode == "window":
            return window_attention(call, width)
        if mode == "oracle":
            idx = oracle_indices(call, config.top_k, per_group=per_group)
            return torch.ops.dsa.sparse_attention(call.q, call.k, call.v,
                                                  idx if per_group else idx.unsqueeze(1),
                                                  call.scale, 0.0)[0]
        if per_group:
            return grouped_dsa_attention(call, grouped_indexer_for(model, call), config)
        return site_dsa_attention(call, indexer_for(model, call, config), config)

    mode_obj = _SDPAOverride(model, dispatch)

    def push(module, args):
        mode_obj.stack.append(module)

    def pop(module, args, output):
        mode_obj.stack.pop()

    hooks = []
    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(push))
        hooks.append(module.register_forward_hook(pop, always_call=True))
    try:
        with mode_obj:
            yield mode_obj
    finally:
        for h in hooks:
            h.remove()
