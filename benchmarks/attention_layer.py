"""One attention layer at long context: SDPA dense vs FlexAttention block-sparse vs DSA.

    python benchmarks/attention_layer.py [--lengths 4096,8192,...] [--csv out.csv]

Shapes (issue 6): bf16, B=1, Hq=32, Hkv=8, D=128, causal, top_k=2048. For every length
it checks each method against the reference on sampled query rows and then times it
(median of triton.testing.do_bench) with fresh random inputs. Rows whose check failed
print FAILED instead of a time. Methods:

- sdpa:         F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
- flex:         FlexAttention, block mask = causal sliding window of top_k keys in
                128-blocks (the same key budget as DSA), mask built with _compile=True
- indexer[HxD]: dsa indexer_topk alone (scores + top-k), at the default indexer shape
                (dsa_compile.indexer.default_index_shape) and at H_I x d_I = 4 x 128
- sparse:       dsa sparse_attention alone on the indexer's selection (G=1); on random
                inputs that selection is random (neighbouring queries share almost no
                keys: the worst case). sparse_rows / sparse_tiles: the per-query kernel
                and the query-tile kernel forced (kernels/tile_attention.py)
- real:         the same three on *real-like* selections (benchmarks/selections.py:
                the generator fitted to SmolLM2's recorded selections), tagged "@real",
                and dsa_real = the indexer (its output dropped) + sparse attention on
                the real-like selection, i.e. what a DSA layer costs when the indexer
                selects like a real model. Every selection's union statistics
                (|union of BQ consecutive queries| / top_k) are printed
- floors:       per length, the bf16 matmul rate and copy bandwidth measured in the
                same run; the sparse kernel's FLOP floor (effective FLOPs at that rate;
                its byte floor, K and V read once, is far below) and, for scale, the
                gathered bytes at copy rate if no program reused another's rows (by
                tiles: every tile's union; per query: every selected row)
- dsa[HxD]:     indexer_topk + sparse_attention, every query sparse (dense_below=0)
- dsa_op[HxD]:  torch.ops.dsa.attention with dense_below=top_k (first top_k queries
                dense: exact there)
- indexer_fp8[HxD], dsa_fp8[HxD]: the same with the FP8 (e4m3) indexer
                (indexer_topk(fp8=True), default shape only); checked against the
                reference on the dequantised indexer inputs; `recall` = share of the
                bf16 indexer's selected keys the FP8 one also selects (sampled rows)

TFLOP/s count effective FLOPs: attention 4 * Hq * D per (query, attended key) pair;
the indexer 2 * H_I * d_I per (query, visible key) pair. Peak memory is the CUDA
allocator's peak during one call, inputs included.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys

import harness
import torch
import torch.nn.functional as F

B, HQ, HKV, D = 1, 32, 8, 128
TOP_K = 2048
CHECK_ROWS = 48


def visible_pairs(length: int, budget: int | None) -> int:
    """Sum over causal queries t of min(t + 1, budget) (all t + 1 when budget is None)."""
    if budget is None or budget >= length:
        return length * (length + 1) // 2
    return budget * (budget + 1) // 2 + (length - budget) * budget


def sample_rows(length: int, device) -> torch.Tensor:
    """A few early, middle and late query rows (early rows have few visible keys)."""
    picks = {0, 1, min(length - 1, 100), length // 2, length - 1}
    picks |= set(torch.randint(0, length, (CHECK_ROWS,)).tolist())
    return torch.tensor(sorted(picks), device=device)


def make_inputs(length: int, index_shape: tuple[int, int], device):
    h_i, d_i = index_shape
    q = torch.randn(B, HQ, length, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, length, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, HKV, length, D, device=device, dtype=torch.bfloat16)
    q_idx = torch.randn(B, length, h_i, d_i, device=device, dtype=torch.bfloat16)
    k_idx = torch.randn(B, length, d_i, device=device, dtype=torch.bfloat16)
    w = (torch.rand(B, length, h_i, device=device) + 0.5).to(torch.bfloat16) / math.sqrt(h_i * d_i)
    return q, k, v, q_idx, k_idx, w


def check_dense_rows(out, q, k, v, rows, scale) -> float:
    """SDPA-style causal output on sampled rows vs the fp32 dense reference."""
    from dsa_compile import reference
    from dsa_compile.metrics import rel_err

    errs = []
    for t in rows.tolist():
        ref, _ = reference.dense_attention(q[:, :, t : t + 1].float(), k[:, :, : t + 1].float(),
                                           v[:, :, : t + 1].float(), scale, True, t)
        errs.append(rel_err(out[:, :, t : t + 1], ref))
    return max(errs)


def check_sparse_rows(out, q, k, v, indices, rows, scale) -> float:
    from dsa_compile import reference
    from dsa_compile.metrics import rel_err

    ref, _ = reference.sparse_attention(q[:, :, rows].float(), k.float(), v.float(),
                                        indices[:, :, rows], scale)
    return rel_err(out[:, :, rows], ref)


def check_indexer_rows(sel, q_idx, k_idx, w, rows, top_k) -> float:
    """Largest gap between the reference's k-th best score and the worst selected one.

    bf16 rounding can swap near-ties, so sets may differ; the selection must still be
    the top scores up to rounding. Returned relative to the row's score scale (0 = exact).
    """
    from dsa_compile import reference

    worst = 0.0
    for t in rows.tolist():
        scores = reference.indexer_scores(q_idx[:, t : t + 1], k_idx, w[:, t : t + 1], t)
        ref_sel = reference.select_topk(scores, top_k)
        got = sel[:, t : t + 1]
        n_ref, n_got = int((ref_sel >= 0).sum()), int((got >= 0).sum())
        if n_ref != n_got:
            return float("inf")
        if n_got == 0:
            continue
        got_scores = torch.gather(scores, -1, got[..., :n_got].long())
        ref_scores = torch.gather(scores, -1, ref_sel[..., :n_ref].long())
        if not torch.isfinite(got_scores).all():
            return float("inf")
        scale_ = ref_scores.abs().max().clamp_min(1e-30)
        gap = (ref_scores.min() - got_scores.min()).clamp_min(0) / scale_
        worst = max(worst, float(gap), float((ref_scores.sum() - got_scores.sum()).abs()
                                              / (ref_scores.abs().sum() + 1e-30)))
    return worst


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def run(lengths, index_shapes, methods, out_csv, plot_path, block_qs=(None,)):
    import dsa_compile.ops  # noqa: F401  (registers torch.ops.dsa)
    from dsa_compile import kernels
    from dsa_compile.indexer import default_index_shape

    device = torch.device("cuda")
    scale = D ** -0.5
    default_shape = default_index_shape(HQ, HKV, D)
    shapes = [default_shape if s == "default" else tuple(int(x) for x in s.split("x"))
              for s in index_shapes]
    flex, block_mask_fn = None, None
    if "flex" in methods:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask_fn = create_block_mask

    recorder = Recorder(out_csv)
    print(f"# card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    print(f"# B={B} Hq={HQ} Hkv={HKV} D={D} bf16 causal top_k={TOP_K}; default indexer "
          f"H_I x d_I = {default_shape[0]}x{default_shape[1]}", flush=True)
    print(f"{'L':>7} {'method':<16} {'ms':>9} {'TFLOP/s':>8} {'peak GB':>8} {'vs SDPA':>8} "
          f"{'check':>10}", flush=True)
    attn_flops = 4 * B * HQ * D
    rates = measured_rates(device)
    print(f"# measured: bf16 matmul {rates['tflops']:.0f} TFLOP/s, copy "
          f"{rates['tbps']:.2f} TB/s", flush=True)
    for length in lengths:
        torch.manual_seed(length)
        q, k, v, q_idx, k_idx, w = make_inputs(length, shapes[0], device)
        rows = sample_rows(length, device)
        sparse_flops = attn_flops * visible_pairs(length, TOP_K)

        if "sdpa" in methods:
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                     scale=scale, enable_gqa=True)
            err = check_dense_rows(sdpa(), q, k, v, rows, scale)
            recorder.record(length, "sdpa", sdpa, attn_flops * visible_pairs(length, None), err)

        if flex is not None:
            mask = block_mask_fn(sliding_window, None, None, length, length, device=device,
                                 _compile=True)
            flex_fn = functools.partial(flex, q, k, v, block_mask=mask, scale=scale,
                                        enable_gqa=True)
            win = torch.arange(TOP_K, device=device)
            pos = rows[:, None] - (TOP_K - 1) + win[None, :]
            win_idx = torch.full((B, 1, length, TOP_K), -1, dtype=torch.int32, device=device)
            win_idx[:, :, rows] = torch.where(pos >= 0, pos, -1).to(torch.int32)
            err = check_sparse_rows(flex_fn(), q, k, v, win_idx, rows, scale)
            del win_idx
            recorder.record(length, "flex", flex_fn, sparse_flops, err)
            del mask, flex_fn

        for h_i, d_i in shapes:
            tag = f"{h_i}x{d_i}"
            if (h_i, d_i) != shapes[0]:
                _, _, _, q_idx, k_idx, w = make_inputs(length, (h_i, d_i), device)
            idx_flops = 2 * B * h_i * d_i * visible_pairs(length, None)
            indexer = functools.partial(kernels.indexer_topk, q_idx, k_idx, w, TOP_K, 0, True,
                                        None)
            indices = indexer().unsqueeze(1)
            if "indexer" in methods:
                err = check_indexer_rows(indices[:, 0], q_idx, k_idx, w, rows, TOP_K)
                recorder.record(length, f"indexer[{tag}]", indexer, idx_flops, err, tol=1e-2)
            if (h_i, d_i) == shapes[0]:
                selections = {"": indices}
                if "real" in methods:
                    selections["@real"] = real_selection(length, device)
                for sel_tag, sel in selections.items():
                    floors(length, sel, sparse_flops, rates, sel_tag)
                    for name, fn in sparse_variants(q, k, v, sel, scale, methods, block_qs):
                        err = check_sparse_rows(fn()[0], q, k, v, sel, rows, scale)
                        recorder.record(length, name + sel_tag, fn, sparse_flops, err)
                if "@real" in selections and "dsa" in methods:
                    real = selections["@real"]

                    def dsa_real(real=real, indexer=indexer, q=q, k=k, v=v):
                        indexer()
                        return kernels.sparse_attention(q, k, v, real, scale)[0]

                    err = check_sparse_rows(dsa_real(), q, k, v, real, rows, scale)
                    recorder.record(length, f"dsa_real[{tag}]", dsa_real,
                                    sparse_flops + idx_flops, err)
                del selections
            variants = {
                "dsa": functools.partial(dsa_forced_sparse, q, k, v, q_idx, k_idx, w, scale),
                "dsa_op": functools.partial(torch.ops.dsa.attention, q, k, v, q_idx, k_idx, w,
                                            TOP_K, scale, True, 0, None, 0.0, TOP_K),
            }
            for name, fn in variants.items():
                if name in methods:
                    err = check_sparse_rows(fn(), q, k, v, indices, rows, scale)
                    recorder.record(length, f"{name}[{tag}]", fn, sparse_flops + idx_flops, err)
            if (h_i, d_i) == shapes[0] and {"indexer_fp8", "dsa_fp8"} & methods:
                fp8_methods(recorder, methods, length, tag, q, k, v, q_idx, k_idx, w, rows,
                            indices, scale, idx_flops, sparse_flops)
            del indices, indexer, variants
        del q, k, v, q_idx, k_idx, w
        torch.cuda.empty_cache()

    recorder.close()
    if plot_path:
        plot(recorder.rows, plot_path)


def fp8_methods(recorder, methods, length, tag, q, k, v, q_idx, k_idx, w, rows, indices,
                scale, idx_flops, sparse_flops):
    """The FP8 indexer alone and in DSA, checked against the dequantised reference."""
    from dsa_compile import kernels
    from dsa_compile.kernels.indexer_topk import quantize_fp8

    indexer8 = functools.partial(kernels.indexer_topk, q_idx, k_idx, w, TOP_K, 0, True, None,
                                 fp8=True)
    sel8 = indexer8()
    q8, q_scale = quantize_fp8(q_idx)
    k8, k_scale = quantize_fp8(k_idx)
    err = check_indexer_rows(sel8, q8.float() * q_scale[..., None],
                             k8.float() * k_scale[..., None], w.float(), rows, TOP_K)
    base = indices[:, 0, rows]
    hit = (sel8[:, rows, :, None] == base[..., None, :]) & (base[..., None, :] >= 0)
    recall = float(hit.any(-2).sum() / (base >= 0).sum())
    print(f"# L={length} fp8 indexer recall of the bf16 indexer's selection: {recall:.4f}",
          flush=True)
    if "indexer_fp8" in methods:
        recorder.record(length, f"indexer_fp8[{tag}]", indexer8, idx_flops, err, tol=1e-2)
    if "dsa_fp8" in methods:
        def dsa8():
            sel = kernels.indexer_topk(q_idx, k_idx, w, TOP_K, 0, True, None, fp8=True)
            return kernels.sparse_attention(q, k, v, sel.unsqueeze(1), scale)[0]

        err = check_sparse_rows(dsa8(), q, k, v, sel8.unsqueeze(1), rows, scale)
        recorder.record(length, f"dsa_fp8[{tag}]", dsa8, sparse_flops + idx_flops, err)


def sparse_variants(q, k, v, sel, scale, methods, block_qs):
    """(name, fn) of the sparse-attention methods asked for: the dispatcher, the
    per-query kernel, and the tile kernel at each block_q (its default first)."""
    from dsa_compile import kernels
    from dsa_compile.kernels.tile_attention import tile_sparse_attention

    out = []
    if "sparse" in methods:
        out.append(("sparse", functools.partial(kernels.sparse_attention, q, k, v, sel, scale)))
    if "sparse_rows" in methods:
        out.append(("sparse_rows", functools.partial(kernels.sparse_attention, q, k, v, sel,
                                                     scale, tiles=False)))
    if "sparse_tiles" in methods:
        for bq in block_qs:
            out.append((f"sparse_tiles{'' if bq is None else f'_bq{bq}'}",
                        functools.partial(tile_sparse_attention, q, k, v, sel, scale,
                                          block_q=bq)))
    return out


def measured_rates(device) -> dict:
    """The card's bf16 matmul rate (8192^3) and copy bandwidth (2 GiB), this run."""
    return {"tflops": harness.matmul_rate(device), "tbps": harness.copy_bandwidth(device) / 1e12}


def real_selection(length: int, device) -> torch.Tensor:
    """Real-like selections [B, 1, L, TOP_K] from the generator fitted to SmolLM2."""
    sys.path.insert(0, os.path.dirname(__file__))
    import selections

    params = selections.load_params("target")
    sel = selections.generate(length, TOP_K, params, device)
    return sel[None, None].expand(B, 1, length, TOP_K).contiguous()


def floors(length, sel, sparse_flops, rates, tag) -> None:
    """Union statistics of a selection and the sparse kernel's two floors on it."""
    sys.path.insert(0, os.path.dirname(__file__))
    import selections

    from dsa_compile.kernels.tile_attention import block_q_for, tile_unions

    bq = block_q_for(HQ // HKV)
    ratios = selections.union_ratios(sel[0, 0], TOP_K, blocks=(4, 16, 64))
    _, _, count = tile_unions(sel, length, bq)
    union_rows = int(count.sum())
    kv_bytes = union_rows * HKV * 2 * D * 2  # every union key's K and V row, per KV head
    per_query_bytes = int((sel >= 0).sum()) * HKV * 2 * D * 2
    print(f"# L={length} selection{tag or '@random'}: union/top_k "
          + " ".join(f"BQ={b}:{r:.2f}" for b, r in ratios.items())
          + f"; FLOP floor {sparse_flops / rates['tflops'] / 1e9:.3f} ms; gathers at copy rate "
          f"with no reuse between programs: by tiles (BQ={bq}) "
          f"{kv_bytes / rates['tbps'] / 1e9:.3f} ms, per query "
          f"{per_query_bytes / rates['tbps'] / 1e9:.3f} ms", flush=True)


def sliding_window(b, h, q_i, kv_i):
    """Flex mask: causal, and only the last TOP_K keys (the same budget as DSA)."""
    return (kv_i <= q_i) & (q_i - kv_i < TOP_K)


def dsa_forced_sparse(q, k, v, q_idx, k_idx, w, scale):
    """DSA with every query on the sparse path: indexer top-k, then sparse attention."""
    from dsa_compile import kernels

    indices = kernels.indexer_topk(q_idx, k_idx, w, TOP_K, 0, True, None)
    return kernels.sparse_attention(q, k, v, indices.unsqueeze(1), scale)[0]


class Recorder:
    """Times a checked method, prints its row, and appends it to the CSV as it goes."""

    def __init__(self, out_csv: str | None):
        self.rows: list[dict] = []
        self.sdpa_ms: dict[int, float] = {}
        self.out_csv = out_csv
        self.file, self.writer = None, None
        if out_csv:
            os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
            self.file = open(out_csv, "w", newline="")  # noqa: SIM115 (closed in close())

    def record(self, length, method, fn, flops, err, tol=2e-2):
        ok = err <= tol and not math.isnan(err)
        entry = {"L": length, "method": method, "ms": float("nan"), "tflops": float("nan"),
                 "peak_gb": float("nan"), "ratio_vs_sdpa": float("nan"), "check_err": err,
                 "ok": ok}
        if ok:  # speed is reported only for a method whose check passed in this run
            entry["peak_gb"] = peak_gb(fn)
            entry["ms"] = harness.bench(fn)
            entry["tflops"] = flops / entry["ms"] / 1e9
            if method == "sdpa":
                self.sdpa_ms[length] = entry["ms"]
            entry["ratio_vs_sdpa"] = self.sdpa_ms.get(length, float("nan")) / entry["ms"]
            shown = (f"{entry['ms']:9.3f} {entry['tflops']:8.1f} {entry['peak_gb']:8.2f} "
                     f"{entry['ratio_vs_sdpa']:7.2f}x")
        else:
            shown = f"{'FAILED':>9} {'':8} {'':8} {'':8}"
        print(f"{length:>7} {method:<16} {shown} {err:10.2e}", flush=True)
        self.rows.append(entry)
        if self.file is not None:
            if self.writer is None:
                self.writer = csv.DictWriter(self.file, fieldnames=list(entry))
                self.writer.writeheader()
            self.writer.writerow(entry)
            self.file.flush()
        torch.cuda.empty_cache()

    def close(self):
        if self.file is not None:
            self.file.close()
            print(f"# wrote {self.out_csv}")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["L"], r["ms"]) for r in rows if r["method"] == method and r["ok"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"attention layer, bf16, Hq={HQ} Hkv={HKV} D={D}, top_k={TOP_K}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--index-shapes", default="default,4x128",
                        help="comma list of 'default' or HxD indexer shapes")
    parser.add_argument("--methods",
                        default="sdpa,flex,indexer,sparse,sparse_rows,sparse_tiles,real,dsa,"
                                "dsa_op")
    parser.add_argument("--tile-block-q", default="",
                        help="comma list of extra block_q values for sparse_tiles "
                             "(default: only the kernel's own choice)")
    parser.add_argument("--stream", action="store_true",
                        help="use the streamed top-k (kernels/indexer_topk.STREAM)")
    parser.add_argument("--csv", default="benchmarks/results/attention_layer.csv")
    parser.add_argument("--plot", default="benchmarks/results/attention_layer.png")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_layer.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.stream:
        from dsa_compile.kernels import indexer_topk

        indexer_topk.STREAM = True
    run([int(x) for x in args.lengths.split(",")], args.index_shapes.split(","),
        set(args.methods.split(",")), args.csv, args.plot,
        (None, *(int(x) for x in args.tile_block_q.split(",") if x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
