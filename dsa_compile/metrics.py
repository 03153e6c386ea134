"""How much attention the indexer's selection keeps, per layer.

For each site and each query that sees more than top_k keys (the only ones whose
selection drops anything):

- attention recall: the share of the head-summed, L1-normalised dense attention that
  falls on the selected keys (1.0 = nothing of weight dropped);
- top-k recall: |selected & exact top-k of that attention| / top_k.

Both are averaged over those queries.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.reference.dense import grouped_probs


@dataclasses.dataclass
class LayerRecall:
    site: str
    attention_recall: float
    topk_recall: float
    queries: int


@dataclasses.dataclass
class RecallReport:
    """Per-site recall; ``str()`` is a table, :meth:`plot` writes a PNG."""

    top_k: int
    layers: list[LayerRecall]

    def __str__(self) -> str:
        lines = [f"selection recall at top_k={self.top_k}",
                 f"{'site':<40} {'attention':>9} {'top-k':>7} {'queries':>8}"]
        for r in self.layers:
            lines.append(f"{r.site:<40} {r.attention_recall:>9.4f} {r.topk_recall:>7.4f} "
                         f"{r.queries:>8}")
        if self.layers:
            mean_a = sum(r.attention_recall for r in self.layers) / len(self.layers)
            mean_t = sum(r.topk_recall for r in self.layers) / len(self.layers)
            lines.append(f"{'mean':<40} {mean_a:>9.4f} {mean_t:>7.4f}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> str:
        """Recall by layer as a PNG at ``path``; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = range(len(self.layers))
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(x, [r.attention_recall for r in self.layers], "o-", label="attention mass kept")
        ax.plot(x, [r.topk_recall for r in self.layers], "s--", label="recall vs exact top-k")
        ax.set_xlabel("layer (attention site)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.02)
        ax.set_title(title or f"DSA selection recall, top_k={self.top_k}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
        plt.close(fig)
        return os.fspath(path)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (Frobenius norms over every element): how the
    tests and benchmarks compare a kernel with its reference."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def recall_of_selection(attention: Tensor, selected: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Recall of one selection against a dense attention distribution.

    Args:
        attention: [..., Lk] float, each row a distribution over keys (0 where hidden).
        selected: int [..., top_k] key indices, -1 for unused slots.
        top_k: the budget (exact top-k is taken over ``attention``).

    Returns (attention mass on selected keys [...], |selected & exact top-k| / k [...]),
    where k = min(top_k, keys with nonzero attention) per row.
    """
    valid = selected >= 0
    idx = selected.clamp_min(0).long()
    mass = (torch.gather(attention, -1, idx) * valid).sum(-1)
    k = min(top_k, attention.shape[-1])
    exact = attention.topk(k, dim=-1).indices
    # Unused slots scatter into an extra column, so they cannot unmark a real key.
    lk = attention.shape[-1]
    chosen = torch.zeros(*attention.shape[:-1], lk + 1, dtype=torch.bool, device=attention.device)
    chosen.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, lk)), True)
    hits = torch.gather(chosen, -1, exact).sum(-1).float()
    return mass, hits / k


@torch.no_grad()
def selection_recall(model: nn.Module, batches: Iterable, config: DSAConfig | None = None,
                     max_queries: int = 512) -> RecallReport:
    """Per-site selection recall of ``model``'s registered (or training-free) indexers.

    Args:
        model: a model whose attention calls ``F.scaled_dot_product_attention``.
        batches: iterable of input_ids int64 [B, L] or dicts of model kwargs.
        config: top_k and indexer shape.
        max_queries: query rows per site and batch that are scored (evenly spaced over
            the queries that see more than top_k keys).

    Returns a :class:`RecallReport` (sites in call order). Raises ValueError when
    ``batches`` is empty, the model makes no attention call DSA can take, a site's
    activations hold NaN / inf, or no batch is long enough for any query to see more
    than top_k keys.
    """
    from dsa_compile.evaluation.capture import capture_sites

    config = config or DSAConfig()
    sites, _ = capture_sites(model, batches, config, caller="selection_recall")
    layers = []
    for name, site in sites.items():
        masses, hits, count = 0.0, 0.0, 0
        for q, k in site.acts:
            lq, lk = q.shape[2], k.shape[2]
            off = lk - lq
            first = max(0, config.top_k - off)  # query t sees off + t + 1 keys
            if first >= lq:
                continue
            rows = torch.linspace(first, lq - 1, min(max_queries, lq - first)).long().unique()
            dev = site.indexer.wq.device
            q, k = q.to(dev), k.to(dev)
            visible = torch.arange(lk, device=dev)[None, :] <= (rows.to(dev) + off)[:, None]
            attention = grouped_probs(q[:, :, rows], k, site.scale, visible).sum((1, 2)) \
                / q.shape[1]
            q_idx, k_idx, w = site.indexer(q[:, :, rows], k)
            selected = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, config.top_k, 0, False,
                                                  None) if not site.causal else \
                _causal_topk(q_idx, k_idx, w, config.top_k, rows.to(dev) + off)
            mass, hit = recall_of_selection(attention, selected, config.top_k)
            masses += mass.sum().item()
            hits += hit.sum().item()
            count += mass.numel()
        if count:
            layers.append(LayerRecall(name, masses / count, hits / count, count))
    if not layers:
        raise ValueError(f"selection_recall: no query sees more than top_k={config.top_k} keys; "
                         f"use longer batches or a smaller top_k")
    return RecallReport(config.top_k, layers)


def _causal_topk(q_idx: Tensor, k_idx: Tensor, w: Tensor, top_k: int, positions: Tensor) -> Tensor:
    """indexer_topk for queries at arbitrary absolute ``positions`` [R] (causal)."""
    from dsa_compile.reference.indexer import relu_scores, select_topk

    scores = relu_scores(q_idx, k_idx, w)
    visible = torch.arange(k_idx.shape[1], device=q_idx.device)[None, :] <= positions[:, None]
    return select_topk(scores.masked_fill(~visible[None], float("-inf")), top_k)


@torch.no_grad()
def peak_recall(indexer: nn.Module, q: Tensor, k: Tensor, scale: float, causal: bool,
                rows: Tensor, top_k: int, threshold: float = 0.5, sinks: int = 0,
                min_distance: int = 0) -> tuple[int, int]:
    """Retrieval check of one indexer: how many attention peaks its selection keeps.

    A peak is a (query row, query head) whose dense attention puts at least ``threshold``
    of its mass on one key (what a retrieval head does on a passkey needle); it is kept
    when that key is among the indexer's top_k for the row. One selection serves all of
    the indexer's query heads (for a per-KV-group indexer, pass one group's q and k).
    Peaks on the first ``sinks`` keys (attention sinks) or on keys fewer than
    ``min_distance`` positions back (local attention) are not counted: those are kept by
    almost any selection and would hide the distant peaks retrieval needs.

    Args:
        indexer: an :class:`~dsa_compile.indexer.Indexer` for q's and k's heads.
        q: [B, Hq, L, D]; k: [B, Hkv, L, D] (the same L: rows are absolute positions).
        rows: int64 [R] query positions.

    Returns (peaks kept, peaks).
    """
    b, hq, _, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    logits = torch.einsum("bgrqd,bgkd->bgrqk",
                          q[:, :, rows].float().reshape(b, hkv, hq // hkv, -1, d),
                          k.float()) * scale
    if causal:
        visible = torch.arange(lk, device=q.device)[None, :] <= rows[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
    top, key = logits.softmax(-1).max(-1)  # [B, Hkv, G, R]
    q_idx, k_idx, w = indexer(q[:, :, rows], k)
    if causal:
        selected = _causal_topk(q_idx, k_idx, w, top_k, rows)
    else:
        selected = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, top_k, 0, False, None)
    chosen = torch.zeros(b, rows.numel(), lk + 1, dtype=torch.bool, device=q.device)
    idx = selected.long()
    chosen.scatter_(-1, torch.where(idx >= 0, idx, torch.full_like(idx, lk)), True)
    peak = top >= threshold
    peak &= key >= sinks
    if causal:
        peak &= rows - key >= min_distance  # key [B, Hkv, G, R], rows [R]
    kept = torch.gather(chosen[:, None, None].expand(-1, hkv, hq // hkv, -1, -1), -1,
                        key[..., None])[..., 0]
    return int((kept & peak).sum()), int(peak.sum())
