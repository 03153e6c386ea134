"""The lightning indexer of one attention site, and the registry that keeps it.

An :class:`Indexer` turns the site's own (post-projection, post-RoPE) queries and keys
into the DSA indexer inputs:

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D]
        ->  q_idx [B, Lq, H_I, d_I], k_idx [B, Lk, d_I], w [B, Lq, H_I]

    q_idx = q_cat @ wq + bq       q_cat: the Hq query heads of a token, concatenated
    k_idx = k_cat @ wk + bk       k_cat: the Hkv key heads of a token, concatenated
    w     = softplus(q_cat @ ww + bw)

Cost per (query, key) pair is H_I * d_I multiply-adds; the default keeps it at most a
quarter of the attention's Hq * D (SmolLM2: 144 of 576).

Training-free start (:func:`fit.fit_indexer`, or the data-free :meth:`reset_parameters`):
the key width is split into one block per KV group plus one bias dimension. Block g
holds a rank-r factorisation of that group's logits, ``q_g . k_g ~ (q_g P_g)(k_g R_g)``
with q_g the sum of the group's query heads times the attention scale, so the index
score is (up to ReLU) the sum of all heads' attention logits. ``fit`` takes P, R from
example activations: the best rank-r approximation of the bilinear form q^T k under
the data's second moments (SVD of Cq^1/2 Ck^1/2, keys centred because a per-query
constant does not change a ranking). Without data, ``reset_parameters`` uses random
orthogonal projections. The bias dimension (k = 1, q = c >= 0) lifts the logits above
zero so ReLU does not flatten the useful part of the ranking.

Measured on SmolLM2-135M-Instruct, L = 2048, top_k = 256, Python reference manual text
(see examples/demo.py and the report in dsa_compile/calibration.py):

| indexer (cost 144 = 1/4 of QK^T per pair)         | perplexity | vs dense 11.707 |
|---------------------------------------------------|------------|-----------------|
| H_I = 3, d_I = 48, fitted (15 dims/group + bias)  | 11.946     | 1.020x          |
| H_I = 1, d_I = 144, fitted (47 dims/group + bias) | 11.988     | 1.024x          |
| H_I = 1, d_I = 144, random orthogonal, no bias    | 22.03      | 1.88x           |
| H_I = 3, d_I = 48, lowest RoPE frequencies        | 218        | (ReLU cuts)     |
| oracle top-256 by head-summed attention           | 11.785     | 1.007x          |
| sliding window of 256 keys                        | 23.26      | 1.99x           |

(2 blocks of 2048 tokens; fit on one other 2048-token block.) The default is
therefore H_I = Hkv, d_I = Hq * D / (4 * Hkv), fitted. Data-free inits are poor, so an
indexer that has never seen data fits itself on its first eager call with at least
``FIT_MIN_TOKENS`` keys (``fitted`` says whether that happened; calibration and
``load_indexers`` set it).

Indexers outlive compiled graphs: the registry maps the site's parameters (by tensor
identity) to its indexer, so every compile of the same model -- a recompile for a new
shape, a calibrated model compiled later -- finds the same indexer.

Layout: ``module`` (the modules), ``fit`` (training-free fitting, and when it happens),
``registry`` (which indexer a site has).
"""

from dsa_compile.indexer.fit import (
    FIT_MIN_TOKENS,
    ensure_fitted,
    fit_indexer,
    low_rank_bilinear,
    non_finite_parameters,
)
from dsa_compile.indexer.module import (
    GroupedIndexer,
    Indexer,
    default_index_shape,
    grouped_index_shape,
)
from dsa_compile.indexer.registry import (
    GROUPED_REGISTRY,
    REGISTRY,
    IndexerRegistry,
    reset_indexers,
    site_anchors,
)

__all__ = [
    "FIT_MIN_TOKENS", "GROUPED_REGISTRY", "REGISTRY", "GroupedIndexer", "Indexer",
    "IndexerRegistry", "default_index_shape", "ensure_fitted", "fit_indexer",
    "grouped_index_shape", "low_rank_bilinear", "non_finite_parameters", "reset_indexers",
    "site_anchors",
]
