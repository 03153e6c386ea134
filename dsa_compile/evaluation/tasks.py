"""Quality measures through the override harness: perplexity, passkey retrieval."""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.evaluation.harness import attention_override


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Tensor, mode: str = "dense",
               config: DSAConfig | None = None, per_group: bool = False) -> float:
    """exp(mean next-token NLL) over ``blocks`` [N, L] int64, one block per forward
    (``mode``, ``per_group``: see :func:`attention_override`)."""
    total, count = 0.0, 0
    device = _device_of(model)
    with attention_override(model, mode, config, per_group=per_group):
        for row in blocks:
            row = row.to(device)
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
            config: DSAConfig | None = None, seed: int = 0,
            per_group: bool = False) -> list[PasskeyResult]:
    """Passkey retrieval, ``trials`` needles at evenly spread depths: the model answers
    greedily (answer length + 2 tokens, room for a lead-in such as " the"; see
    :func:`greedy_continuation`) and the key is found when its digits appear in the
    answer. ``exact`` records the stricter criterion (the answer is the key's tokens).
    ``mode``, ``per_group``: see :func:`attention_override`."""
    rng = random.Random(seed)
    results = []
    device = _device_of(model)
    with attention_override(model, mode, config, per_group=per_group):
        for i in range(trials):
            depth = (i + 0.5) / trials
            key = str(rng.randrange(10_000, 100_000))
            prompt, answer = passkey_prompt(tokenizer, tokens, depth, key)
            prompt, answer = prompt.to(device), answer.to(device)
            got = greedy_continuation(model, prompt, answer, answer.numel() + 2).cpu()
            answer = answer.cpu()
            text = tokenizer.decode(got)
            results.append(PasskeyResult(prompt.numel() + answer.numel(), depth, key,
                                         key in text, bool(torch.equal(got[: answer.numel()],
                                                                       answer)), text))
    return results
