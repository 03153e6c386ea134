"""Calibrate the indexers (DeepSeek's dense warm-up), and save / load them.

    dsa_compile.calibrate(model, batches, DSAConfig(top_k=256))
    dsa_compile.save_indexers(model, "indexers.safetensors")
    dsa_compile.load_indexers(model, "indexers.safetensors")   # registers them
    torch.compile(model, backend="dsa")                        # finds them

Calibration freezes the model and trains only the indexers, on
KL( p[t, :] || softmax(I[t, :]) ) with p the site's dense attention summed over heads
and L1-normalised (DeepSeek's target), mixed by default half and half with the
L1-normalised max over heads so one retrieval head's peak is not divided by the head
count (``head_max``; the measured reason is in :func:`calibrate`). The model's q and k
do not depend on the indexers, so one dense forward per batch captures every site's q
and k; the training steps then reuse those activations (random query rows of a random
batch per step), which is why a few minutes of CPU suffice. Indexers are registered in
:data:`~dsa_compile.indexer.REGISTRY` under every parameter of their site's module, the
anchors the ``dsa`` backend looks up.

Files are safetensors (never pickle). Metadata: ``format`` = "dsa_compile.indexers",
``version``, and ``sites`` (JSON: per site, its anchor FQNs with shapes and the indexer
shape). Tensors are named ``<site>/<parameter>``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.evaluation.capture import CapturedSite, batch_tokens, capture_sites
from dsa_compile.evaluation.harness import model_anchors
from dsa_compile.files import destination, write_atomic
from dsa_compile.indexer import REGISTRY, GroupedIndexer, Indexer, non_finite_parameters
from dsa_compile.metrics import peak_recall
from dsa_compile.reference.dense import grouped_probs
from dsa_compile.reference.indexer import relu_scores

FORMAT = "dsa_compile.indexers"
VERSION = "1"
_PARAMS = ("wq", "bq", "wk", "bk", "ww", "bw")


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` did. ``losses``: mean KL per step (all steps, resumed ones too).

    ``retrieval_before`` / ``retrieval_after``: the retrieval check, the share of distant
    attention peaks (a query head putting at least half its mass on one key, not an
    attention sink and at least 64 positions back) whose key the top_k
    selection keeps, over every site, on the calibration batches before and after
    training (:func:`dsa_compile.metrics.peak_recall`); ``peaks`` counts them. A
    passkey needle is read through such peaks, so a drop here is a retrieval loss that
    the mean KL can hide."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    sites: list[str]
    retrieval_before: float = math.nan
    retrieval_after: float = math.nan
    peaks: int = 0

    def __str__(self) -> str:
        kl = (f"KL {self.losses[0]:.4f} -> {sum(self.losses[-10:]) / min(10, len(self.losses)):.4f}"
              if self.losses else "no steps")
        return (f"calibration: {self.steps} steps, {self.tokens} tokens, {len(self.sites)} sites, "
                f"{self.seconds:.0f} s, {kl}; retrieval check (attention peaks kept by the "
                f"selection, {self.peaks} peaks): {self.retrieval_before:.4f} -> "
                f"{self.retrieval_after:.4f}")


def fit_indexers(model: nn.Module, batches: Iterable, config: DSAConfig | None = None) -> list[str]:
    """Training-free start: create (or find) every site's indexer and fit unfitted ones on
    the activations of the first batch (see :meth:`Indexer.fit`). Returns the site names."""
    sites, _ = capture_sites(model, batches, config or DSAConfig(), caller="fit_indexers")
    return list(sites)


def _units(indexer: Indexer | GroupedIndexer, q: Tensor,
           k: Tensor) -> list[tuple[Indexer, Tensor, Tensor]]:
    """(indexer, q, k) pieces trained on their own: a shared indexer on all the site's
    heads, or each KV group's indexer of a GroupedIndexer on that group's heads."""
    if isinstance(indexer, GroupedIndexer):
        return [(ix, *indexer.group_inputs(q, k, g)) for g, ix in enumerate(indexer.groups)]
    return [(indexer, q, k)]


def _device(indexer: nn.Module) -> torch.device:
    return next(indexer.parameters()).device


RETRIEVAL_SINKS = 4
RETRIEVAL_MIN_DISTANCE = 64
"""The retrieval check counts distant peaks only: not on the first 4 keys (attention
sinks) nor within 64 positions. Counting every peak, SmolLM2 calibrations scored
0.9996-1.0000 while their 4K passkeys ranged 9/16-16/16 (benchmarks/RESULTS.md)."""


@torch.no_grad()
def retrieval_check(sites: dict[str, CapturedSite], top_k: int,
                    max_rows: int = 256) -> tuple[float, int]:
    """(share of attention peaks the selection keeps, peaks) over every site and batch:
    :func:`dsa_compile.metrics.peak_recall` on up to ``max_rows`` evenly spaced query rows
    per batch that see more than top_k keys."""
    kept, peaks = 0, 0
    for site in sites.values():
        dev = _device(site.indexer)
        for q, k in site.acts:
            lq = q.shape[2]
            if lq <= top_k:
                continue
            rows = torch.linspace(top_k, lq - 1, min(max_rows, lq - top_k)).long().unique()
            for ix, qu, ku in _units(site.indexer, q.to(dev), k.to(dev)):
                hit, count = peak_recall(ix, qu, ku, site.scale, site.causal, rows.to(dev),
                                         top_k, sinks=RETRIEVAL_SINKS,
                                         min_distance=RETRIEVAL_MIN_DISTANCE)
                kept, peaks = kept + hit, peaks + count
    return (kept / peaks if peaks else math.nan), peaks


def attention_target(probs: Tensor, head_max: float = 0.0) -> Tensor:
    """The distillation target from per-head dense attention ``probs`` [B, Hkv, G, R, Lk]
    (G = Hq / Hkv): ``(1 - head_max)`` x the head-summed, L1-normalised attention plus
    ``head_max`` x the L1-normalised max over heads. -> [B, R, Lk] float32, rows sum to 1."""
    hq = probs.shape[1] * probs.shape[2]
    target = probs.sum((1, 2)) / hq
    if head_max:
        peak = probs.amax((1, 2))
        target = (1 - head_max) * target + head_max * peak / peak.sum(-1, keepdim=True)
    return target


def indexer_kl(indexer: Indexer, q: Tensor, k: Tensor, scale: float, causal: bool,
               rows: Tensor, top_k: int | None = None, recall_weight: float = 1.0,
               head_max: float = 0.0) -> Tensor:
    """KL(dense attention target || softmax(index scores)) averaged over ``rows``; the
    target is :func:`attention_target` of the per-head attention (``head_max``).

    q: [B, Hq, L, D], k: [B, Hkv, L, D]; rows: int64 [R] query positions. Scalar fp32,
    differentiable in the indexer's parameters. With ``top_k``, adds ``recall_weight``
    times the smooth attention mass the top_k selection misses (see _missed_mass).
    """
    lk = k.shape[2]
    q_rows = q[:, :, rows]
    visible = torch.arange(lk, device=q.device)[None, :] <= rows[:, None]
    with torch.no_grad():
        target = attention_target(grouped_probs(q_rows, k, scale, visible if causal else None),
                                  head_max)
    q_idx, k_idx, w = indexer(q_rows, k)
    scores = relu_scores(q_idx, k_idx, w)
    if causal:
        scores = scores.masked_fill(~visible[None], float("-inf"))
    log_q = torch.log_softmax(scores, dim=-1)
    log_q = torch.where(target > 0, log_q, torch.zeros_like(log_q))
    kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1).mean()
    if top_k is None:
        return kl
    return kl + recall_weight * _missed_mass(scores, target, top_k)


def _missed_mass(scores: Tensor, target: Tensor, top_k: int) -> Tensor:
    """Smooth share of the target mass outside the indexer's top_k (what selection loses).

    A key counts as selected by sigmoid((score - threshold) / tau), the threshold being
    the row's top_k-th score and tau a tenth of the row's score spread (both detached).
    """
    finite = torch.isfinite(scores)
    k = min(top_k, scores.shape[-1])
    with torch.no_grad():
        threshold = scores.topk(k, dim=-1).values[..., -1:]
        filled = torch.where(finite, scores, torch.zeros_like(scores))
        count = finite.sum(-1, keepdim=True).clamp_min(1)
        mean = filled.sum(-1, keepdim=True) / count
        spread = (((filled - mean) * finite) ** 2).sum(-1, keepdim=True).div(count).sqrt()
        tau = (0.1 * spread).clamp_min(1e-6)
        threshold = torch.where(torch.isfinite(threshold), threshold, torch.zeros_like(threshold))
    soft = torch.sigmoid((torch.where(finite, scores, threshold - 50 * tau) - threshold) / tau)
    return (target * (1 - soft)).sum(-1).mean()


def _rows(length: int, count: int, top_k: int, gen: random.Random) -> Tensor:
    """Query positions to train on: those that see more than top_k keys when there are any."""
    low = top_k if length > top_k else 0
    pool = range(low, length)
    return torch.tensor(sorted(gen.sample(pool, min(count, len(pool)))), dtype=torch.long)


def calibrate(model: nn.Module, batches: Iterable, config: DSAConfig | None = None,
              steps: int = 300, lr: float = 1e-2, *, rows_per_step: int = 128,
              checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 50,
              progress: bool = True, seed: int = 0,
              recall_weight: float = 0.0, head_max: float = 0.5,
              per_group: bool = False, check_retrieval: bool = True) -> CalibrationResult:
    """Dense warm-up of every site's indexer; the model itself is frozen.

    Args:
        model: the dense model (its attention through ``F.scaled_dot_product_attention``).
        batches: iterable of input_ids int64 [B, L] or of dicts of model kwargs. Give
            lengths up to the context length the model will run at
            (:func:`dsa_compile.evaluation.mixed_length_blocks`): the indexers only learn
            the relative positions they see. Batches of different lengths are drawn in
            proportion to their tokens.
        config: top_k (queries seeing more keys are the ones trained) and indexer shape.
        steps: optimiser steps; each takes ``rows_per_step`` random query rows of one
            random batch, for every site.
        lr: Adam learning rate, relative to each parameter tensor's RMS. The defaults
            (300 steps, lr 1e-2, 128 rows) were measured on SmolLM2-135M, L = 2048,
            top_k = 256, 4 x 2048 tokens: KL 0.461 -> 0.101, perplexity 1.020x -> 1.011x
            of dense (100 steps at lr 3e-3 and 64 rows: KL 0.169, still 1.020x).
        checkpoint_dir: where ``indexers.safetensors``, ``optimizer.safetensors``,
            ``state.json`` (step, losses) and ``log.jsonl`` go every ``checkpoint_every``
            steps; an existing checkpoint there is resumed.
        progress: show a tqdm bar.
        recall_weight: weight of the smooth missed-attention-mass term added to the KL
            (0 = the plain DeepSeek KL, the default). Experimental: on SmolLM2 weight 10
            at lr 3e-3 diverged (loss 0.97 -> 2.27 in 40 steps).
        head_max: share of the target taken from the L1-normalised max over heads
            instead of DeepSeek's head-summed attention (see :func:`attention_target`).
            0 = DeepSeek's KL exactly. The default 0.5 is a deviation, measured on
            SmolLM2-135M, top_k = 256: summing divides a single retrieval head's peak by
            the head count, and an oracle selecting by the max over heads found 4/4
            passkeys at 1.5K where the head-summed oracle found 3/4 (4 trials each);
            calibrated on 4 x 2048 tokens, perplexity 11.823 (0.5) vs 11.839 (0).
        per_group: calibrate each site's :class:`GroupedIndexer` (per-KV-group selection,
            the harness's ``per_group=True``) instead of its shared indexer; each group's
            indexer learns the target of its own heads. Not with ``checkpoint_dir``.
        check_retrieval: measure the retrieval check before and after training
            (``retrieval_before`` / ``retrieval_after`` of the result; about one extra
            dense attention pass over 256 rows per batch and site).

    Returns a :class:`CalibrationResult`. Calibrated indexers are registered, so a
    later ``torch.compile(model, backend="dsa")`` or :func:`save_indexers` uses them.

    Raises ValueError, before any work, for an argument out of range (steps < 0, lr not
    finite and > 0, rows_per_step or checkpoint_every < 1, head_max outside [0, 1], ...),
    empty ``batches``, a model weight or buffer holding NaN / inf, or a checkpoint_dir
    that is a file; later when no attention site is found, a site's activations are not
    finite, a checkpoint file is corrupt (naming it), or training diverges (a non-finite
    loss or weight: the indexers are then restored to their state before training).
    """
    _check_calibrate_args(config, steps, lr, rows_per_step, checkpoint_every, recall_weight,
                          head_max, seed)
    if per_group and checkpoint_dir is not None:
        raise ValueError("calibrate: checkpoint_dir is not supported with per_group=True; "
                         "pass checkpoint_dir=None")
    if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and \
            not os.path.isdir(checkpoint_dir):
        raise ValueError(f"calibrate: checkpoint_dir {os.fspath(checkpoint_dir)!r} exists and "
                         f"is not a folder; pass a folder path (created if missing)")
    batches = [batches] if isinstance(batches, Tensor) else list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty; pass at least one input_ids tensor "
                         "[B, L] or dict of model inputs")
    _check_finite_model(model)
    config = config or DSAConfig()
    start = time.perf_counter()
    # Softmax tails underflow into denormals, which slow CPU float math many times over.
    flush = torch.set_flush_denormal(True)
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    params: list[nn.Parameter] = []
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        sites, tokens = capture_sites(model, batches, config, per_group=per_group)
        before = retrieval_check(sites, config.top_k) if check_retrieval else (math.nan, 0)
        weights = [max(1, batch_tokens(batch)) for batch in batches]
        indexers = [s.indexer for s in sites.values()]
        params = [p for ix in indexers for p in ix.parameters()]
        for p in params:
            p.requires_grad_(True)
        # lr is relative: each tensor moves by about lr times its own RMS per step, since
        # fitted projections span orders of magnitude (an absolute lr wrecks the small ones).
        opt = torch.optim.Adam([{"params": [p], "lr": lr * max(_rms(p), 1e-3)} for p in params])
        losses: list[float] = []
        done = 0
        ckpt = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt and os.path.exists(os.path.join(ckpt, "state.json")):
            done, losses = _resume(model, sites, opt, ckpt)
        # Restored if training diverges, so no NaN indexer stays registered.
        start_state = {name: {n: p.detach().clone() for n, p in site.indexer.named_parameters()}
                       for name, site in sites.items()}
        gen = random.Random(seed + done)
        bar = _progress(range(done, steps), progress, steps, done)
        for step in bar:
            # Equal batches keep the plain draw (and earlier runs' random streams).
            b = gen.randrange(len(batches)) if len(set(weights)) == 1 else \
                gen.choices(range(len(batches)), weights)[0]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for site in sites.values():
                q, k = site.acts[b]
                dev = _device(site.indexer)
                rows = _rows(q.shape[2], rows_per_step, config.top_k, gen).to(dev)
                units = _units(site.indexer, q.to(dev), k.to(dev))
                loss = sum(indexer_kl(ix, qu, ku, site.scale, site.causal, rows,
                                      config.top_k if recall_weight else None, recall_weight,
                                      head_max) for ix, qu, ku in units) / len(units)
                loss.backward()
                value = loss.item()
                if not math.isfinite(value):
                    _diverged(sites, start_state, f"step {step + 1}: the loss of site "
                              f"{site.name!r} is {value}", lr)
                total += value
            opt.step()
            for site in sites.values():
                bad = non_finite_parameters(site.indexer)
                if bad:
                    _diverged(sites, start_state, f"step {step + 1} made the weights {bad} of "
                              f"site {site.name!r} non-finite", lr)
            losses.append(total / len(sites))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if ckpt and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _checkpoint(model, opt, sites, ckpt, step + 1, losses)
        for ix in indexers:
            ix.fitted = True
        after = retrieval_check(sites, config.top_k) if check_retrieval else (math.nan, 0)
    finally:
        for p in params:
            p.requires_grad_(False)
        if flush:
            torch.set_flush_denormal(False)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return CalibrationResult(steps, tokens, time.perf_counter() - start, losses, list(sites),
                             before[0], after[0], after[1])


def _check_calibrate_args(config, steps, lr, rows_per_step, checkpoint_every, recall_weight,
                          head_max, seed) -> None:
    def number(x) -> bool:  # bool is an int subclass, but lr=True is a mistake
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def integer(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if config is not None and not isinstance(config, DSAConfig):
        raise ValueError(f"calibrate: config must be a DSAConfig or None, got "
                         f"{type(config).__name__}")
    problems = [
        (integer(steps) and steps >= 0, f"steps must be an int >= 0, got {steps!r}"),
        (number(lr) and lr > 0, f"lr must be a finite number > 0 (the default is 1e-2), "
                                f"got {lr!r}"),
        (integer(rows_per_step) and rows_per_step > 0,
         f"rows_per_step must be an int >= 1, got {rows_per_step!r}"),
        (integer(checkpoint_every) and checkpoint_every > 0,
         f"checkpoint_every must be an int >= 1 (steps between checkpoints), got "
         f"{checkpoint_every!r}"),
        (number(recall_weight) and recall_weight >= 0,
         f"recall_weight must be a finite number >= 0, got {recall_weight!r}"),
        (number(head_max) and 0.0 <= head_max <= 1.0, f"head_max must be in [0, 1], got "
                                                      f"{head_max!r}"),
        (integer(seed), f"seed must be an int, got {seed!r}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(f"calibrate: {message}")


def _check_finite_model(model: nn.Module) -> None:
    """Refuse a model whose weights hold NaN / inf: every activation after them would."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"calibrate: the model's {name!r} {tuple(t.shape)} holds NaN or "
                             f"inf values; no indexer can be fitted or calibrated on its "
                             f"attention. Reload or repair the model's weights first")


def _diverged(sites: dict[str, CapturedSite], start_state: dict, what: str, lr: float) -> None:
    """Put every indexer back as it was before training, then raise."""
    with torch.no_grad():
        for name, site in sites.items():
            for n, p in site.indexer.named_parameters():
                p.copy_(start_state[name][n])
    raise ValueError(f"calibrate: training diverged: {what} (lr={lr}); lower lr and run "
                     f"again. The indexers were restored to their state before training")


def _rms(t: Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item()


def _progress(it, enabled: bool, total: int, initial: int):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, initial=initial, desc="calibrating indexers", unit="step")


def _checkpoint(model, opt, sites, ckpt: str, step: int, losses: list[float]) -> None:
    from safetensors.torch import save_file

    os.makedirs(ckpt, exist_ok=True)
    save_indexers(model, os.path.join(ckpt, "indexers.safetensors"), sites=list(sites))
    state = {}
    names = {id(p): f"{s}/{n}" for s, site in sites.items()
             for n, p in site.indexer.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                state[f"{names[id(p)]}/{key}"] = value.detach().reshape(-1).clone().cpu() \
                    if key != "step" else torch.as_tensor(value, dtype=torch.float64).reshape(1)
    save_file(state, os.path.join(ckpt, "optimizer.safetensors"))
    with open(os.path.join(ckpt, "log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "kl": losses[-1]}) + "\n")
    tmp = os.path.join(ckpt, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "losses": losses}, f)
    os.replace(tmp, os.path.join(ckpt, "state.json"))


def _corrupt(path: str, ckpt: str, err: BaseException) -> ValueError:
    return ValueError(f"calibrate: checkpoint file {path!r} is corrupt or does not match the "
                      f"model's indexers ({type(err).__name__}: {err}); delete the folder "
                      f"{ckpt!r} (or pass another checkpoint_dir) to start over")


def _resume(model, sites, opt, ckpt: str) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    # Every file is read and checked before anything is changed.
    state_path = os.path.join(ckpt, "state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
        step, losses = state["step"], [float(x) for x in state["losses"]]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or \
                len(losses) != step:
            raise ValueError(f"step {step!r} with {len(losses)} losses")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError: ValueError
        raise _corrupt(state_path, ckpt, err) from err
    opt_path = os.path.join(ckpt, "optimizer.safetensors")
    try:
        saved = load_file(opt_path)  # safetensors raises its own error types
        states = {}
        for s, site in sites.items():
            for n, p in site.indexer.named_parameters():
                entry = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    if f"{s}/{n}/{key}" in saved:
                        entry[key] = saved[f"{s}/{n}/{key}"].view_as(p).to(p.device)
                if entry and f"{s}/{n}/step" in saved:
                    entry["step"] = torch.tensor(float(saved[f"{s}/{n}/step"][0]))
                    states[p] = entry
    except Exception as err:
        raise _corrupt(opt_path, ckpt, err) from err
    loaded = load_indexers(model, os.path.join(ckpt, "indexers.safetensors"), sites=list(sites))
    for name, site in sites.items():
        # Keep the indexer objects the optimiser holds; take the saved values into them.
        site.indexer.load_state_dict(loaded[name].state_dict())
        fqns, anchors = model_anchors(model, name)
        REGISTRY.register(name, fqns, anchors, site.indexer)
    opt.state.update(states)
    return step, losses


# --------------------------------------------------------------------------- persistence


def save_indexers(model: nn.Module, path: str | os.PathLike,
                  sites: Sequence[str] | None = None) -> list[str]:
    """Write the registered indexers of ``model`` to a safetensors file.

    Args:
        model: the model whose parameters anchor the indexers (see REGISTRY).
        path: destination file, replaced atomically (a symlink is followed: its target is
            written).
        sites: site names to save (default: every registered site of the model).

    Returns the saved site names. Raises ValueError when the model has no indexers, a
    named site has none, an indexer holds NaN / inf weights, or ``path`` is a directory
    or special file (device, FIFO) or its folder does not exist (checked first).
    """
    from safetensors.torch import save

    target = destination(path, "save_indexers")
    found = REGISTRY.sites_of(model)
    names = list(sites) if sites is not None else sorted(found)
    if not names:
        raise ValueError("save_indexers: the model has no registered indexers; run it through "
                         "calibrate, the evaluation harness or torch.compile(backend='dsa') first")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tensors, meta = {}, {}
    for name in names:
        if name not in found:
            raise ValueError(f"save_indexers: site {name!r} has no registered indexer "
                             f"(the model's sites: {sorted(found)})")
        ix, fqns = found[name]
        bad = non_finite_parameters(ix)
        if bad:
            raise ValueError(f"save_indexers: the indexer of site {name!r} has NaN or inf "
                             f"weights {bad} (a diverged calibration?); re-fit or re-calibrate "
                             f"it (e.g. with a smaller lr) before saving")
        meta[name] = {
            # FQNs relative to ``model``, whatever module the indexer was compiled through.
            "anchors": {f: list(shapes[f]) for f in fqns},
            "num_q_heads": ix.num_q_heads, "num_kv_heads": ix.num_kv_heads,
            "head_dim": ix.head_dim, "index_heads": ix.index_heads, "index_dim": ix.index_dim,
        }
        for p in _PARAMS:
            tensors[f"{name}/{p}"] = getattr(ix, p).detach().to("cpu", copy=True).contiguous()
    data = save(tensors, metadata={"format": FORMAT, "version": VERSION,
                                   "sites": json.dumps(meta)})
    write_atomic(target, data, "save_indexers")
    return names


def load_indexers(model: nn.Module, path: str | os.PathLike,
                  sites: Sequence[str] | None = None) -> dict[str, Indexer]:
    """Load indexers saved by :func:`save_indexers` and register them for ``model``.

    Args:
        model: the model they were saved for (anchors are checked by FQN and shape).
        path: the safetensors file.
        sites: site names the model needs (default: every site that already has an
            indexer registered for this model); each must be in the file.

    Returns {site: Indexer}. Raises ValueError naming the file and the site when the file
    is corrupt or not an indexer file, a tensor holds NaN / inf, a site's anchor is
    missing from the model or has another shape (a file for another model), or a needed
    site or tensor is missing.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_indexers: no such file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"load_indexers: {path!r} is corrupt or not a safetensors file "
                         f"({err}); re-save it with dsa_compile.save_indexers") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"load_indexers: {path!r} is not a dsa_compile indexer file "
                         f"(metadata format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ValueError(f"load_indexers: {path!r} has format version "
                         f"{metadata.get('version')!r}; this dsa_compile reads {VERSION}")
    try:
        meta = json.loads(metadata["sites"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"load_indexers: {path!r} has corrupt site metadata ({err})") from err
    needed = list(sites) if sites is not None else sorted(REGISTRY.indexers_of(model))
    for name in needed:
        if name not in meta:
            raise ValueError(f"load_indexers: site {name!r} of the model is missing from "
                             f"{path!r} (the file has {sorted(meta)})")
    params = dict(model.named_parameters())
    loaded = {}
    for name, info in meta.items():
        anchors = []
        for fqn, shape in info["anchors"].items():
            if fqn not in params:
                raise ValueError(f"load_indexers: site {name!r}: anchor parameter {fqn!r} is not "
                                 f"in the model -- is {path!r} a file for another model?")
            if list(params[fqn].shape) != list(shape):
                raise ValueError(f"load_indexers: site {name!r}: anchor {fqn!r} has shape "
                                 f"{list(params[fqn].shape)} in the model but {shape} in "
                                 f"{path!r} -- a file for another model?")
            anchors.append(params[fqn])
        if not anchors:
            raise ValueError(f"load_indexers: site {name!r} in {path!r} has no anchors")
        ix = Indexer(info["num_q_heads"], info["num_kv_heads"], info["head_dim"],
                     info["index_heads"], info["index_dim"])
        with torch.no_grad():
            for p in _PARAMS:
                key = f"{name}/{p}"
                if key not in tensors:
                    raise ValueError(f"load_indexers: site {name!r}: tensor {key!r} is missing "
                                     f"from {path!r} (corrupt file?)")
                if tensors[key].shape != getattr(ix, p).shape:
                    raise ValueError(f"load_indexers: site {name!r}: tensor {key!r} has shape "
                                     f"{tuple(tensors[key].shape)}, expected "
                                     f"{tuple(getattr(ix, p).shape)}")
                if not bool(torch.isfinite(tensors[key]).all()):
                    raise ValueError(f"load_indexers: site {name!r}: tensor {key!r} in "
                                     f"{path!r} holds NaN or inf values (saved from a diverged "
                                     f"calibration?); re-calibrate and save it again")
                getattr(ix, p).copy_(tensors[key])
        ix.fitted = True
        ix.to(anchors[0].device)
        loaded[name] = REGISTRY.register(name, list(info["anchors"]), anchors, ix)
    return loaded


def kl_on(model: nn.Module, batches: Iterable, config: DSAConfig | None = None) -> float:
    """Mean indexer KL over every site and every query row seeing > top_k keys
    (held-out evaluation of calibration)."""
    config = config or DSAConfig()
    sites, _ = capture_sites(model, batches, config, caller="kl_on")
    total, count = 0.0, 0
    with torch.no_grad():
        for site in sites.values():
            for q, k in site.acts:
                dev = site.indexer.wq.device
                rows = torch.arange(config.top_k if q.shape[2] > config.top_k else 0, q.shape[2])
                total += indexer_kl(site.indexer, q.to(dev), k.to(dev), site.scale, site.causal,
                                    rows.to(dev)).item()
                count += 1
    return total / max(1, count) if count else math.nan
