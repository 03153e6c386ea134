"""onnxruntime CPU: DSA attention of one SmolLM2-shaped layer vs ORT's dense Attention.

    python benchmarks/onnx_layer.py                 # L = 8192, top_k = 512
    python benchmarks/onnx_layer.py --lengths 2048 4096 8192 --csv out/onnx_layer.csv
    python benchmarks/onnx_layer.py --variants dense dsa dsa_dense   # + exact dense rows
    python benchmarks/onnx_layer.py --profile        # where the dsa time goes (ORT profiler)
    python benchmarks/onnx_layer.py --interleaved    # one process, variants run in turns
    python benchmarks/onnx_layer.py --inputs real    # a real SmolLM2 layer's q, k, indexer

Layer: 9 query heads, 3 KV heads, head dim 64, causal; the indexer has the default
shape of :class:`dsa_compile.indexer.Indexer` for it (H_I = 3, d_I = 48).

- dsa:       one ``dsa.Attention`` node (dense_below = 0: every query sparse) run through
             its model-local function (stock ORT).
- dense:     one standard opset-23 ``Attention`` node (is_causal = 1) on the same q, k, v.
- dsa_dense: the same ``dsa.Attention`` node with dense_below = L, so every query takes
             exact dense attention through the function's query-chunked GEMM path.

Inputs: ``random`` (Gaussian q, k and index queries / keys: selections share nothing, the
worst case for query tiles) or ``real`` (layer ``--layer`` of SmolLM2-135M-Instruct on
real text at the benchmark length: its post-RoPE q and k and its training-free indexer's
q_idx / k_idx / w; v is random, it does not change the work). The real inputs are cached
under ``--cache`` (one dense forward on CPU, ~1 min at 8K). The union statistics of the
selections a run measured on are printed.

Sessions use :func:`dsa_compile.onnx.session_options` (denormals flushed to zero) for
every variant; ``--keep-denormals`` times onnxruntime's defaults instead.

Each variant runs in its own subprocess so that its peak resident memory (VmHWM above
the RSS before the first run) is its own; the variants alternate for ``--rounds`` rounds
and each keeps its best time. On a loaded machine the subprocesses see different load;
``--interleaved`` instead runs every variant in one process, one run each in turn, so
bursts of load hit all of them alike (times only, no memory column).

The script refuses to report a speedup unless the dsa file matches
``torch.ops.dsa.attention`` (1e-4, fp32) and the dense files match SDPA at a checking
length first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HQ, HKV, D, H_I, D_I = 9, 3, 64, 3, 48


def inputs(length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((1, HQ, length, D), np.float32),
        "k": rng.standard_normal((1, HKV, length, D), np.float32),
        "v": rng.standard_normal((1, HKV, length, D), np.float32),
        "q_idx": rng.standard_normal((1, length, H_I, D_I), np.float32),
        "k_idx": rng.standard_normal((1, length, D_I), np.float32),
        "w": rng.random((1, length, H_I), np.float32) + 0.1,
    }


def real_inputs(length: int, layer: int, cache: str) -> dict[str, np.ndarray]:
    """One SmolLM2 attention layer's inputs on real text (see the module docstring)."""
    path = os.path.join(cache, f"smollm2_layer{layer}_{length}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return dict(f)
    import torch

    from dsa_compile.config import DSAConfig
    from dsa_compile.evaluation.capture import capture_sites
    from dsa_compile.evaluation.models import load_causal_lm
    from dsa_compile.evaluation.text import token_blocks

    torch.manual_seed(0)
    model, tok = load_causal_lm()
    sites, _ = capture_sites(model, token_blocks(tok, length, 1), DSAConfig(dense_below=0),
                             caller="onnx_layer")
    site = list(sites.values())[layer]
    q, k = site.acts[0]
    with torch.no_grad():
        q_idx, k_idx, w = site.indexer(q, k)
    feed = {"q": q, "k": k, "v": torch.randn(k.shape, generator=torch.Generator().manual_seed(0)),
            "q_idx": q_idx, "k_idx": k_idx, "w": w}
    feed = {n: t.float().contiguous().numpy() for n, t in feed.items()}
    assert feed["q"].shape == (1, HQ, length, D) and feed["q_idx"].shape[2:] == (H_I, D_I)
    os.makedirs(cache, exist_ok=True)
    np.savez(path + ".tmp.npz", **feed)
    os.replace(path + ".tmp.npz", path)
    return feed


def layer_inputs(settings: dict, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    if settings["inputs"] == "real":
        return real_inputs(length, settings["layer"], settings["cache"])
    return inputs(length, seed)


def union_stats(feed: dict[str, np.ndarray], top_k: int, chunk: int) -> str:
    """Mean |union of a query chunk's selections| / top_k over chunks whose rows all see
    more than top_k keys, and as a share of the keys they see."""
    import torch

    from dsa_compile.reference.indexer import indexer_topk

    t = {n: torch.from_numpy(feed[n]) for n in ("q_idx", "k_idx", "w")}
    idx = indexer_topk(t["q_idx"], t["k_idx"], t["w"], top_k)[0]            # [L, top_k]
    ratios, shares = [], []
    for start in range(top_k, idx.shape[0] - chunk + 1, chunk):
        rows = idx[start : start + chunk]
        union = torch.unique(rows[rows >= 0]).numel()
        ratios.append(union / top_k)
        shares.append(union / (start + chunk))
    return (f"union of {chunk}-query chunks: {sum(ratios) / len(ratios):.2f} x top_k, "
            f"{100 * sum(shares) / len(shares):.0f}% of the visible keys (mean of "
            f"{len(ratios)} chunks)")


def dense_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["out"], is_causal=1, scale=D ** -0.5)],
        "dense_attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def dsa_model(top_k: int, query_chunk: int | None, dense_below: int = 0):
    from dsa_compile.onnx import functions

    return functions.op_model("Attention", top_k=top_k, scale=D ** -0.5,
                              dense_below=dense_below,
                              query_chunk=query_chunk or functions.DEFAULT_QUERY_CHUNK)


def variant_model(variant: str, length: int, top_k: int, query_chunk: int | None):
    """The ONNX model of a variant and the names of the inputs it takes."""
    if variant == "dense":
        return dense_model(), "qkv"
    dense_below = length if variant == "dsa_dense" else 0
    return dsa_model(top_k, query_chunk, dense_below), ["q", "k", "v", "q_idx", "k_idx", "w"]


def session(model, threads: int | None, keep_denormals: bool = False):
    import onnxruntime as ort

    from dsa_compile.onnx import session_options

    options = ort.SessionOptions() if keep_denormals else session_options()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def check(length: int, top_k: int, query_chunk: int | None,
          variants: list[str]) -> dict[str, float]:
    """Max abs error of each variant's ORT file against PyTorch at ``length``: dsa vs
    torch.ops.dsa.attention, dense and dsa_dense vs SDPA."""
    import torch

    import dsa_compile  # noqa: F401  (registers torch.ops.dsa)

    feed = inputs(length, seed=1)
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True)
    dsa = torch.ops.dsa.attention(t["q"], t["k"], t["v"], t["q_idx"], t["k_idx"], t["w"],
                                  top_k, D ** -0.5, True, 0, None, 0.0, 0)
    errors = {}
    for variant in variants:
        model, names = variant_model(variant, length, top_k, query_chunk)
        (out,) = session(model, None).run(None, {n: feed[n] for n in names})
        want = dsa if variant == "dsa" else sdpa
        errors[variant] = float(np.abs(out - want.numpy()).max())
    return errors


def profile(settings: dict, length: int, top_k: int, query_chunk: int | None,
            threads: int | None, rows: int = 12) -> None:
    """Run the dsa file once under onnxruntime's profiler; print kernel time per op type."""
    import collections
    import tempfile

    import onnxruntime as ort

    from dsa_compile.onnx import session_options

    options = ort.SessionOptions() if settings["keep_denormals"] else session_options()
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "dsa")
    sess = ort.InferenceSession(dsa_model(top_k, query_chunk).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    sess.run(None, layer_inputs(settings, length))
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    per_op = collections.Counter()
    for e in events:  # leaf kernels only: Loop and If contain the others
        op = e.get("args", {}).get("op_name")
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and op not in (
                "Loop", "If"):
            per_op[op] += e["dur"] / 1e3
    total = sum(per_op.values())
    print(f"profile L={length} top_k={top_k}: {total:.0f} ms in kernels (one run, "
          f"profiler on; load average {os.getloadavg()[0]:.1f})")
    for op, ms in per_op.most_common(rows):
        print(f"  {op:18s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def worker(settings: dict, variant: str, length: int, top_k: int, query_chunk: int | None,
           repeats: int, threads: int | None) -> dict:
    model, names = variant_model(variant, length, top_k, query_chunk)
    feed = {n: v for n, v in layer_inputs(settings, length).items() if n in names}
    sess = session(model, threads, settings["keep_denormals"])
    base = reset_peak_rss()
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return {"variant": variant, "L": length, "top_k": top_k, "min_s": min(times),
            "median_s": statistics.median(times), "peak_extra_mib": (peak_rss() - base) / 2**20}


def interleaved(settings: dict, variants: list[str], length: int, top_k: int,
                query_chunk: int | None, runs: int,
                threads: int | None) -> dict[str, list[float]]:
    """Seconds of ``runs`` runs of each variant, taken in turns within this process."""
    feed = layer_inputs(settings, length)
    sessions = {}
    for variant in variants:
        model, names = variant_model(variant, length, top_k, query_chunk)
        sessions[variant] = (session(model, threads, settings["keep_denormals"]),
                             {n: feed[n] for n in names})
        sessions[variant][0].run(None, sessions[variant][1])  # warm-up
    times = {v: [] for v in variants}
    for _ in range(runs):
        for variant, (sess, variant_feed) in sessions.items():
            start = time.perf_counter()
            sess.run(None, variant_feed)
            times[variant].append(time.perf_counter() - start)
    return times


def run_worker(settings: dict, *args) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(settings), *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--query-chunk", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per worker")
    parser.add_argument("--rounds", type=int, default=3, help="alternating worker rounds")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT)")
    parser.add_argument("--check-length", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["dense", "dsa"],
                        choices=["dense", "dsa", "dsa_dense"])
    parser.add_argument("--profile", action="store_true",
                        help="also print the dsa file's kernel time per op type")
    parser.add_argument("--interleaved", action="store_true",
                        help="time the variants in turns in one process (no memory column)")
    parser.add_argument("--inputs", choices=["random", "real"], default="random")
    parser.add_argument("--layer", type=int, default=15, help="SmolLM2 layer (--inputs real)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/dsa_compile/onnx_layer"),
                        help="where --inputs real keeps its captured activations")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="onnxruntime's default session options (no flush to zero)")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--worker", nargs=7, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        settings, variant, length, top_k, chunk, repeats, threads = args.worker
        print(json.dumps(worker(json.loads(settings), variant, int(length), int(top_k),
                                int(chunk) or None, int(repeats), int(threads) or None)))
        return
    settings = {"inputs": args.inputs, "layer": args.layer, "cache": args.cache,
                "keep_denormals": args.keep_denormals}

    variants = list(dict.fromkeys(["dense", "dsa", *args.variants]))
    errors = check(args.check_length, args.top_k, args.query_chunk or None, variants)
    print(f"check at L={args.check_length}: " + "; ".join(
        f"{v} max abs err {e:.2e} (vs {'torch.ops.dsa.attention' if v == 'dsa' else 'SDPA'})"
        for v, e in errors.items()))
    if max(errors.values()) > 1e-4:
        sys.exit("correctness check failed: no speedup reported")
    from dsa_compile.onnx import functions

    for length in args.lengths:
        print(f"L={length} {args.inputs} inputs: " + union_stats(
            layer_inputs(settings, length), args.top_k,
            args.query_chunk or functions.DEFAULT_QUERY_CHUNK), flush=True)
    if args.profile:
        profile(settings, args.lengths[0], args.top_k, args.query_chunk or None,
                args.threads or None)

    if args.interleaved:
        for length in args.lengths:
            times = interleaved(settings, variants, length, args.top_k,
                                args.query_chunk or None, args.rounds * args.repeats,
                                args.threads or None)
            best = {v: min(t) for v, t in times.items()}
            print(f"L={length} top_k={args.top_k} {args.inputs} inputs, denormals "
                  f"{settings['keep_denormals'] and 'kept' or 'flushed'}, interleaved, best of "
                  f"{args.rounds * args.repeats}"
                  f" (load {os.getloadavg()[0]:.1f}): "
                  + ", ".join(f"{v} {t:.3f} s" for v, t in best.items())
                  + f"; dense/dsa {best['dense'] / best['dsa']:.2f}x"
                  + "".join(f", dense/{v} {best['dense'] / best[v]:.2f}x"
                            for v in variants if v not in ("dense", "dsa")), flush=True)
        return

    rows = []
    extra = [v for v in variants if v not in ("dense", "dsa")]
    print(f"{'L':>6} {'top_k':>6} {'dense s':>9} {'dsa s':>9} {'speedup':>8} "
          + "".join(f"{v + ' s':>11}" for v in extra)
          + f" {'dense MiB':>10} {'dsa MiB':>9}")
    for length in args.lengths:
        # Alternate the variants for several rounds and keep each one's best, so a burst of
        # load from other processes on a shared machine does not decide the ratio.
        common = (length, args.top_k, args.query_chunk, args.repeats, args.threads)
        runs = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in runs:
                runs[variant].append(run_worker(settings, variant, *common))
        best = {v: min(runs[v], key=lambda r: r["min_s"]) for v in variants}
        dense, dsa = best["dense"], best["dsa"]
        row = {"L": length, "top_k": args.top_k, "inputs": args.inputs,
               "denormals": "kept" if args.keep_denormals else "flushed", "dense_s": dense["min_s"],
               "dsa_s": dsa["min_s"], "speedup": dense["min_s"] / dsa["min_s"],
               "dense_peak_mib": dense["peak_extra_mib"], "dsa_peak_mib": dsa["peak_extra_mib"],
               "dense_median_s": dense["median_s"], "dsa_median_s": dsa["median_s"],
               **{f"{v}_s": best[v]["min_s"] for v in extra},
               "load_avg": os.getloadavg()[0]}
        rows.append(row)
        print(f"{length:>6} {args.top_k:>6} {row['dense_s']:>9.3f} {row['dsa_s']:>9.3f} "
              f"{row['speedup']:>7.2f}x "
              + "".join(f"{row[v + '_s']:>11.3f}" for v in extra)
              + f" {row['dense_peak_mib']:>10.0f} {row['dsa_peak_mib']:>9.0f}"
              f"   (load {row['load_avg']:.1f})", flush=True)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
