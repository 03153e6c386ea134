"""Retrieval at long context (issue 18): passkeys and perplexity, dense against DSA.

    .venv/bin/python benchmarks/retrieval.py                       # the whole grid
    .venv/bin/python benchmarks/retrieval.py --variants dense dsa-free --needles 4
    .venv/bin/python benchmarks/retrieval.py --device cuda         # the same on a GPU

SmolLM2-135M-Instruct (``load_causal_lm()``), top_k 256 with every query sparse
(``DSAConfig(top_k=256, dense_below=0)``), through the evaluation harness (the SDPA
override running the DSA ops; ``--device cuda`` forces their PyTorch reference, so a GPU
run computes what the CPU run computes). Variants (``--variants``):

    dense, window                 dense attention; a sliding window of top_k keys
    oracle, oracle-group          top_k by dense attention, shared / per KV group
    dsa-free, dsa-free-group      training-free indexers (fitted on one text block)
    dsa-mixed, dsa-mixed-group    calibrated on mixed lengths up to --context
    dsa-2k, dsa-2k-group          calibrated on 2048-token blocks only, same tokens

"-group" = per-KV-group selection (``per_group=True``: one indexer and one top_k per KV
group, 3 x 1 x 48 against the shared 1 x 3 x 48: 144 multiply-adds per (query, key)
pair either way, a quarter of QK^T's 576). Text: Python's reference manual
(``pydoc_data``); evaluation, fit and calibration use disjoint token ranges.
Calibrated indexers are cached in ``--cache`` (reused when present; ``--fresh``
recalibrates). Results are appended to ``--json`` after every cell, so an interrupted
run keeps what it measured, and a rerun skips cells already there.

On the 2-core CPU box one 8K passkey trial took 82 s dense (one forward) and 568 s with
DSA training-free (a wrong answer costs up to 7 forwards), one thread: the full grid
(16 needles x 3 lengths x 10 variants) is days there; run it on a GPU (``--device
cuda``, the model file copied over, DSA ops forced to the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from dsa_compile.calibration import calibrate, capture_sites, load_indexers, save_indexers
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import (
    english_text,
    load_causal_lm,
    mixed_length_blocks,
    passkey,
    perplexity,
)
from dsa_compile.indexer import GROUPED_REGISTRY, GroupedIndexer, reset_indexers

VARIANTS = ("dense", "window", "oracle", "oracle-group", "dsa-free", "dsa-free-group",
            "dsa-mixed", "dsa-mixed-group", "dsa-2k", "dsa-2k-group")


def mode_of(variant: str) -> tuple[str, bool]:
    """(evaluation mode, per_group) of a variant."""
    group = variant.endswith("-group")
    base = variant.removesuffix("-group")
    return ("dsa" if base.startswith("dsa") else base), group


def save_grouped(model, path: str) -> None:
    """The model's per-KV-group indexers to a safetensors file (site/group/param)."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, ix in GROUPED_REGISTRY.indexers_of(model).items():
        meta[name] = [ix.num_q_heads, ix.num_kv_heads, ix.head_dim]
        for pname, p in ix.state_dict().items():
            tensors[f"{name}/{pname}"] = p.detach().cpu().contiguous()
    save_file(tensors, path, metadata={"sites": json.dumps(meta)})


def load_grouped(model, path: str) -> None:
    """Register the per-KV-group indexers of :func:`save_grouped`'s file for ``model``."""
    from safetensors import safe_open

    from dsa_compile.evaluation import model_anchors

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["sites"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    device = next(model.parameters()).device
    for name, (hq, hkv, d) in meta.items():
        ix = GroupedIndexer(hq, hkv, d)
        ix.load_state_dict({key[len(name) + 1:]: t for key, t in tensors.items()
                            if key.startswith(name + "/")})
        ix.fitted = True
        fqns, anchors = model_anchors(model, name)
        GROUPED_REGISTRY.register(name, fqns, anchors, ix.to(device))


def prepare(model, tok, variant: str, args, config: DSAConfig, ranges) -> str:
    """Give the model the variant's indexers; returns a note (calibration report...)."""
    mode, group = mode_of(variant)
    if mode != "dsa":
        return ""
    reset_indexers(model)
    GROUPED_REGISTRY.remove(model)
    device = next(model.parameters()).device
    base = variant.removesuffix("-group")
    shape = f"-{config.index_heads}x{config.index_dim}" if config.index_heads else ""
    path = os.path.join(args.cache, f"{variant}{shape}{calibration_key(args)}-k{args.top_k}"
                                    f"-c{args.context}.safetensors")
    if base == "dsa-free" or not args.fresh and os.path.exists(path):
        fit = ranges["fit"][None].to(device)
        capture_sites(model, [fit], config, caller="retrieval", per_group=group)  # fits
        if base == "dsa-free":
            return f"fitted on {fit.shape[1]} tokens"
        (load_grouped if group else load_indexers)(model, path)
        return f"loaded {path}"
    start = ranges["calib_offset"]
    if base == "dsa-mixed":
        blocks = mixed_length_blocks(tok, args.context, args.calib_tokens, start)
    else:
        blocks = mixed_length_blocks(tok, 2048, args.calib_tokens, start, min_length=2048)
    blocks = [b.to(device) for b in blocks]
    res = calibrate(model, blocks, config, steps=args.steps, per_group=group, progress=False,
                    recall_weight=args.recall_weight, head_max=args.head_max)
    os.makedirs(args.cache, exist_ok=True)
    (save_grouped if group else save_indexers)(model, path)
    lengths = sorted({b.shape[1] for b in blocks}, reverse=True)
    return f"{res} (block lengths {lengths})"


def calibration_key(args) -> str:
    """Suffix naming non-default calibration settings ("" for the defaults)."""
    key = f"+s{args.steps}" if args.steps != 300 else ""
    key += f"+rw{args.recall_weight:g}" if args.recall_weight else ""
    return key + (f"+hm{args.head_max:g}" if args.head_max != 0.5 else "")


def reference_ops(device: str):
    """Force the DSA ops' PyTorch reference on CUDA (a no-op block on CPU)."""
    from dsa_compile.ops.dispatch import force_reference

    return force_reference() if device.startswith("cuda") else contextlib.nullcontext()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1536, 4096, 8192])
    parser.add_argument("--needles", type=int, default=16, help="passkey trials per length")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--context", type=int, default=8192, help="the model's context "
                        "(longest calibration block and perplexity block)")
    parser.add_argument("--ppl-lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--ppl-tokens", type=int, default=16384,
                        help="evaluation tokens per perplexity length")
    parser.add_argument("--calib-tokens", type=int, default=32768,
                        help="calibration tokens, the same for mixed and 2048-only")
    parser.add_argument("--steps", type=int, default=300, help="calibration steps")
    parser.add_argument("--recall-weight", type=float, default=0.0,
                        help="calibrate's recall_weight (missed-mass term); keyed +rwX")
    parser.add_argument("--head-max", type=float, default=0.5,
                        help="calibrate's head_max; keyed +hmX when not 0.5")
    parser.add_argument("--cache", default="/tmp/dsa_retrieval")
    parser.add_argument("--fresh", action="store_true", help="recalibrate even if cached")
    parser.add_argument("--json", default="/tmp/dsa_retrieval/results.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--index-shape", default=None, metavar="HxD",
                        help="the shared indexer's H_I x d_I (default: 3 x 48, a quarter of "
                             "QK^T's cost); results are keyed VARIANT@HxD")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(int(x) for x in args.index_shape.split("x")) if args.index_shape else None
    config = DSAConfig(top_k=args.top_k, dense_below=0, index_heads=shape and shape[0],
                       index_dim=shape and shape[1])
    suffix = f"@{args.index_shape}" if shape else ""

    model, tok = load_causal_lm()
    model.to(args.device)
    ids = tok(english_text(), return_tensors="pt").input_ids[0]
    eval_tokens = args.ppl_tokens
    ranges = {"fit": ids[eval_tokens : eval_tokens + args.context],
              "calib_offset": eval_tokens + args.context}
    results = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def store():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    with reference_ops(args.device):
        for variant in args.variants:
            mode, group = mode_of(variant)
            if suffix and group:
                raise SystemExit("--index-shape sets the shared indexer; drop the -group variants")
            calibrated = mode == "dsa" and not variant.startswith("dsa-free")
            name = variant + (suffix if mode == "dsa" else "") + \
                (calibration_key(args) if calibrated else "")
            cell = results.setdefault(name, {})
            needed = [f"ppl{n}" for n in args.ppl_lengths if f"ppl{n}" not in cell] + \
                [f"pk{n}x{args.needles}" for n in args.lengths
                 if f"pk{n}x{args.needles}" not in cell]
            if not needed:
                continue
            t0 = time.perf_counter()
            note = prepare(model, tok, variant, args, config, ranges)
            if note and not (note.startswith("loaded") and cell.get("note")):
                cell["note"] = note  # a loaded cache keeps its calibration report
            print(f"{variant}: {note} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for n in args.ppl_lengths:
                if f"ppl{n}" in cell:
                    continue
                t0 = time.perf_counter()
                blocks = ids[:eval_tokens].view(-1, n)
                cell[f"ppl{n}"] = perplexity(model, blocks, mode, config, per_group=group)
                store()
                print(f"  perplexity @{n} ({blocks.shape[0]} blocks): {cell[f'ppl{n}']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            for n in args.lengths:
                key = f"pk{n}x{args.needles}"
                if key in cell:
                    continue
                t0 = time.perf_counter()
                res = passkey(model, tok, n, args.needles, mode, config, per_group=group)
                cell[key] = {"found": sum(r.found for r in res), "exact": sum(r.exact for r in res),
                             "trials": len(res), "tokens": res[0].tokens,
                             "misses": [[r.depth, r.key, r.answer] for r in res if not r.found]}
                store()
                print(f"  passkey @{n}: {cell[key]['found']}/{len(res)} (exact "
                      f"{cell[key]['exact']}; {time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    dense = results.get("dense", {})
    head = [f"ppl @{n}" for n in args.ppl_lengths] + [f"passkey ~{n}" for n in args.lengths]
    print("\n| attention | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for variant, cell in results.items():
        row = []
        for n in args.ppl_lengths:
            p = cell.get(f"ppl{n}")
            ref = dense.get(f"ppl{n}")
            row.append("-" if p is None else f"{p:.3f}" + (
                f" ({p / ref:.3f}x)" if ref and variant != "dense" else ""))
        for n in args.lengths:
            pk = cell.get(f"pk{n}x{args.needles}")
            row.append("-" if pk is None else f"{pk['found']}/{pk['trials']}")
        print(f"| {variant} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
