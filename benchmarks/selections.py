"""Selections to benchmark sparse attention on: real ones recorded, and a generator.

    python benchmarks/selections.py record [--length 8192] [--top-k 128] [--out F.json]
    python benchmarks/selections.py fit [--stats F.json]
    python benchmarks/selections.py check --length 131072 --top-k 2048 [--device cuda]

A token-sparse kernel's cost depends on how much neighbouring queries' selections
overlap: a tile of BQ consecutive queries needs the *union* of their keys. Random
selections (the worst case) share almost nothing; a real model's share most.

- ``record``: SmolLM2-135M-Instruct on real text (the Python reference manual shipped
  with CPython) at its full 8K context, on CPU; for every layer the training-free
  indexer's selection (what the kernels see out of the box) and DSA's target (top-k
  keys by head-summed dense attention, what calibration trains towards), at top_k 128
  (1/64 of the context: DeepSeek's 2048 of 128K). Writes the union statistics per
  layer: mean |union of BQ consecutive queries| / top_k for BQ in 2..128, over tiles
  whose queries all see more than 2 * top_k keys.
- ``fit``: the parameters of :func:`generate` whose union statistics match the recorded
  ones (a grid search at the recorded length), written into the same file.
- :func:`generate` (used by benchmarks/attention_layer.py): selections for any
  (L, top_k), on any device. Each query selects its ``window`` most recent keys; every
  other slot holds one of ``choices`` candidate keys, re-picked every ``period``
  queries, and the candidates are drawn afresh (uniformly among the keys visible then)
  every ``renew`` queries; phases are random per slot. Rows are deduplicated (a
  repeated key becomes -1), causal, and a query that sees at most top_k keys selects
  them all. The assumption behind using it at 128K: at equal density the recorded
  per-query dynamics (periods in queries, the window as a share of top_k) carry over;
  every benchmark prints the union statistics it actually ran on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

BLOCKS = (2, 4, 8, 16, 32, 64, 128)
DEFAULT_STATS = os.path.join(os.path.dirname(__file__), "results", "selections_smollm2.json")


def union_ratios(indices: torch.Tensor, top_k: int, blocks=BLOCKS,
                 min_seen: int | None = None) -> dict[int, float]:
    """Mean |union of the selections of BQ consecutive queries| / top_k, per BQ.

    indices: int [Lq, top_k] (-1 unused) of queries 0..Lq-1 of a causal site. Only
    tiles whose first query sees more than ``min_seen`` (default 2 * top_k) keys count.
    """
    lq = indices.shape[0]
    first = min_seen if min_seen is not None else 2 * top_k
    big = int(indices.max()) + 1  # sorts after every key
    out = {}
    for bq in blocks:
        start = -(-first // bq) * bq
        n = (lq - start) // bq
        if n <= 0:
            continue
        tiles = indices[start : start + n * bq].reshape(n, bq * indices.shape[1]).long()
        tiles = torch.where(tiles < 0, big, tiles)
        s = tiles.sort(dim=1).values
        distinct = (s[:, 1:] != s[:, :-1]) & (s[:, 1:] < big)
        sizes = distinct.sum(1) + (s[:, 0] < big).long()
        out[bq] = float(sizes.float().mean()) / top_k
    return out


def _hash(*xs: torch.Tensor) -> torch.Tensor:
    """A uniform float64 in [0, 1) per element from integer tensors (splitmix-style)."""
    h = torch.zeros_like(xs[0], dtype=torch.int64)
    for x in xs:
        h = (h ^ x.to(torch.int64)) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019
        h = h ^ (h >> 31)
        h = h * 0xBF58476D1CE4E5B9
        h = h ^ (h >> 29)
    return (h & ((1 << 52) - 1)).double() / float(1 << 52)


def generate(length: int, top_k: int, params: dict, device="cpu", seed: int = 0,
             rows: slice | None = None, chunk: int = 8192) -> torch.Tensor:
    """Real-like causal selections: int32 [Lq, top_k] (Lq = rows of ``range(length)``,
    default all), ascending, -1 in unused slots. ``params``: window (share of top_k),
    period, choices, renew (see the module docstring)."""
    rows = rows or slice(0, length)
    start, stop = rows.indices(length)[:2]
    if stop - start > chunk:  # bounded temporaries: [chunk, top_k] int64 each
        return torch.cat([generate(length, top_k, params, device, seed,
                                   slice(r, min(stop, r + chunk)), chunk)
                          for r in range(start, stop, chunk)])
    t = torch.arange(start, stop, device=device)[:, None]  # [Lq, 1]
    s = torch.arange(top_k, device=device)[None, :]  # [1, K]
    seed_t = torch.tensor(seed, device=device)
    window = int(round(params["window"] * top_k))
    period, choices, renew = int(params["period"]), int(params["choices"]), int(params["renew"])
    phase = (_hash(s, seed_t, torch.tensor(1, device=device)) * period).long()
    phase_r = (_hash(s, seed_t, torch.tensor(2, device=device)) * renew).long()
    epoch = (t + phase) // period
    pick = (_hash(s, epoch, seed_t) * choices).long()  # which candidate, per epoch
    renewal = (t + phase_r) // renew
    born = (renewal * renew - phase_r).clamp_min(0)  # the query at which candidates drew
    key = (_hash(s, renewal, pick, seed_t + 7) * (born + 1).double()).long()
    key = torch.where(s < window, t - s, key).clamp_min(0)
    short = t + 1 <= top_k  # sees at most top_k keys: all of them
    key = torch.where(short, torch.where(s <= t, s, -1), key)
    key = key.sort(dim=1).values
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[:, 1:] = key[:, 1:] == key[:, :-1]
    key = torch.where(dup | (key < 0), length + 1, key).sort(dim=1).values
    return torch.where(key > length, -1, key).to(torch.int32)


def generated_ratios(length: int, top_k: int, params: dict, device="cpu",
                     blocks=BLOCKS, sample_rows: int = 16384) -> dict[int, float]:
    """Union statistics of :func:`generate` (on its last ``sample_rows`` queries)."""
    start = max(0, length - sample_rows)
    start -= start % max(blocks)
    sel = generate(length, top_k, params, device, rows=slice(start, length))
    first = max(0, 2 * top_k - start)
    return union_ratios(sel, top_k, blocks, min_seen=first)


def record(args) -> None:
    from dsa_compile.config import DSAConfig
    from dsa_compile.evaluation.capture import capture_sites
    from dsa_compile.evaluation.harness import SiteCall, oracle_indices
    from dsa_compile.evaluation.models import load_causal_lm
    from dsa_compile.evaluation.text import token_blocks
    from dsa_compile.reference.indexer import indexer_topk

    torch.manual_seed(0)
    model, tok = load_causal_lm()
    ids = token_blocks(tok, args.length, 1)
    config = DSAConfig(top_k=args.top_k, dense_below=0)
    t0 = time.perf_counter()
    sites, _ = capture_sites(model, ids, config, caller="selections")
    print(f"captured {len(sites)} sites of a {args.length}-token forward "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    layers = []
    for name, site in sites.items():
        q, k = site.acts[0]
        with torch.no_grad():
            q_idx, k_idx, w = site.indexer(q, k)
            chosen = indexer_topk(q_idx, k_idx, w, args.top_k)[0]
        target = oracle_indices(SiteCall(name, site.module, q, k, k, site.scale, True),
                                args.top_k)[0]
        overlap = _overlap(chosen, target)
        entry = {"site": name, "indexer": union_ratios(chosen, args.top_k),
                 "target": union_ratios(target, args.top_k), "indexer_recall": overlap}
        layers.append(entry)
        print(f"{name}: indexer {_fmt(entry['indexer'])} | target {_fmt(entry['target'])} "
              f"| recall {overlap:.3f}", flush=True)
    stats = {"model": "SmolLM2-135M-Instruct", "length": args.length, "top_k": args.top_k,
             "text": "pydoc_data.topics (CPython's reference manual), first block",
             "layers": layers,
             "mean": {kind: _mean([e[kind] for e in layers]) for kind in ("indexer", "target")}}
    for kind in ("indexer", "target"):
        print(f"mean {kind}: {_fmt(stats['mean'][kind])}")
    _write(args.out, stats)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of b's valid keys that a also selects (rows averaged)."""
    hits = (a[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0)
    valid = (b >= 0).sum(1).clamp_min(1)
    return float((hits.any(1).sum(1) / valid).mean())


def _mean(dicts: list[dict]) -> dict:
    keys = dicts[0].keys()
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def _fmt(ratios: dict) -> str:
    return " ".join(f"{bq}:{r:.2f}" for bq, r in ratios.items())


def _write(path: str, stats: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, path)


def fit(args) -> None:
    with open(args.stats) as f:
        stats = json.load(f)
    length, top_k = stats["length"], stats["top_k"]
    fits = {}
    for kind in ("indexer", "target"):
        want = {int(bq): r for bq, r in stats["mean"][kind].items()}
        best = None
        grid = itertools.product((0.0, 1 / 16, 1 / 4), (1, 2, 4, 8, 16, 32, 64),
                                 (1, 2, 3, 4, 6), (256, 1024, 4096))
        for window, period, choices, renew in grid:
            params = {"window": window, "period": period, "choices": choices, "renew": renew}
            got = generated_ratios(length, top_k, params, blocks=tuple(want), sample_rows=2048)
            err = sum((math.log(got[bq]) - math.log(r)) ** 2 for bq, r in want.items())
            if best is None or err < best[0]:
                best = (err, params, got)
        err, params, got = best
        fits[kind] = {"params": params, "ratios": got, "log_rms_error":
                      math.sqrt(err / len(want))}
        print(f"{kind}: params {params}\n  recorded  {_fmt(want)}\n  generated {_fmt(got)}"
              f"\n  log-rms error {fits[kind]['log_rms_error']:.3f}", flush=True)
    stats["fit"] = fits
    _write(args.stats, stats)


def load_params(kind: str = "target", path: str = DEFAULT_STATS) -> dict:
    """The fitted generator parameters (``fit``) for "indexer" or "target" selections."""
    with open(path) as f:
        return json.load(f)["fit"][kind]["params"]


def check(args) -> None:
    params = load_params(args.kind, args.stats)
    t0 = time.perf_counter()
    got = generated_ratios(args.length, args.top_k, params, args.device)
    print(f"{args.kind} generator {params} at L={args.length}, top_k={args.top_k}: "
          f"{_fmt(got)} ({time.perf_counter() - t0:.1f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--length", type=int, default=8192)
    rec.add_argument("--top-k", type=int, default=128)
    rec.add_argument("--out", default=DEFAULT_STATS)
    rec.add_argument("--threads", type=int, default=2)
    fi = sub.add_parser("fit")
    fi.add_argument("--stats", default=DEFAULT_STATS)
    ch = sub.add_parser("check")
    ch.add_argument("--length", type=int, default=131072)
    ch.add_argument("--top-k", type=int, default=2048)
    ch.add_argument("--kind", default="target", choices=("indexer", "target"))
    ch.add_argument("--stats", default=DEFAULT_STATS)
    ch.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.cmd == "record":
        torch.set_num_threads(args.threads)
    {"record": record, "fit": fit, "check": check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
