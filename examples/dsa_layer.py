"""A small attention layer written in DeepSeek-V3.2 reference DSA style, and its lowering.

    python examples/dsa_layer.py

The layer computes the index scores densely from its own q_I, k_I, w, takes the top-k,
scatters -inf everywhere else, and runs dense softmax attention (the way the reference
inference code does prefill). ``dsa_compile.apply`` recognises the form and lowers it to
``dsa.indexer_topk`` + ``dsa.sparse_attention`` with the model's own indexer tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DSALayer(nn.Module):
    """Causal DSA attention. x: [B, L, dim] -> [B, L, dim].

    index_heads (H_I) x index_dim (d_I) indexer; top_k keys per query. H_I defaults to 16
    so that index scores tie (all ReLUs zero) with negligible probability: torch.topk
    and dsa.indexer_topk break ties differently.
    """

    def __init__(self, dim: int = 64, heads: int = 4, index_heads: int = 16,
                 index_dim: int = 16, top_k: int = 8):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.hi, self.di, self.top_k = index_heads, index_dim, top_k
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.wq_index = nn.Linear(dim, index_heads * index_dim, bias=False)
        self.wk_index = nn.Linear(dim, index_dim, bias=False)
        self.w_index = nn.Linear(dim, index_heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.wk(x).view(b, t, self.h, self.d).transpose(1, 2)
        v = self.wv(x).view(b, t, self.h, self.d).transpose(1, 2)
        q_i = self.wq_index(x).view(b, t, self.hi, self.di)       # [B, L, H_I, d_I]
        k_i = self.wk_index(x)                                      # [B, L, d_I]
        w = self.w_index(x) * self.hi ** -0.5                       # [B, L, H_I]
        index = torch.einsum("bshd,btd->bsht", q_i, k_i).relu()
        index = (index * w[..., None]).sum(dim=2)                   # [B, L, L]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        index = index.masked_fill(~causal, float("-inf"))
        top = index.topk(min(self.top_k, t), dim=-1)[1]
        sparse = torch.full((b, t, t), float("-inf"), device=x.device).scatter(-1, top, 0.0)
        scores = q @ k.transpose(-2, -1) * self.d ** -0.5 + sparse[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def main() -> None:
    import dsa_compile

    torch.manual_seed(0)
    layer = DSALayer().eval()
    x = torch.randn(2, 37, 64)
    lowered = dsa_compile.apply(layer, (x,))
    print(lowered.dsa_report)
    with torch.no_grad():
        err = (lowered(x) - layer(x)).abs().max().item()
    print(f"max |lowered - reference| = {err:.2e}")


if __name__ == "__main__":
    main()
