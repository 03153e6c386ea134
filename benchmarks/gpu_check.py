"""GPU correctness of the DSA Triton kernels at real shapes, plus the kernel tests.

    python benchmarks/gpu_check.py [--lengths 4096,8192,16384,32768] [--pytest]

For each length: bf16, B=1, Hq=32, Hkv=8, D=128, causal, top_k=2048. Checks
- indexer_topk (fp32 and bf16): the reference scores of the kernel's selection match
  the reference's top scores on sampled rows (rounding may swap near-ties);
- sparse_attention: ||out - ref|| / ||ref|| over sampled query rows vs the fp32
  reference, lse max abs error, and that no output is NaN (outputs start as NaN-free
  torch.empty, so the check covers every written element);
also G = Hkv indices and softcap. Prints one line per check and exits non-zero on any
failure. With --pytest it then runs tests/test_kernels.py on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys
import time

import torch

B, HQ, HKV, D, TOP_K = 1, 32, 8, 128, 2048


def check_length(length: int, failures: list) -> None:
    from dsa_compile import kernels, reference
    from dsa_compile.indexer import default_index_shape
    from dsa_compile.metrics import rel_err as rel

    dev = torch.device("cuda")
    h_i, d_i = default_index_shape(HQ, HKV, D)
    rows = torch.unique(torch.cat([torch.tensor([0, 1, 2047, 2048, length - 1]),
                                   torch.randint(0, length, (32,))])).to(dev)

    def report(name, err, tol):
        ok = err <= tol
        print(f"L={length:>6} {name:<40} err={err:.3e} tol={tol:.0e} {'ok' if ok else 'FAIL'}",
              flush=True)
        if not ok:
            failures.append((length, name, err))

    # Indexer in fp32 and bf16: the reference scores of the kernel's selection must be
    # the reference's top scores (rounding may swap keys whose scores nearly tie).
    qi = torch.randn(B, length, h_i, d_i, device=dev)
    ki = torch.randn(B, length, d_i, device=dev)
    w = torch.rand(B, length, h_i, device=dev) + 0.1
    t0 = time.perf_counter()
    kernels.indexer_topk(qi.bfloat16(), ki.bfloat16(), w.bfloat16(), TOP_K, 0, True, None)
    torch.cuda.synchronize()
    t_idx = time.perf_counter() - t0
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        qd, kd, wd = qi.to(dtype), ki.to(dtype), w.to(dtype)
        sel = kernels.indexer_topk(qd, kd, wd, TOP_K, 0, True, None)
        worst, swapped = 0.0, 0
        for t in rows.tolist():
            s = reference.indexer_scores(qd[:, t : t + 1], kd, wd[:, t : t + 1], t)
            r = reference.select_topk(s, TOP_K)
            n = int((r >= 0).sum())
            got = sel[:, t : t + 1]
            if int((got >= 0).sum()) != n or bool((got[..., n:] != -1).any()):
                worst = math.inf
                break
            swapped += int((got != r).sum())
            gs = torch.gather(s, -1, got[..., :n].long()).sort(-1).values
            rs = torch.gather(s, -1, r[..., :n].long()).sort(-1).values
            worst = max(worst, float((gs - rs).abs().max() / rs.abs().max()))
        name = str(dtype).replace("torch.", "")
        report(f"indexer_topk {name} {h_i}x{d_i} score gap ({swapped} slots differ)", worst, tol)
    del qi, ki, w, qd, kd, wd

    # Sparse attention on the kernel's own selection (G=1), plus G=Hkv and softcap.
    q = torch.randn(B, HQ, length, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, length, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, HKV, length, D, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5
    indices = sel.unsqueeze(1)
    for name, idx, cap in (("G=1", indices, 0.0), ("G=1 softcap=30", indices, 30.0),
                           ("G=Hkv", indices.expand(B, HKV, length, TOP_K).flip(1).contiguous()
                            .roll(1, dims=-1), 0.0)):
        out, lse = kernels.sparse_attention(q, k, v, idx, scale, cap)
        r_out, r_lse = reference.sparse_attention(q[:, :, rows].float(), k.float(), v.float(),
                                                  idx[:, :, rows], scale, cap)
        report(f"sparse_attention bf16 {name} out", rel(out[:, :, rows], r_out), 1e-2)
        finite = torch.isfinite(r_lse)
        lerr = float((lse[:, :, rows][finite] - r_lse[finite]).abs().max())
        report(f"sparse_attention bf16 {name} lse", lerr, 2e-2)
        report(f"sparse_attention bf16 {name} NaN count", float(out.isnan().sum()), 0)
    print(f"L={length:>6} (first indexer_topk call incl. autotune: {t_idx:.2f} s)", flush=True)


def probe_topk() -> None:
    """How fast is torch.topk on the score chunks the indexer selects from."""
    import triton.testing

    dev = torch.device("cuda")
    for rows, width in ((2048, 32768), (1024, 131072), (8192, 8192)):
        s = torch.randn(rows, width, device=dev)
        ms = triton.testing.do_bench(
            functools.partial(torch.topk, s, TOP_K, dim=-1, sorted=False), return_mode="median")
        ms_i = triton.testing.do_bench(
            functools.partial(torch.topk, s.view(torch.int32), TOP_K, dim=-1, sorted=False),
            return_mode="median")
        print(f"probe torch.topk fp32 [{rows}, {width}] k={TOP_K}: {ms:.3f} ms "
              f"(int32 view {ms_i:.3f} ms; {rows * width * 4 / ms / 1e6:.0f} GB/s)", flush=True)


def probe_indexer_parts(length: int) -> None:
    """Score kernel vs selection (radix-select kernel and torch.topk), timed apart."""
    import triton.testing

    from dsa_compile.indexer import default_index_shape
    from dsa_compile.kernels.indexer_topk import indexer_scores_chunk
    from dsa_compile.kernels.select_topk import select_topk_rows
    from dsa_compile.reference.indexer import select_topk

    dev = torch.device("cuda")
    for h_i, d_i in (default_index_shape(HQ, HKV, D), (4, 128)):
        rows = min(length, (1 << 30) // (4 * length))
        qi = torch.randn(1, length, h_i, d_i, device=dev, dtype=torch.bfloat16)
        ki = torch.randn(1, length, d_i, device=dev, dtype=torch.bfloat16)
        w = torch.rand(1, length, h_i, device=dev, dtype=torch.bfloat16)
        row0 = length - rows
        scores = functools.partial(indexer_scores_chunk, qi, ki, w, row0, rows, length, 0, True,
                                   None)
        ms_s = triton.testing.do_bench(scores, return_mode="median")
        chunk = scores()
        ms_t = triton.testing.do_bench(functools.partial(select_topk, chunk, TOP_K),
                                       return_mode="median")
        out = torch.full((1, length, TOP_K), -7, dtype=torch.int32, device=dev)
        radix = functools.partial(select_topk_rows, chunk, out, row0, 0, True)
        ms_r = triton.testing.do_bench(radix, return_mode="median")
        same = torch.equal(out[:, row0:], select_topk(chunk, TOP_K))
        select_module = sys.modules["dsa_compile.kernels.select_topk"]
        sample, select_module.SAMPLE = select_module.SAMPLE, 1 << 30  # no sampled path
        ms_p = triton.testing.do_bench(radix, return_mode="median")
        select_module.SAMPLE = sample
        flops = 2 * h_i * d_i * rows * (row0 + rows / 2)
        print(f"probe L={length} {h_i}x{d_i} last {rows} rows: scores {ms_s:.3f} ms "
              f"({flops / ms_s / 1e9:.0f} TFLOP/s), select: radix kernel {ms_r:.3f} ms "
              f"(without the sample path {ms_p:.3f} ms), "
              f"torch.topk path {ms_t:.3f} ms, same selection: {same}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--pytest", action="store_true", help="also run tests/test_kernels.py")
    parser.add_argument("--probe", action="store_true", help="also time torch.topk alone")
    parser.add_argument("--probe-lengths", default="32768",
                        help="lengths of the score/selection split probe (with --probe)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"# card: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    failures: list = []
    for length in (int(x) for x in args.lengths.split(",")):
        check_length(length, failures)
    if args.probe:
        probe_topk()
        for length in (int(x) for x in args.probe_lengths.split(",")):
            probe_indexer_parts(length)
    from dsa_compile.kernels.indexer_topk import indexer_scores_kernel
    from dsa_compile.kernels.select_topk import select_topk_kernel
    from dsa_compile.kernels.sparse_attention import sparse_attention_fwd_kernel

    print(f"# tuned indexer_scores_kernel: {indexer_scores_kernel.best_config}")
    print(f"# tuned select_topk_kernel: {select_topk_kernel.best_config}")
    print(f"# tuned sparse_attention_fwd_kernel: {sparse_attention_fwd_kernel.best_config}")
    rc = 0
    if args.pytest:
        # One fixed kernel config: autotuning every tiny test shape would cost minutes.
        env = dict(os.environ, DSA_TRITON_AUTOTUNE="0")
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q",
                              "-x", "-p", "no:cacheprovider"], env=env)
        print(f"# pytest tests/test_kernels.py exit code {rc}", flush=True)
    print(f"# gpu_check: {len(failures)} failure(s)" + (f": {failures}" if failures else ""))
    return 1 if failures or rc else 0


if __name__ == "__main__":
    sys.exit(main())
