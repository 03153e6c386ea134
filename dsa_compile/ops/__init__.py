"""The DSA operators, registered in the ``dsa`` torch.library namespace on import.

- ``torch.ops.dsa.indexer_topk``   lightning-indexer scores + top-k -> int32 indices
- ``torch.ops.dsa.indexer_scores`` dense indexer scores (calibration, analysis)
- ``torch.ops.dsa.sparse_attention`` attention over selected keys -> (out, lse)
- ``torch.ops.dsa.attention``      one site's whole DSA attention, with dense dispatch
- ``torch.ops.dsa.pack_index_keys`` index keys -> packed FP8 keys (the FP8 index-key cache)

Each op has a fake implementation, the reference as CPU kernel, a Triton CUDA kernel,
and autograd where training needs it.
"""

from dsa_compile.ops.attention import attention
from dsa_compile.ops.index_keys import pack_index_keys
from dsa_compile.ops.indexer import indexer_scores, indexer_topk
from dsa_compile.ops.sparse_attention import sparse_attention

__all__ = ["attention", "indexer_scores", "indexer_topk", "pack_index_keys", "sparse_attention"]
