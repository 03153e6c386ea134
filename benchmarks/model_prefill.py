"""Model prefill: torch.compile default (Inductor) vs backend="dsa" on a Llama-3-8B-shaped model.

Random weights, bf16, B = 1, a few decoder layers (hidden 4096, 32 query heads, 8 KV heads,
head dim 128, MLP 14336), no LM head (its logits would dominate memory at 64K). Prints
median prefill time of Inductor's default, backend="dsa" with the default config (dispatch
keeps short rows dense), backend="dsa" with every query sparse (dense_below=0), and the
same with the FP8 indexer (index_fp8=True). Before
timing, checks on the GPU in the same run that (a) with top_k covering every key and the
sparse path forced, the DSA model gives the dense output, and (b) the compiled DSA model
with Triton kernels matches the same graph run through the PyTorch reference ops.

    python benchmarks/model_prefill.py --lengths 32768 65536 --layers 2
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dsa_compile  # noqa: E402
from dsa_compile.backends import dynamo  # noqa: E402
from dsa_compile.backends.dynamo import dsa_backend  # noqa: E402
from dsa_compile.metrics import rel_err  # noqa: E402
from dsa_compile.ops.dispatch import force_reference  # noqa: E402


def build_model(layers: int, max_len: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=max_len,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaModel(cfg).to(device=device, dtype=torch.bfloat16).eval()
    return model


def timed(fn, reps: int = 5) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=1, rep=reps * 200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2048)
    p.add_argument("--check-max", type=int, default=32768,
                   help="check the Triton kernels against the reference up to this length")
    p.add_argument("--csv", default=os.environ.get("OUT", ".") + "/model_prefill.csv")
    args = p.parse_args()
    device = "cuda"
    model = build_model(args.layers, max(args.lengths), device)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"layers={args.layers} top_k={args.top_k}", flush=True)

    # dynamic=True: one compile per variant serves every length.
    variants = {
        "inductor": torch.compile(model, dynamic=True),
        # the default config: dispatch keeps queries with <= dense_below keys dense
        "dsa": torch.compile(model, backend=dsa_backend, dynamic=True,
                             options={"top_k": args.top_k}),
        "dsa_sparse": torch.compile(model, backend=dsa_backend, dynamic=True,
                                    options={"top_k": args.top_k, "dense_below": 0}),
        # the same with the FP8 (e4m3) indexer
        "dsa_sparse_fp8": torch.compile(model, backend=dsa_backend, dynamic=True,
                                        options={"top_k": args.top_k, "dense_below": 0,
                                                 "index_fp8": True}),
    }
    # Exactness on the GPU: at L = top_k every query sees at most top_k keys, so the forced
    # sparse path must give the dense output (this first call also fits the indexers).
    ids = torch.randint(0, 128256, (1, args.top_k), device=device)
    with torch.no_grad():
        dense = model(ids).last_hidden_state
        exact = variants["dsa_sparse"](ids).last_hidden_state
    sites = dynamo.DEFAULT.last.sites
    rewritten = sum(r.rewritten for r in sites)
    print(f"backend rewrote {rewritten} of {len(sites)} attention sites", flush=True)
    assert rewritten == args.layers, "the DSA rewrite did not happen; timings would be dense"
    err = rel_err(exact, dense)
    print(f"check: sparse path with top_k covering every key == dense (L={args.top_k}): "
          f"rel err {err:.2e}", flush=True)
    assert err < 2e-2, "DSA with full top_k does not match dense"

    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 128256, (1, length), device=device)
        times = {}
        with torch.no_grad():
            for name, fn in variants.items():
                out = fn(ids).last_hidden_state
                if name == "dsa_sparse" and length <= args.check_max:
                    # Same compiled graph, the ops switched to the PyTorch reference.
                    with force_reference():
                        ref = fn(ids).last_hidden_state
                    e = rel_err(out, ref)
                    print(f"L={length}: dsa_sparse Triton kernels vs reference ops: rel err "
                          f"{e:.2e}", flush=True)
                    assert e < 2e-2
                del out
                torch.cuda.reset_peak_memory_stats()
                times[name] = timed(lambda f=fn, x=ids: f(x))
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"L={length}: {name:<10} {times[name]:9.1f} ms  peak {peak:5.1f} GiB  "
                      f"speed-up vs inductor {times['inductor'] / times[name]:.2f}x", flush=True)
                rows.append((length, name, times[name], times["inductor"] / times[name], peak))
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["L", "variant", "ms", "speedup_vs_inductor", "peak_GiB"])
        w.writerows(rows)
    print(f"dsa_compile {dsa_compile.__version__}")
    print("| L | variant | ms | vs Inductor default | peak GiB |")
    print("|---|---|---|---|---|")
    for length, name, ms, r, peak in rows:
        print(f"| {length} | {name} | {ms:.1f} | {r:.2f}x | {peak:.1f} |")


if __name__ == "__main__":
    main()
