"""One DSA decode step per layer vs dense SDPA decode (issue 15).

    python benchmarks/decode.py [--lengths 4096,...] [--batches 1,8,32] [--d-index 128]
                                [--out DIR] [--tune]

Shape: bf16, Hq=32, Hkv=8, D=128, top_k=2048, indexer H_I=8 x d_I (128, or 64), one
query at position L-1 per sequence (the KV cache and the index-key cache hold L tokens).
Methods, each captured in a CUDA graph and timed by event-timed replays (median of
several batches), rotating over input sets so that the L2 cache cannot hold a small
problem's inputs between steps:

- dense:  F.scaled_dot_product_attention(q, k, v, enable_gqa=True), Lq=1 over the cache
- naive:  einsum scores over the cached index keys, torch.topk, gather, SDPA
- dsa:    dsa_compile.kernels.decode.decode_attention
- dsa8:   the same step reading an FP8 index-key cache (packed e4m3 keys + a float32
  scale per token, d_I + 4 bytes instead of 2 d_I; reference/index_keys.py)
- stages of dsa: scores (the score kernel, with the level-1 histogram; scores8 on the
  packed FP8 keys), topk (measured as scores+topk minus scores: 2 radix levels, count,
  write), attn+c (split-K attention and the log-sum-exp merge as a second launch, the
  default) and fused (the merge in the attention kernel's last program per KV head,
  decode.FUSED_COMBINE)

Floors are bytes / the copy bandwidth measured in the same run (a large device-to-device
copy, bytes read + written): dense = the K/V cache; dsa = the index keys + top_k rows
of K and V per KV head (floor_s8: with the packed FP8 keys). The correctness check of
decode_attention (both key formats) against the reference runs first on a small shape;
the script refuses to time anything if it fails.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time

import harness
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsa_compile import reference  # noqa: E402
from dsa_compile.kernels import decode  # noqa: E402
from dsa_compile.reference.index_keys import pack_index_keys  # noqa: E402

HQ, HKV, D, H_I, TOP_K = 32, 8, 128, 8, 2048
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20  # input sets rotate until they span this many bytes


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write counted)."""
    return harness.copy_bandwidth("cuda")


def graph_ms(fns, budget_s=0.25) -> float:
    """Median time of one step (ms): each callable (one per input set) is captured in
    its own CUDA graph; the graphs replay round-robin."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graphs = []
    for f in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        graphs.append(g)
    for g in graphs * 3:
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) / len(graphs)
    reps = max(len(graphs), min(2000, int(budget_s / 5 / max(one, 1e-6))))
    samples = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(reps):
            graphs[i % len(graphs)].replay()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) / reps)
    del graphs
    return statistics.median(samples)


def make_inputs(b, length, d_i):
    x = dict(
        q=torch.randn(b, HQ, 1, D, device="cuda", dtype=DT),
        k=torch.randn(b, HKV, length, D, device="cuda", dtype=DT),
        v=torch.randn(b, HKV, length, D, device="cuda", dtype=DT),
        q_idx=torch.randn(b, 1, H_I, d_i, device="cuda", dtype=DT),
        k_idx=torch.randn(b, length, d_i, device="cuda", dtype=DT),
        w=torch.rand(b, 1, H_I, device="cuda", dtype=DT),
        q_pos=torch.full((b, 1), length - 1, dtype=torch.int32, device="cuda"),
    )
    x["k_idx8"] = pack_index_keys(x["k_idx"])
    return x


def dense_step(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], scale=D ** -0.5,
                                          enable_gqa=True)


def naive_step(x, top_k=TOP_K):
    """The plain PyTorch DSA decode: scores over the cached index keys, topk, gather."""
    dots = torch.einsum("bthd,bsd->bths", x["q_idx"], x["k_idx"]).float().relu_()
    scores = torch.einsum("bths,bth->bts", dots, x["w"].float())  # [B, 1, L]
    idx = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).indices[:, 0]  # [B, K]
    b = idx.shape[0]
    gather = idx[:, None, :, None].expand(b, HKV, idx.shape[-1], D)
    kg = torch.gather(x["k"], 2, gather)
    vg = torch.gather(x["v"], 2, gather)
    return F.scaled_dot_product_attention(x["q"], kg, vg, scale=D ** -0.5, enable_gqa=True)


def dsa_step(x, scratch, top_k=TOP_K, keys="k_idx"):
    return decode.decode_attention(x["q"], x["k"], x["v"], x["q_idx"], x[keys], x["w"],
                                   top_k, D ** -0.5, x["q_pos"], scratch=scratch)


def stage_fns(x, s, top_k=TOP_K, config=None, keys="k_idx"):
    """Stages of dsa_step on its scratch ``s`` as callables: the score kernel alone, the
    score kernel + top-k (top-k needs the score kernel's histograms, and clears them),
    and the attention + combine."""
    b = x["q"].shape[0]
    idx = s.indices.view(b, 1, top_k)

    def scores():
        decode.decode_index_scores(x["q_idx"], x[keys], x["w"], x["q_pos"],
                                   hist=s.topk.hist, row_len=s.row_len, out=s.scores,
                                   config=config)

    def scores_topk():
        scores()
        decode.decode_topk(s.scores, top_k, s.row_len, s.topk, hist_ready=True, out=idx)

    def attn_and_combine(fused=None):
        decode.decode_sparse_attention(x["q"], x["k"], x["v"], s.indices, D ** -0.5,
                                       scratch=s.attn, fused=fused)

    return {"scores": scores, "scores+topk": scores_topk, "attn+combine": attn_and_combine,
            "attn+combine fused": lambda: attn_and_combine(True)}


def check(d_i) -> bool:
    """decode_attention vs the reference on a small shape (and top_k covering all keys
    vs dense attention)."""
    torch.manual_seed(0)
    ok = True
    for b, length, top_k in ((3, 6000, 2048), (2, 1500, 2048)):
        x = make_inputs(b, length, d_i)
        x["q_pos"] = torch.tensor([[length - 1 - 997 * i] for i in range(b)],
                                  dtype=torch.int32, device="cuda")
        for keys in ("k_idx", "k_idx8"):
            ok &= _check_one(x, b, length, top_k, keys)
    return ok


def _check_one(x, b, length, top_k, keys) -> bool:
    """One decode step vs the reference, reading index keys ``x[keys]``."""
    ok = True
    out = dsa_step(x, None, top_k, keys)
    for i in range(b):
        sl = slice(i, i + 1)
        pos = int(x["q_pos"][i, 0])
        idx = reference.indexer_topk(x["q_idx"][sl], x[keys][sl], x["w"][sl], top_k, pos)
        ref, _ = reference.sparse_attention(x["q"][sl], x["k"][sl], x["v"][sl],
                                            idx[:, None], D ** -0.5)
        if top_k >= pos + 1:
            ref, _ = reference.dense_attention(x["q"][sl], x["k"][sl], x["v"][sl],
                                               D ** -0.5, True, pos)
        err = float((out[i].float() - ref[0].float()).norm() / ref[0].float().norm())
        good = err < 2e-2 and not out[i].isnan().any()
        print(f"check {keys} B={b} L={length} seq {i} pos {pos}: rel err {err:.2e} "
              f"{'ok' if good else 'FAILED'}")
        ok &= good
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="4096,8192,32768,65536,131072")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--d-index", type=int, default=128)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--tune", action="store_true", help="also time top-k segment sizes and "
                   "attention splits at B=1 and 8, 128K")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    d_i = a.d_index
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, d_I={d_i}")
    if not check(d_i):
        print("correctness check FAILED: no timings reported")
        sys.exit(1)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (2 GiB device-to-device, read + write)")
    rows = []
    header = (f"{'L':>7} {'B':>3} {'dense':>8} {'naive':>8} {'dsa':>8} {'dsa8':>8} "
              f"{'floor_d':>8} {'floor_s':>8} {'floor_s8':>8} {'dsa/dense':>9} "
              f"{'dsa8/dense':>10} {'naive/dense':>11} {'scores':>7} {'scores8':>7} "
              f"{'topk':>7} {'attn+c':>7} {'fused':>7}")
    lines = []
    for length in [int(s) for s in a.lengths.split(",")]:
        for b in [int(s) for s in a.batches.split(",")]:
            kv_bytes = 2 * b * HKV * length * D * 2
            set_bytes = kv_bytes + b * length * d_i * 2
            n_sets = max(1, min(8, math.ceil(ROTATE_BYTES / set_bytes)))
            free, _ = torch.cuda.mem_get_info()
            need = n_sets * set_bytes + 2 * b * H_I * length * 4 + (2 << 30)
            if need > free:
                msg = f"{length:>7} {b:>3} skipped: needs {need / 2**30:.1f} GiB, " \
                      f"{free / 2**30:.1f} GiB free"
                print(msg)
                lines.append(msg)
                continue
            xs = [make_inputs(b, length, d_i) for _ in range(n_sets)]
            scratches = [decode.DecodeScratch.allocate(x["q"], x["k"], x["v"], x["k_idx"],
                                                       TOP_K) for x in xs]
            t_dense = graph_ms([lambda x=x: dense_step(x) for x in xs])
            t_naive = graph_ms([lambda x=x: naive_step(x) for x in xs])
            t_dsa = graph_ms([lambda x=x, s=s: dsa_step(x, s) for x, s in zip(xs, scratches)])
            t_dsa8 = graph_ms([lambda x=x, s=s: dsa_step(x, s, keys="k_idx8")
                               for x, s in zip(xs, scratches)])
            stages = {}
            fns = [stage_fns(x, s) for x, s in zip(xs, scratches)]
            for name in ("scores+topk", "attn+combine", "attn+combine fused",
                         "scores"):  # scores last: it
                stages[name] = graph_ms([f[name] for f in fns])  # leaves hist dirty
            for s in scratches:
                s.topk.hist.zero_()
            stages["scores8"] = graph_ms([stage_fns(x, s, keys="k_idx8")["scores"]
                                          for x, s in zip(xs, scratches)])
            for s in scratches:
                s.topk.hist.zero_()
            stages["topk"] = stages["scores+topk"] - stages["scores"]
            floor_d = kv_bytes / bw * 1e3
            dsa_bytes = b * length * d_i * 2 + 2 * b * HKV * min(TOP_K, length) * D * 2
            floor_s = dsa_bytes / bw * 1e3
            floor_s8 = (dsa_bytes - b * length * (d_i * 2 - (d_i + 4))) / bw * 1e3
            row = dict(L=length, B=b, d_index=d_i, dense_ms=t_dense, naive_ms=t_naive,
                       dsa_ms=t_dsa, dsa8_ms=t_dsa8, floor_dense_ms=floor_d,
                       floor_dsa_ms=floor_s, floor_dsa8_ms=floor_s8,
                       dense_over_dsa=t_dense / t_dsa, dense_over_dsa8=t_dense / t_dsa8,
                       dense_over_naive=t_dense / t_naive,
                       **{f"{k}_ms": v for k, v in stages.items()}, input_sets=n_sets)
            rows.append(row)
            line = (f"{length:>7} {b:>3} {t_dense:8.4f} {t_naive:8.4f} {t_dsa:8.4f} "
                    f"{t_dsa8:8.4f} {floor_d:8.4f} {floor_s:8.4f} {floor_s8:8.4f} "
                    f"{t_dense / t_dsa:8.2f}x {t_dense / t_dsa8:9.2f}x "
                    f"{t_dense / t_naive:10.2f}x {stages['scores']:7.4f} "
                    f"{stages['scores8']:7.4f} {stages['topk']:7.4f} "
                    f"{stages['attn+combine']:7.4f} {stages['attn+combine fused']:7.4f}")
            print(line, flush=True)
            lines.append(line)
            if a.tune and length == max(int(s) for s in a.lengths.split(",")) and b in (1, 8):
                tune(xs, scratches, b, length)
            del xs, scratches, fns
            torch.cuda.empty_cache()
    print(f"\nms per step; dsa/dense = speed-up of the DSA step over dense SDPA decode; "
          f"d_I={d_i}; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(header)
    for line in lines:
        print(line)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"decode_dI{d_i}.csv")
    if rows:
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {path}")


def tune(xs, scratches, b, length):
    """Score-kernel launch shapes, top-k segment sizes and attention splits (ms)."""
    for cfg in ({"block_n": 128, "tiles": 1, "num_warps": 4, "num_stages": 1},
                {"block_n": 64, "tiles": 1, "num_warps": 4, "num_stages": 1},
                {"block_n": 128, "tiles": 1, "num_warps": 8, "num_stages": 1},
                {"block_n": 256, "tiles": 1, "num_warps": 8, "num_stages": 1},
                {"block_n": 128, "tiles": 4, "num_warps": 4, "num_stages": 3},
                {"block_n": 64, "tiles": 4, "num_warps": 4, "num_stages": 3},
                {"block_n": 128, "tiles": 8, "num_warps": 8, "num_stages": 3}):
        fns = [stage_fns(x, s, config=cfg)["scores"] for x, s in zip(xs, scratches)]
        print(f"  tune B={b} L={length} scores {cfg}: {graph_ms(fns):.4f} ms", flush=True)
    fns = [lambda x=x, s=s: decode.decode_index_scores(x["q_idx"], x["k_idx"], x["w"],
                                                       x["q_pos"], out=s.scores)
           for x, s in zip(xs, scratches)]
    print(f"  tune B={b} L={length} scores without histogram: {graph_ms(fns):.4f} ms")
    for s in scratches:
        s.topk.hist.zero_()
    for seg in (512, 1024, 2048, 4096):
        fns = []
        for x, s in zip(xs, scratches):
            ts = decode.TopkScratch.allocate(b, length, "cuda", seg=seg)
            sc = stage_fns(x, s)["scores"]

            def f(s=s, ts=ts, sc=sc, b=b):
                sc()  # its histograms land in s.topk.hist; move them to ts
                ts.hist.copy_(s.topk.hist)
                s.topk.hist.zero_()
                decode.decode_topk(s.scores, TOP_K, s.row_len, ts, hist_ready=True,
                                   out=s.indices.view(b, 1, TOP_K))
            fns.append(f)
        print(f"  tune B={b} L={length} scores+topk seg {seg}: {graph_ms(fns):.4f} ms "
              "(includes a copy and a memset)", flush=True)
    for s in scratches:
        s.topk.hist.zero_()
    for splits in (8, 16, 32, 64):
        fns = []
        for x, s in zip(xs, scratches):
            att = decode.AttentionScratch.allocate(b, HQ, 1, D, splits, "cuda")
            fns.append(lambda x=x, s=s, att=att: decode.decode_sparse_attention(
                x["q"], x["k"], x["v"], s.indices, D ** -0.5, scratch=att))
        print(f"  tune B={b} L={length} attention splits {splits}: {graph_ms(fns):.4f} ms",
              flush=True)


if __name__ == "__main__":
    main()
