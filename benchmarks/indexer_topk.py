"""Lightning indexer + top-k on the GPU: stored scores vs the streamed selection.

For each length: the score kernel alone (what writing L x L/2 float32 scores costs), the
stored-score indexer (scores chunk + radix select, ``STREAM = False``) and the streamed
one (sampled bound, candidates collected while scoring, exact finish;
kernels/stream_topk.py), on two kinds of inputs:

- ``random``: Gaussian q_I / k_I (scores with no structure).
- ``recency``: keys carry a shared direction growing with position plus a few strong
  "sink" keys, so each query's top keys crowd into its recent window and the sinks, as
  real indexers' do; the harder case for a sampled bound.

Printed per row: median ms (triton do_bench), TFLOP/s of the indexer's useful products
(2 H_I d_I per visible pair), the FLOP floor at the bf16 matmul rate measured in the
same run, the fraction of rows the streamed path sent to its exact fallback, and whether
both paths chose the same keys (bf16 scores: a near-tie may go either way).

    PYTHONPATH=$PWD python3 benchmarks/indexer_topk.py --lengths 32768,65536,131072
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

import harness
import torch

TOP_K = 2048
HQ, HKV, D = 32, 8, 128


def inputs(kind: str, length: int, h_i: int, d_i: int, dev):
    """(q_idx [1, L, H_I, d_I], k_idx [1, L, d_I], w [1, L, H_I]) bf16."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, length, h_i, d_i, device=dev, generator=g)
    k = torch.randn(1, length, d_i, device=dev, generator=g)
    if kind == "recency":
        u = torch.randn(d_i, device=dev, generator=g)
        u /= u.norm()
        pos = torch.arange(length, device=dev, dtype=torch.float32)
        q += 3.0 * u  # every query head looks along u ...
        k += (6.0 * (pos / length) ** 8)[None, :, None] * u  # ... which later keys carry more
        k[:, :4] += 8.0 * u  # sinks
    w = torch.rand(1, length, h_i, device=dev, generator=g)
    return q.bfloat16(), k.bfloat16(), w.bfloat16()


def main(argv=None) -> int:
    from dsa_compile import kernels
    from dsa_compile.indexer import default_index_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--kinds", default="random,recency")
    parser.add_argument("--index-shapes", default="default",
                        help="comma list of HxD or 'default' (8x128)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("indexer_topk.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    it = importlib.import_module("dsa_compile.kernels.indexer_topk")
    stream_module = importlib.import_module("dsa_compile.kernels.stream_topk")
    rate = harness.matmul_rate(dev)
    print(f"# card: {harness.card()}  "
          f"bf16 matmul {rate:.0f} TFLOP/s  top_k {TOP_K}", flush=True)
    shapes = []
    for s in args.index_shapes.split(","):
        shapes.append(default_index_shape(HQ, HKV, D) if s == "default"
                      else tuple(int(x) for x in s.split("x")))
    print(f"{'L':>7} {'H_IxD_I':>8} {'inputs':>8} {'method':<14} {'ms':>9} {'TFLOP/s':>8} "
          f"{'floor ms':>9} {'vs stored':>9}  notes", flush=True)
    fails: list[torch.Tensor] = []
    stream_chunk = it.stream_topk_chunk

    def watched(*a, **kw):
        fail = stream_chunk(*a, **kw)
        fails.append(fail)
        return fail

    for length in (int(x) for x in args.lengths.split(",")):
        for h_i, d_i in shapes:
            pairs = length * (length + 1) / 2
            flops = 2 * h_i * d_i * pairs
            floor = flops / rate / 1e9
            for kind in args.kinds.split(","):
                q, k, w = inputs(kind, length, h_i, d_i, dev)
                rows = min(length, (1 << 30) // (4 * length))
                row0 = length - rows
                scores = functools.partial(it.indexer_scores_chunk, q, k, w, row0, rows, length,
                                           0, True, None)
                ms_s = harness.bench(scores)
                # The score kernel over the whole causal half, scaled from the last rows.
                part = rows * (row0 + rows / 2) / pairs
                run = functools.partial(kernels.indexer_topk, q, k, w, TOP_K)
                it.STREAM = False
                ref = run()
                ms_ref = harness.bench(run)
                tag = f"{h_i}x{d_i}"
                print(f"{length:>7} {tag:>8} {kind:>8} {'scores only':<14} {ms_s / part:>9.3f} "
                      f"{flops / (ms_s / part) / 1e9:>8.0f} {floor:>9.3f} {'':>9}  "
                      f"(score kernel, WRITE mode, last {rows} rows timed, scaled)", flush=True)
                print(f"{length:>7} {tag:>8} {kind:>8} {'stored':<14} {ms_ref:>9.3f} "
                      f"{flops / ms_ref / 1e9:>8.0f} {floor:>9.3f} {1.0:>8.2f}x", flush=True)
                it.STREAM = True
                default_w = stream_module.SAMPLE
                for piece in (default_w, 256):
                    stream_module.SAMPLE = piece
                    it.stream_topk_chunk = watched
                    fails.clear()
                    got = run()
                    it.stream_topk_chunk = stream_chunk
                    fell = float(torch.cat(fails).float().mean()) if fails else float("nan")
                    ms_st = harness.bench(run)
                    same = float((got == ref).float().mean())
                    name = f"streamed w{piece}"
                    print(f"{length:>7} {tag:>8} {kind:>8} {name:<14} {ms_st:>9.3f} "
                          f"{flops / ms_st / 1e9:>8.0f} {floor:>9.3f} {ms_ref / ms_st:>8.2f}x  "
                          f"fallback rows {fell:.4f}, same keys as stored {same:.5f}"
                          f"{' (the default pieces)' if piece == default_w else ''}", flush=True)
                stream_module.SAMPLE = default_w
                del q, k, w, ref, got
                torch.cuda.empty_cache()
    from dsa_compile.kernels.indexer_topk import indexer_scores_kernel

    print(f"# tuned indexer_scores_kernel: {indexer_scores_kernel.best_config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
