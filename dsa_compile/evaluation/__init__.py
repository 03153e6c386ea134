"""Measuring what DSA keeps, without the compiler, one module per job:

    harness.py  attention_override: run a model with each SDPA call swapped (dense,
                window, oracle top-k, DSA with the site's indexer, or recorded)
    text.py     real English text on the machine (pydoc_data), token blocks
    tasks.py    perplexity, passkey retrieval, greedy continuation
    models.py   load_causal_lm (SmolLM2-135M-Instruct offline by default)
    capture.py  capture_sites: every site's q and k on dense forwards (calibration, metrics)
"""

from dsa_compile.evaluation.harness import (
    MODES,
    SiteCall,
    attention_override,
    grouped_dsa_attention,
    grouped_indexer_for,
    head_summed_attention,
    indexer_for,
    model_anchors,
    oracle_indices,
    site_dsa_attention,
    window_attention,
)
from dsa_compile.evaluation.models import SMOLLM2_GGUF, load_causal_lm, smollm2_folder
from dsa_compile.evaluation.tasks import (
    PasskeyResult,
    greedy_continuation,
    passkey,
    passkey_prompt,
    perplexity,
)
from dsa_compile.evaluation.text import english_text, mixed_length_blocks, token_blocks

__all__ = [
    "MODES", "SMOLLM2_GGUF", "PasskeyResult", "SiteCall", "attention_override",
    "english_text", "greedy_continuation", "grouped_dsa_attention", "grouped_indexer_for",
    "head_summed_attention", "indexer_for", "load_causal_lm", "mixed_length_blocks",
    "oracle_indices", "passkey", "passkey_prompt", "perplexity", "model_anchors",
    "site_dsa_attention", "smollm2_folder", "token_blocks", "window_attention",
]
