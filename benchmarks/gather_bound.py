"""The gather ceiling of token-sparse attention on this GPU (issue 6's targets).

    python benchmarks/gather_bound.py [--lengths 32768 131072]

Token-sparse attention must read, for every query t and KV head g, the top_k K rows and
top_k V rows that t selected: Lq * Hkv * top_k * 2 * D * 2 bytes in bf16 (275 GB at 32K
for Hq=32, Hkv=8, D=128, top_k=2048). With GQA each gathered row serves only the R = 4
query heads of its group, so the work is 4 * Hq * D flops per 4 * Hkv * D bytes, i.e.
R = 4 flops per byte, and no tensor-core tuning lifts a kernel above what the memory
system delivers for such row gathers.

This script measures that ceiling directly, in one run, against SDPA:
- sdpa:         dense causal SDPA (flash), the baseline;
- dsa_sparse:   dsa_compile's sparse-attention kernel on the indexer's selections;
- gather_only:  a Triton kernel that only reads the same selected K/V rows in the same
                grid order (and sums them so the loads stay): the floor of any kernel that
                reads each selected row once per (query, KV head);
- *_window:     the same two kernels on a sliding window (the last top_k keys), the
                friendliest possible index pattern for the caches.
Each line prints time (median of triton.testing.do_bench), the gathered bytes per
second, the effective TFLOP/s that time allows (4 * Hq * Lq * top_k * D flops), and the
ratio to SDPA.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

B, HQ, HKV, D, TOP_K = 1, 32, 8, 128, 2048


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)],
    key=["TOPK"],
)
@triton.jit
def gather_only_kernel(K, V, IDX, OUT, lk, TOPK: tl.constexpr, D: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    t = tl.program_id(0)  # query: the fastest axis, as in the sparse-attention kernel
    g = tl.program_id(1)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(0, TOPK, BLOCK_N):
        idx = tl.load(IDX + t * TOPK + start + tl.arange(0, BLOCK_N))
        ok = idx >= 0
        rows = (g * lk + tl.where(ok, idx, 0)).to(tl.int64)[:, None] * D + offs_d[None, :]
        k = tl.load(K + rows, mask=ok[:, None], other=0.0)
        v = tl.load(V + rows, mask=ok[:, None], other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + (t * tl.num_programs(1) + g) * D + offs_d, tl.sum(acc, 0))


def gather_only(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """k, v [Hkv, Lk, D] bf16, idx int32 [Lq, top_k] -> [Lq, Hkv, D] sums of the rows."""
    lq, top_k = idx.shape
    out = torch.empty(lq, k.shape[0], k.shape[2], device=k.device, dtype=torch.float32)
    gather_only_kernel[(lq, k.shape[0])](k, v, idx, out, k.shape[1], TOPK=top_k, D=k.shape[2])
    return out


def window_indices(length: int, top_k: int, device) -> torch.Tensor:
    """The last top_k keys of every causal query, ascending, -1 where t < top_k - 1."""
    t = torch.arange(length, device=device)[:, None]
    idx = t - (top_k - 1) + torch.arange(top_k, device=device)[None]
    return torch.where(idx >= 0, idx, -1).to(torch.int32)


def bench_length(length: int, bench, h_i: int, d_i: int, dev) -> None:
    """Time SDPA, the sparse kernel and the gather-only floor at one length; print a row each."""
    from dsa_compile import kernels

    g = torch.Generator(device=dev).manual_seed(length)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, k, v = rnd(B, HQ, length, D), rnd(B, HKV, length, D), rnd(B, HKV, length, D)
    q_idx, k_idx = rnd(B, length, h_i, d_i), rnd(B, length, d_i)
    w = torch.rand(B, length, h_i, device=dev, generator=g).to(torch.bfloat16)
    chosen = kernels.indexer_topk(q_idx, k_idx, w, TOP_K)  # [B, Lq, top_k]
    window = window_indices(length, TOP_K, dev)
    scale = D ** -0.5
    valid = int((chosen >= 0).sum())  # selected (query, key) pairs
    gb = valid * HKV * 2 * D * 2 / 1e9
    flops = 4 * HQ * valid * D

    sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=True))
    kk, vv = k[0].contiguous(), v[0].contiguous()
    # The gather-only kernel must read what the sparse kernel reads: check its sums.
    ref = (kk.float()[:, chosen[0, -1].long()] + vv.float()[:, chosen[0, -1].long()]).sum(1)
    got = gather_only(kk, vv, chosen[0].contiguous())[-1]
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-1), (got - ref).abs().max()
    rows = [("sdpa", sdpa)]
    for name, idx in (("", chosen), ("_window", window[None])):
        rows.append((f"dsa_sparse{name}", bench(lambda idx=idx: kernels.sparse_attention(
            q, k, v, idx[:, None], scale))))
        rows.append((f"gather_only{name}", bench(lambda idx=idx: gather_only(
            kk, vv, idx[0].contiguous()))))
    for name, ms in rows:
        tbs = "" if name == "sdpa" else f"{gb / ms:14.2f}"
        tf = "" if name == "sdpa" else f"{flops / ms / 1e9:12.1f}"
        print(f"{length:>7} {name:<18} {ms:9.3f} {tbs:>14} {tf:>12} {sdpa / ms:7.2f}")
    print(f"{length:>7} gathered bytes {gb:.1f} GB; 3x SDPA needs {gb / (sdpa / 3):.1f} TB/s "
          f"of row gathers, 300 TFLOP/s needs {gb / (flops / 300e12 * 1e3):.1f} TB/s",
          flush=True)



def main() -> None:
    import triton.testing

    from dsa_compile.indexer import default_index_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    args = parser.parse_args()
    dev = torch.device("cuda")
    h_i, d_i = default_index_shape(HQ, HKV, D)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"B={B} Hq={HQ} Hkv={HKV} D={D} top_k={TOP_K}, bf16, causal; indexer {h_i}x{d_i}")
    print(f"{'L':>7} {'method':<18} {'ms':>9} {'gathered TB/s':>14} {'eff TFLOP/s':>12} "
          f"{'x SDPA':>7}")
    for length in args.lengths:
        bench_length(length, bench, h_i, d_i, dev)
        torch.cuda.empty_cache()  # the previous length's tensors are freed on return

if __name__ == "__main__":
    main()
