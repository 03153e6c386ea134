"""The indexer modules: :class:`Indexer` (one selection shared by a site's heads) and
:class:`GroupedIndexer` (one per KV group), with their default shapes."""

from __future__ import annotations

import math

import torch
from torch import nn

from dsa_compile.indexer.fit import ensure_fitted, fit_indexer


def default_index_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(H_I, d_I) by default: one indexer head per KV group, H_I * d_I at most a quarter
    of the attention's Hq * D multiply-adds per (query, key) pair (SmolLM2: 3 x 48)."""
    budget = max(1, (num_q_heads * head_dim) // 4)
    return num_kv_heads, max(budget // num_kv_heads, num_kv_heads + 1)



def _check_heads(num_q_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of "
                         f"num_kv_heads ({num_kv_heads})")


class Indexer(nn.Module):
    """Lightning indexer fed from one site's queries and keys (see the module doc).

    Args:
        num_q_heads, num_kv_heads, head_dim: the site's attention shape (Hq, Hkv, D).
        index_heads, index_dim: the indexer's shape H_I x d_I (None = from
            :func:`default_index_shape`).

    Parameters: wq [Hq*D, H_I*d_I], bq [H_I*d_I], wk [Hkv*D, d_I], bk [d_I],
    ww [Hq*D, H_I], bw [H_I]. Raises ValueError when Hq is not a multiple of Hkv or
    d_I leaves no room for one dimension per KV group plus the bias dimension.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 index_heads: int | None = None, index_dim: int | None = None):
        super().__init__()
        _check_heads(num_q_heads, num_kv_heads)
        heads, dim = default_index_shape(num_q_heads, num_kv_heads, head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.index_heads = index_heads or heads
        self.index_dim = index_dim or dim
        if self.index_dim < num_kv_heads + 1:
            raise ValueError(f"index_dim must be at least num_kv_heads + 1 = {num_kv_heads + 1} "
                             f"(one dim per KV group and a bias dim), got {self.index_dim}")
        hq_d, hkv_d = num_q_heads * head_dim, num_kv_heads * head_dim
        width = self.index_heads * self.index_dim
        self.wq = nn.Parameter(torch.empty(hq_d, width))
        self.bq = nn.Parameter(torch.zeros(width))
        self.wk = nn.Parameter(torch.empty(hkv_d, self.index_dim))
        self.bk = nn.Parameter(torch.zeros(self.index_dim))
        self.ww = nn.Parameter(torch.zeros(hq_d, self.index_heads))
        self.bw = nn.Parameter(torch.zeros(self.index_heads))
        self.fitted = False
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """Dimensions of the key width given to each KV group (the last one is the bias)."""
        return min(self.head_dim, (self.index_dim - 1) // self.num_kv_heads)

    def _head_of_group(self, group: int) -> int:
        return group % self.index_heads

    @torch.no_grad()
    def _set_projections(self, projections: list[tuple[torch.Tensor, torch.Tensor]],
                         bias: torch.Tensor) -> None:
        """Place group g's (P_g [D, r], R_g [D, r]) in its block; ``bias`` [H_I] is c_j."""
        d, r, di = self.head_dim, self.rank, self.index_dim
        group_size = self.num_q_heads // self.num_kv_heads
        scale = d ** -0.5
        for t in (self.wq, self.bq, self.wk, self.bk, self.ww):
            t.zero_()
        self.bw.fill_(math.log(math.e - 1))  # softplus^-1(1): w = 1
        for g, (p, rk) in enumerate(projections):
            j = self._head_of_group(g)
            cols = slice(j * di + g * r, j * di + (g + 1) * r)
            for h in range(g * group_size, (g + 1) * group_size):
                self.wq[h * d : (h + 1) * d, cols] = p.to(self.wq) * scale
            self.wk[g * d : (g + 1) * d, g * r : (g + 1) * r] = rk.to(self.wk)
        self.bk[di - 1] = 1.0
        for j in range(self.index_heads):
            self.bq[j * di + di - 1] = bias[j]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Data-free start: random orthogonal projections of each KV group, no bias."""
        gen = torch.Generator().manual_seed(0)
        d, r = self.head_dim, self.rank
        projections = []
        for _ in range(self.num_kv_heads):
            basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
            p = basis[:, :r] * math.sqrt(d / r)
            projections.append((p, p))
        self._set_projections(projections, torch.zeros(self.index_heads))

    def fit(self, q: torch.Tensor, k: torch.Tensor, max_samples: int = 8192) -> Indexer:
        """Training-free fit from example activations of this site
        (:func:`dsa_compile.indexer.fit.fit_indexer`). Returns self."""
        return fit_indexer(self, q, k, max_samples)

    def _where(self) -> str:
        name = getattr(self, "site_name", None)
        return f" (site {name!r})" if name is not None else ""

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"Indexer expects q [B, Hq, Lq, D] and k [B, Hkv, Lk, D], got "
                             f"q {tuple(q.shape)} and k {tuple(k.shape)}")
        if (q.shape[1], q.shape[3]) != (self.num_q_heads, self.head_dim) or (
                k.shape[1], k.shape[3]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"Indexer built for Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim} got q {tuple(q.shape)} and k {tuple(k.shape)}")

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> (q_idx [B, Lq, H_I, d_I],
        k_idx [B, Lk, d_I], w [B, Lq, H_I]) in q's dtype."""
        ensure_fitted(self, q, k)  # a never-fitted indexer fits on its first real call
        return self._project(q, k)

    def _project(self, q: torch.Tensor, k: torch.Tensor):
        q_idx, w = self.project_queries(q)
        return q_idx, self.project_keys(k).to(q.dtype), w

    def project_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, Lq, D] -> (q_idx [B, Lq, H_I, d_I], w [B, Lq, H_I]) in q's dtype."""
        b, hq, lq, d = q.shape
        q_cat = q.permute(0, 2, 1, 3).reshape(b, lq, hq * d).to(self.wq.dtype)
        q_idx = (q_cat @ self.wq + self.bq).view(b, lq, self.index_heads, self.index_dim)
        w = nn.functional.softplus(q_cat @ self.ww + self.bw)
        return q_idx.to(q.dtype), w.to(q.dtype)

    def project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, Hkv, Lk, D] -> k_idx [B, Lk, d_I] in k's dtype. A row depends on its own
        token only, which is what lets an index-key cache project each token once."""
        b, hkv, lk, d = k.shape
        k_cat = k.permute(0, 2, 1, 3).reshape(b, lk, hkv * d).to(self.wk.dtype)
        return (k_cat @ self.wk + self.bk).to(k.dtype)


def grouped_index_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(H_I, d_I) of each KV group's indexer in a :class:`GroupedIndexer`: one head of
    width budget / Hkv, so the Hkv groups together cost what the shared default costs
    (SmolLM2: 3 groups x 1 x 48 = 144 multiply-adds per (query, key) pair)."""
    budget = max(1, (num_q_heads * head_dim) // 4)
    return 1, max(budget // num_kv_heads, 2)


class GroupedIndexer(nn.Module):
    """Per-KV-group selection: one :class:`Indexer` per KV group, each fed only its own
    group's query heads and key head, each choosing its own top_k keys.

    Selection then has the ``indices [B, G, Lq, top_k]`` shape with G = Hkv that
    ``dsa::sparse_attention`` accepts, instead of one selection shared by all heads.
    Group g's indexer is ``groups[g]``, an ordinary Indexer with Hq / Hkv query heads and
    one KV head (so fit, calibration and its projections are the shared indexer's).

    Args:
        num_q_heads, num_kv_heads, head_dim: the site's attention shape (Hq, Hkv, D).
        index_heads, index_dim: each group's (H_I, d_I); None = :func:`grouped_index_shape`.

    Raises ValueError as :class:`Indexer` does.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 index_heads: int | None = None, index_dim: int | None = None):
        super().__init__()
        _check_heads(num_q_heads, num_kv_heads)
        heads, dim = grouped_index_shape(num_q_heads, num_kv_heads, head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group_size = num_q_heads // num_kv_heads
        self.groups = nn.ModuleList(Indexer(self.group_size, 1, head_dim, index_heads or heads,
                                            index_dim or dim)
                                    for _ in range(num_kv_heads))

    @property
    def fitted(self) -> bool:
        return all(ix.fitted for ix in self.groups)

    @fitted.setter
    def fitted(self, value: bool) -> None:
        for ix in self.groups:
            ix.fitted = value

    @property
    def cost_per_pair(self) -> int:
        """Multiply-adds per (query, key) pair of all groups' index scores together."""
        return sum(ix.index_heads * ix.index_dim for ix in self.groups)

    def group_inputs(self, q: torch.Tensor, k: torch.Tensor,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group ``group``'s q [B, Hq/Hkv, Lq, D] and k [B, 1, Lk, D] (views)."""
        g = self.group_size
        return q[:, group * g : (group + 1) * g], k[:, group : group + 1]

    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: torch.Tensor, max_samples: int = 8192) -> GroupedIndexer:
        """Fit every group's indexer on its own heads (see :meth:`Indexer.fit`)."""
        for g, ix in enumerate(self.groups):
            ix.fit(*self.group_inputs(q, k, g), max_samples=max_samples)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> one (q_idx [B, Lq, H_I, d_I],
        k_idx [B, Lk, d_I], w [B, Lq, H_I]) per KV group, a list of Hkv tuples."""
        return [ix(*self.group_inputs(q, k, g)) for g, ix in enumerate(self.groups)]
