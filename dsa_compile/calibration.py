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
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import SiteCall, attention_override, site_anchors
from dsa_compile.indexer import REGISTRY, Indexer

FORMAT = "dsa_compile.indexers"
VERSION = "1"
_PARAMS = ("wq", "bq", "wk", "bk", "ww", "bw")


@dataclasses.dataclass
class _Site:
    name: str
    module: nn.Module
    indexer: Indexer
    scale: float
    causal: bool
    acts: list[tuple[Tensor, Tensor]]  # per batch: q [B, Hq, L, D], k [B, Hkv, L, D] on CPU


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` did. ``losses``: mean KL per step (all steps, resumed ones too)."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    sites: list[str]


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


def _batch_tokens(batch) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return int(ids.numel()) if isinstance(ids, Tensor) else 0


@torch.no_grad()
def capture_sites(model: nn.Module, batches: Iterable,
                  config: DSAConfig) -> tuple[dict[str, _Site], int]:
    """One dense forward per batch, recording every site's q and k (post-RoPE).

    Creates (or finds) each site's indexer in the registry and fits an unfitted one on
    the first batch. Returns ({site: _Site}, tokens seen).
    """
    if isinstance(batches, Tensor):
        batches = [batches]  # one batch [B, L]; iterating it would yield 1-D rows
    sites: dict[str, _Site] = {}
    tokens = 0

    def record(call: SiteCall):
        site = sites.get(call.name)
        if site is None:
            fqns, anchors = site_anchors(model, call.module, call.name)
            indexer = REGISTRY.get_or_create(call.name, fqns, anchors, call.q.shape[1],
                                             call.k.shape[1], call.q.shape[-1], config,
                                             device=call.q.device)
            if not indexer.fitted:
                indexer.fit(call.q, call.k)
            site = sites[call.name] = _Site(call.name, call.module, indexer, call.scale,
                                            call.causal, [])
        site.acts.append((call.q.detach().to("cpu", copy=True),
                          call.k.detach().to("cpu", copy=True)))
        return None

    with attention_override(model, "capture", config, handler=record):
        for batch in batches:
            _run(model, batch)
            tokens += _batch_tokens(batch)
    if not sites:
        raise ValueError("calibrate: the model made no F.scaled_dot_product_attention call that "
                         "DSA can take (unmasked, no dropout, more than one query); nothing "
                         "to calibrate")
    return sites, tokens


def fit_indexers(model: nn.Module, batches: Iterable, config: DSAConfig | None = None) -> list[str]:
    """Training-free start: create (or find) every site's indexer and fit unfitted ones on
    the activations of the first batch (see :meth:`Indexer.fit`). Returns the site names."""
    sites, _ = capture_sites(model, batches, config or DSAConfig())
    return list(sites)


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
    b, hq, _, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    q_rows = q[:, :, rows]
    visible = torch.arange(lk, device=q.device)[None, :] <= rows[:, None]
    with torch.no_grad():
        logits = torch.einsum("bgrqd,bgkd->bgrqk",
                              q_rows.float().reshape(b, hkv, hq // hkv, -1, d), k.float()) * scale
        if causal:
            logits = logits.masked_fill(~visible, float("-inf"))
        target = attention_target(logits.softmax(-1), head_max)
    q_idx, k_idx, w = indexer(q_rows, k)
    dots = torch.einsum("bqhd,bkd->bqhk", q_idx.float(), k_idx.float())
    scores = torch.einsum("bqhk,bqh->bqk", torch.relu(dots), w.float())
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
              recall_weight: float = 0.0, head_max: float = 0.5) -> CalibrationResult:
    """Dense warm-up of every site's indexer; the model itself is frozen.

    Args:
        model: the dense model (its attention through ``F.scaled_dot_product_attention``).
        batches: iterable of input_ids int64 [B, L] or of dicts of model kwargs.
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

    Returns a :class:`CalibrationResult`. Calibrated indexers are registered, so a
    later ``torch.compile(model, backend="dsa")`` or :func:`save_indexers` uses them.
    Raises ValueError when no attention site is found or ``steps`` < 0.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0.0 <= head_max <= 1.0:
        raise ValueError(f"head_max must be in [0, 1], got {head_max}")
    config = config or DSAConfig()
    start = time.perf_counter()
    # Softmax tails underflow into denormals, which slow CPU float math many times over.
    flush = torch.set_flush_denormal(True)
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        batches = [batches] if isinstance(batches, Tensor) else list(batches)
        sites, tokens = capture_sites(model, batches, config)
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
        gen = random.Random(seed + done)
        bar = _progress(range(done, steps), progress, steps, done)
        for step in bar:
            b = gen.randrange(len(batches))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for site in sites.values():
                q, k = site.acts[b]
                dev = site.indexer.wq.device
                rows = _rows(q.shape[2], rows_per_step, config.top_k, gen)
                loss = indexer_kl(site.indexer, q.to(dev), k.to(dev), site.scale, site.causal,
                                  rows.to(dev), config.top_k if recall_weight else None,
                                  recall_weight, head_max)
                loss.backward()
                total += loss.item()
            opt.step()
            losses.append(total / len(sites))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if ckpt and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _checkpoint(model, opt, sites, ckpt, step + 1, losses)
        for p in params:
            p.requires_grad_(False)
        for ix in indexers:
            ix.fitted = True
    finally:
        if flush:
            torch.set_flush_denormal(False)
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return CalibrationResult(steps, tokens, time.perf_counter() - start, losses, list(sites))


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


def _resume(model, sites, opt, ckpt: str) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    loaded = load_indexers(model, os.path.join(ckpt, "indexers.safetensors"), sites=list(sites))
    for name, site in sites.items():
        # Keep the indexer objects the optimiser holds; take the saved values into them.
        site.indexer.load_state_dict(loaded[name].state_dict())
        fqns, anchors = site_anchors(model, site.module, name)
        REGISTRY.register(name, fqns, anchors, site.indexer)
    saved = load_file(os.path.join(ckpt, "optimizer.safetensors"))
    for s, site in sites.items():
        for n, p in site.indexer.named_parameters():
            entry = {}
            for key in ("exp_avg", "exp_avg_sq"):
                if f"{s}/{n}/{key}" in saved:
                    entry[key] = saved[f"{s}/{n}/{key}"].view_as(p).to(p.device)
            if entry and f"{s}/{n}/step" in saved:
                entry["step"] = torch.tensor(float(saved[f"{s}/{n}/step"][0]))
                opt.state[p] = entry
    return int(state["step"]), list(state["losses"])


# --------------------------------------------------------------------------- persistence


def save_indexers(model: nn.Module, path: str | os.PathLike,
                  sites: Sequence[str] | None = None) -> list[str]:
    """Write the registered indexers of ``model`` to a safetensors file.

    Args:
        model: the model whose parameters anchor the indexers (see REGISTRY).
        path: destination file.
        sites: site names to save (default: every registered site of the model).

    Returns the saved site names. Raises ValueError when the model has no indexers or
    a named site has none.
    """
    from safetensors.torch import save_file

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
        meta[name] = {
            # FQNs relative to ``model``, whatever module the indexer was compiled through.
            "anchors": {f: list(shapes[f]) for f in fqns},
            "num_q_heads": ix.num_q_heads, "num_kv_heads": ix.num_kv_heads,
            "head_dim": ix.head_dim, "index_heads": ix.index_heads, "index_dim": ix.index_dim,
        }
        for p in _PARAMS:
            tensors[f"{name}/{p}"] = getattr(ix, p).detach().to("cpu", copy=True).contiguous()
    save_file(tensors, os.fspath(path),
              metadata={"format": FORMAT, "version": VERSION, "sites": json.dumps(meta)})
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
    is corrupt or not an indexer file, a site's anchor is missing from the model or has
    another shape (a file for another model), or a needed site or tensor is missing.
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
        config = DSAConfig(index_heads=info["index_heads"], index_dim=info["index_dim"])
        ix = Indexer(info["num_q_heads"], info["num_kv_heads"], info["head_dim"], config)
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
                getattr(ix, p).copy_(tensors[key])
        ix.fitted = True
        ix.to(anchors[0].device)
        loaded[name] = REGISTRY.register(name, list(info["anchors"]), anchors, ix)
    return loaded


def kl_on(model: nn.Module, batches: Iterable, config: DSAConfig | None = None) -> float:
    """Mean indexer KL over every site and every query row seeing > top_k keys
    (held-out evaluation of calibration)."""
    config = config or DSAConfig()
    sites, _ = capture_sites(model, batches, config)
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
