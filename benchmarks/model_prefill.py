"""Model prefill: torch.compile default (Inductor) vs backend="dsa" on a Llama-3-8B-shaped model.

Random weights, bf16, B = 1, a few decoder layers (hidden 4096, 32 query heads, 8 KV heads,
head dim 128, MLP 14336), no LM head (its logits would dominate memory at 64K). Prints
median prefill time of each and the ratio. Before timing, checks on the GPU in the same
run that (a) with top_k covering every key and the sparse path forced, the DSA model gives
the dense output, and (b) the compiled DSA model with Triton kernels matches the same model
run through the PyTorch reference ops.

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
from dsa_compile.backends.dynamo import dsa_backend  # noqa: E402
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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn, reps: int = 5) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=1, rep=reps * 200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=2048)
    p.add_argument("--csv", default=os.environ.get("OUT", ".") + "/model_prefill.csv")
    args = p.parse_args()
    device = "cuda"
    model = build_model(args.layers, max(args.lengths), device)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")

    # (a) exactness on the GPU: full top_k, sparse path forced.
    ids = torch.randint(0, 128256, (1, 1024), device=device)
    with torch.no_grad():
        dense = model(ids).last_hidden_state
        exact = torch.compile(model, backend=dsa_backend,
                              options={"top_k": 1024, "dense_below": 0})(ids).last_hidden_state
    err = rel_err(exact, dense)
    print(f"check full top_k == dense (L=1024): rel err {err:.2e}")
    assert err < 2e-2, "DSA with full top_k does not match dense"
    torch._dynamo.reset()

    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 128256, (1, length), device=device)
        default = torch.compile(model)
        dsa = torch.compile(model, backend=dsa_backend, options={"top_k": args.top_k})
        with torch.no_grad():
            out_dsa = dsa(ids).last_hidden_state
            # (b) Triton kernels vs the reference ops inside the same compiled model.
            if length <= 32768:
                with force_reference():
                    torch._dynamo.reset()
                    ref = torch.compile(model, backend=dsa_backend,
                                        options={"top_k": args.top_k})(ids).last_hidden_state
                err = rel_err(out_dsa, ref)
                print(f"L={length}: DSA kernels vs reference rel err {err:.2e}")
                assert err < 2e-2
                torch._dynamo.reset()
                dsa = torch.compile(model, backend=dsa_backend, options={"top_k": args.top_k})
                dsa(ids)
            t_dense = timed(lambda f=default, x=ids: f(x))
            torch.cuda.reset_peak_memory_stats()
            t_dsa = timed(lambda f=dsa, x=ids: f(x))
            peak = torch.cuda.max_memory_allocated() / 2**30
        rows.append((length, t_dense, t_dsa, t_dense / t_dsa, peak))
        print(f"L={length}: inductor {t_dense:.1f} ms  dsa {t_dsa:.1f} ms  "
              f"speed-up {t_dense / t_dsa:.2f}x  dsa peak {peak:.1f} GiB")
        torch._dynamo.reset()
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["L", "inductor_ms", "dsa_ms", "speedup", "dsa_peak_GiB"])
        w.writerows(rows)
    print(f"layers={args.layers} top_k={args.top_k} dsa_compile {dsa_compile.__version__}")
    print("| L | Inductor default (ms) | backend=dsa (ms) | speed-up |")
    print("|---|---|---|---|")
    for length, a, b, r, _ in rows:
        print(f"| {length} | {a:.1f} | {b:.1f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
