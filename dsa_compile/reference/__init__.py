"""Pure PyTorch references: the spec every kernel and op is tested against."""

from dsa_compile.reference.decode import decode_attention
from dsa_compile.reference.dense import dense_attention, grouped_probs
from dsa_compile.reference.indexer import indexer_scores, indexer_topk, select_topk
from dsa_compile.reference.sparse_attention import sparse_attention

__all__ = ["decode_attention", "dense_attention", "grouped_probs", "indexer_scores",
           "indexer_topk", "select_topk", "sparse_attention"]
