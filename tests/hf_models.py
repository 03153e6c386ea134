"""Tiny random-weight Hugging Face causal LMs built from configs (no downloads).

Each family keeps its default config (``use_cache=True``, its own cache type and mask
rules: Mistral's and Gemma-2's sliding windows, Gemma-2's soft-capping, Phi-3's fused
qkv, GPT-NeoX's partial rotary, OPT's learned positions, Falcon's alibi-free MQA) and
only shrinks the sizes. Lengths in the tests are odd so nothing lines up by accident.
"""

from __future__ import annotations

import torch

_SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 24}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 8, "sliding_window": 24}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {}),
    "opt": ("OPTForCausalLM", "OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32,
                                             "num_key_value_heads": None}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4,
                                               "n_positions": 256}),
    "falcon": ("FalconForCausalLM", "FalconConfig", {"new_decoder_architecture": True,
                                                     "num_kv_heads": 2, "alibi": False}),
}


def tiny_lm(family: str, attn: str = "sdpa", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A random-weight model of ``family`` with attention implementation ``attn``."""
    import transformers

    cls_name, config_name, extra = FAMILIES[family]
    cfg = {k: v for k, v in {**_SMALL, **extra}.items() if v is not None}
    cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = layers
    config = getattr(transformers, config_name)(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    model.generation_config.pad_token_id = 0
    return model
