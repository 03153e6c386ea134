"""One DSA decode step per layer vs dense SDPA decode on the CPU (issue 15, item 4).

    python benchmarks/decode_cpu.py [--lengths 1024,...] [--batches 1,4] [--threads N]

Shape: SmolLM2-135M's attention (Hq=9, Hkv=3, D=64, indexer 3 x 48), float32, top_k 256,
one query at position L-1 per sequence. Methods, each the ``dsa.attention`` op as the
compiled model calls it: dense (dense_below large: the op's SDPA path) and dsa
(dense_below 0: the CPU decode path, reference/decode.py). The floor is the bytes each
reads (K/V cache; index keys + top_k K/V rows) at this machine's copy bandwidth,
measured in the same run. The crossover (the first length where dsa beats dense) is what
``ops.attention.decode_crossover(b, "cpu")`` should return.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import harness
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsa_compile  # noqa: E402, F401  (registers the ops)

HQ, HKV, D, H_I, D_I, TOP_K = 9, 3, 64, 3, 48, 256


def timed_ms(fn, seconds=0.3) -> float:
    """Median ms of fn over batches of calls filling about ``seconds``."""
    fn()
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < 0.05:
        fn()
        n += 1
    per = max(1, int(n * seconds / 0.05 / 5))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(per):
            fn()
        samples.append((time.perf_counter() - t) / per * 1e3)
    return statistics.median(samples)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,2048,3072,4096,6144,8192,16384")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = harness.copy_bandwidth("cpu")
    print(f"{harness.card()}, {torch.get_num_threads()} threads, float32, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'L':>7} {'B':>3} {'dense':>8} {'dsa':>8} {'floor_d':>8} {'floor_s':>8} "
          f"{'dsa/dense':>9}   (ms per layer step)")
    for b in map(int, args.batches.split(",")):
        crossover = None
        for lk in map(int, args.lengths.split(",")):
            q = torch.randn(b, HQ, 1, D)
            k, v = torch.randn(b, HKV, lk, D), torch.randn(b, HKV, lk, D)
            q_idx, k_idx = torch.randn(b, 1, H_I, D_I), torch.randn(b, lk, D_I)
            w = torch.rand(b, 1, H_I)

            def step(dense_below, q=q, k=k, v=v, q_idx=q_idx, k_idx=k_idx, w=w, lk=lk):
                return torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, TOP_K, D ** -0.5,
                                               True, lk - 1, None, 0.0, dense_below)

            dense = timed_ms(lambda step=step: step(1 << 40))
            dsa = timed_ms(lambda step=step: step(0))
            floor_d = 2 * b * HKV * lk * D * 4 / bw * 1e3
            floor_s = (b * lk * D_I * 4 + 2 * b * HKV * min(TOP_K, lk) * D * 4) / bw * 1e3
            if crossover is None and dsa < dense:
                crossover = lk
            print(f"{lk:>7} {b:>3} {dense:8.3f} {dsa:8.3f} {floor_d:8.4f} {floor_s:8.4f} "
                  f"{dense / dsa:8.2f}x", flush=True)
        print(f"B={b}: dsa first faster than dense at L = {crossover}")


if __name__ == "__main__":
    main()
