"""The lightning indexer of one attention site, and the registry that keeps it.

An :class:`Indexer` turns the site's own (post-projection, post-RoPE) queries and keys
into the DSA indexer inputs:

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D]  ->  q_idx [B, Lq, H_I, d_I], k_idx [B, Lk, d_I], w [B, Lq, H_I]

Indexers outlive compiled graphs: the registry maps the site's parameters (by tensor
identity) to its indexer, so every compile of the same model -- a recompile for a new
shape, a calibrated model compiled later -- finds the same indexer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from dsa_compile.config import DSAConfig


def default_index_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(H_I, d_I) by default: one indexer head per KV group, with H_I * d_I at most a
    quarter of the attention's Hq * D multiply-adds per (query, key) pair."""
    heads = num_kv_heads
    budget = max(1, (num_q_heads * head_dim) // 4)
    dim = max(8, min(head_dim, budget // heads))
    return heads, dim


class Indexer(nn.Module):
    """Lightning indexer fed from one site's queries and keys.

    q_idx = (q grouped per KV head, averaged over the group's query heads) @ wq + bq,
    k_idx = (k of all KV heads, concatenated) @ wk + bk, w = softplus(q_mean @ ww + bw).

    Args:
        num_q_heads, num_kv_heads, head_dim: the site's attention shape.
        config: supplies ``index_heads`` / ``index_dim`` (None = default_index_shape).
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 config: DSAConfig | None = None):
        super().__init__()
        config = config or DSAConfig()
        heads, dim = default_index_shape(num_q_heads, num_kv_heads, head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.index_heads = config.index_heads or heads
        self.index_dim = config.index_dim or dim
        hkv_d = num_kv_heads * head_dim
        self.wq = nn.Parameter(torch.empty(hkv_d, self.index_heads * self.index_dim))
        self.bq = nn.Parameter(torch.zeros(self.index_heads * self.index_dim))
        self.wk = nn.Parameter(torch.empty(hkv_d, self.index_dim))
        self.bk = nn.Parameter(torch.zeros(self.index_dim))
        self.ww = nn.Parameter(torch.zeros(hkv_d, self.index_heads))
        self.bw = nn.Parameter(torch.full((self.index_heads,), math.log(math.e - 1)))  # w = 1
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Training-free start: random orthogonal projections of each KV group's keys."""
        g = torch.Generator().manual_seed(0)
        d = self.head_dim
        self.wq.zero_()
        self.wk.zero_()
        per_head = max(1, self.index_dim // self.num_kv_heads)
        for j in range(self.index_heads):
            group = j % self.num_kv_heads
            proj, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
            cols = slice((group * per_head) % self.index_dim,
                         (group * per_head) % self.index_dim + per_head)
            p = proj[:, : cols.stop - cols.start] * math.sqrt(d / per_head)
            self.wk[group * d : (group + 1) * d, cols] = p
            self.wq[group * d : (group + 1) * d, j * self.index_dim + cols.start :
                    j * self.index_dim + cols.stop] = p

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> (q_idx, k_idx, w) as in the module doc."""
        b, hq, lq, d = q.shape
        hkv = k.shape[1]
        dtype = self.wq.dtype
        q_mean = q.reshape(b, hkv, hq // hkv, lq, d).mean(2).permute(0, 2, 1, 3).reshape(b, lq, hkv * d)
        k_cat = k.permute(0, 2, 1, 3).reshape(b, k.shape[2], hkv * d)
        q_mean, k_cat = q_mean.to(dtype), k_cat.to(dtype)
        q_idx = (q_mean @ self.wq + self.bq).view(b, lq, self.index_heads, self.index_dim)
        k_idx = k_cat @ self.wk + self.bk
        w = nn.functional.softplus(q_mean @ self.ww + self.bw)
        return q_idx.to(q.dtype), k_idx.to(q.dtype), w.to(q.dtype)


class IndexerRegistry:
    """Maps a site's anchor parameters (by identity) to its :class:`Indexer`.

    A site is anchored on the parameters of the module that owns it (e.g. the q/k/v
    projections of ``model.layers.0.self_attn``); the same module compiled again finds
    the same indexer. Sites without parameters get an indexer per graph.
    """

    def __init__(self) -> None:
        self._by_param: weakref.WeakKeyDictionary[torch.Tensor, Indexer] = (
            weakref.WeakKeyDictionary()
        )

    def lookup(self, anchors: Sequence[torch.Tensor]) -> Indexer | None:
        for t in anchors:
            found = self._by_param.get(t)
            if found is not None:
                return found
        return None

    def register(self, site_name: str, anchor_fqns: Sequence[str],
                 anchors: Sequence[torch.Tensor], indexer: Indexer) -> Indexer:
        indexer.site_name = site_name
        indexer.anchor_fqns = list(anchor_fqns)
        for t in anchors:
            self._by_param[t] = indexer
        return indexer

    def get_or_create(self, site_name: str, anchor_fqns: Sequence[str],
                      anchors: Sequence[torch.Tensor], num_q_heads: int, num_kv_heads: int,
                      head_dim: int, config: DSAConfig, device=None) -> Indexer:
        """The site's indexer: the registered one, else a new training-free one."""
        found = self.lookup(anchors)
        if found is not None:
            return found
        indexer = Indexer(num_q_heads, num_kv_heads, head_dim, config)
        if device is not None:
            indexer.to(device)
        return self.register(site_name, anchor_fqns, anchors, indexer)

    def indexers_of(self, model: nn.Module) -> dict[str, Indexer]:
        """{site name: indexer} for every registered site whose anchors live in ``model``."""
        found: dict[str, Indexer] = {}
        for p in model.parameters():
            indexer = self._by_param.get(p)
            if indexer is not None:
                found.setdefault(indexer.site_name, indexer)
        return found


REGISTRY = IndexerRegistry()
