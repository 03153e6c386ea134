"""Evaluation text: real English prose read at run time from files on the machine
(Python's own reference manual, ``pydoc_data.topics``), cut into token blocks."""

from __future__ import annotations

from torch import Tensor


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


def mixed_length_blocks(tokenizer, max_length: int, tokens: int, offset_tokens: int = 0,
                        min_length: int = 1024) -> list[Tensor]:
    """Calibration batches of mixed lengths up to the context length: lengths
    ``max_length, max_length / 2, ...`` down to ``min_length``, the same number of tokens
    at each length (about ``tokens`` in all, at least one block of ``max_length``), cut
    consecutively from :func:`english_text` starting ``offset_tokens`` tokens in.

    Calibrating only on short blocks leaves the indexers unseen relative positions
    beyond the block length (measured: 2048-token calibration found 1/4 passkeys at 4K,
    4096-token calibration 4/4). Returns int64 [1, L] tensors, longest first. Raises
    ValueError when the text is too short or a length is below 1.
    """
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length and min_length must be >= 1, got {max_length}, "
                         f"{min_length}")
    lengths = [max_length]
    while lengths[-1] // 2 >= min_length:
        lengths.append(lengths[-1] // 2)
    longest = max(1, round(tokens / (len(lengths) * max_length)))  # blocks of max_length
    counts = [longest * max_length // n for n in lengths]
    ids = tokenizer(english_text(), return_tensors="pt").input_ids[0]
    need = offset_tokens + sum(n * c for n, c in zip(lengths, counts))
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {need} asked for; "
                         f"lower tokens, max_length or offset_tokens")
    out, at = [], offset_tokens
    for n, c in zip(lengths, counts):
        for _ in range(c):
            out.append(ids[at : at + n][None])
            at += n
    return out
