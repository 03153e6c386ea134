"""Triton kernels for the DSA ops (CUDA; on CPU only under TRITON_INTERPRET=1).

- :func:`indexer_topk`: lightning-indexer scores (Triton) + chunked exact top-k.
- :func:`sparse_attention`: token-sparse attention forward with log-sum-exp; long
  calls run by query tiles (``tile_attention``: each tile's union of keys gathered
  once), short ones one program per (query, KV head).
- ``decode``: the small-Lq step (split-key scores, exact top-k, split-K attention).

The first two follow exactly the contracts of ``torch.ops.dsa.indexer_topk`` and
``torch.ops.dsa.sparse_attention``, whose CUDA kernels they are.
"""

from dsa_compile.kernels.indexer_topk import indexer_topk
from dsa_compile.kernels.sparse_attention import sparse_attention

__all__ = ["indexer_topk", "sparse_attention"]
