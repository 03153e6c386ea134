"""Recording every attention site's q and k on dense forwards: what calibration trains
on and the recall metrics measure. Creates (or finds) each site's indexer on the way."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.evaluation.harness import (
    SiteCall,
    attention_override,
    grouped_indexer_for,
    model_anchors,
)
from dsa_compile.indexer import REGISTRY, GroupedIndexer, Indexer, ensure_fitted


@dataclasses.dataclass
class CapturedSite:
    """One site's recorded activations and its indexer (see :func:`capture_sites`)."""

    name: str
    module: nn.Module
    indexer: Indexer | GroupedIndexer
    scale: float
    causal: bool
    acts: list[tuple[Tensor, Tensor]]  # per batch: q [B, Hq, L, D], k [B, Hkv, L, D] on CPU



def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


def batch_tokens(batch) -> int:
    """Tokens in one batch: input_ids [B, L] or a dict holding it (0 otherwise)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return int(ids.numel()) if isinstance(ids, Tensor) else 0


@torch.no_grad()
def capture_sites(model: nn.Module, batches: Iterable, config: DSAConfig,
                  caller: str = "calibrate",
                  per_group: bool = False) -> tuple[dict[str, CapturedSite], int]:
    """One dense forward per batch, recording every site's q and k (post-RoPE).

    Creates (or finds) each site's indexer in the registry (with ``per_group``, its
    :class:`GroupedIndexer` in ``GROUPED_REGISTRY``) and fits an unfitted one on the first
    batch. Returns ({site: CapturedSite}, tokens seen). Raises ValueError (prefixed
    with ``caller``) when ``batches`` is empty, a site's q or k holds NaN / inf, or the
    model makes no attention call DSA can take.
    """
    if isinstance(batches, Tensor):
        batches = [batches]  # one batch [B, L]; iterating it would yield 1-D rows
    sites: dict[str, CapturedSite] = {}
    tokens = 0
    count = 0

    def record(call: SiteCall):
        for name, t in (("q", call.q), ("k", call.k)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{caller}: batch {count}: the attention {name} of site {call.name!r} "
                    f"holds NaN or inf values; the model's weights or inputs are not finite "
                    f"(a NaN weight propagates into every later layer): fix them first")
        site = sites.get(call.name)
        if site is None:
            fqns, anchors = model_anchors(model, call.name)
            indexer = grouped_indexer_for(model, call) if per_group else REGISTRY.get_or_create(
                call.name, fqns, anchors, call.q.shape[1], call.k.shape[1], call.q.shape[-1],
                config, device=call.q.device)
            ensure_fitted(indexer, call.q, call.k, min_tokens=1)
            site = sites[call.name] = CapturedSite(call.name, call.module, indexer, call.scale,
                                            call.causal, [])
        site.acts.append((call.q.detach().to("cpu", copy=True),
                          call.k.detach().to("cpu", copy=True)))
        return None

    with attention_override(model, "capture", config, handler=record):
        for batch in batches:
            _run(model, batch)
            tokens += batch_tokens(batch)
            count += 1
    if count == 0:
        raise ValueError(f"{caller}: batches is empty; pass at least one input_ids tensor "
                         f"[B, L] or dict of model inputs")
    if not sites:
        raise ValueError(f"{caller}: the model made no F.scaled_dot_product_attention call "
                         f"that DSA can take (unmasked, no dropout, more than one query); "
                         f"nothing to measure or calibrate")
    return sites, tokens
