"""Where a compiled decode step's time goes: torch.profiler over a few steps.

    python benchmarks/decode_profile.py [--length 32768] [--layers 2] [--steps 5]

Same model and loop as benchmarks/generate.py (Llama-3-8B shape, StaticCache), for
Inductor and the "dsa" backend; prints the ms per step and the top operators by CPU
and by CUDA time, so launch and Python overheads show beside the kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    from generate import random_llama
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    from dsa_compile.backends.dynamo import dsa_backend

    try:
        torch._dynamo.lookup_backend("dsa")
    except Exception:
        torch._dynamo.register_backend(name="dsa")(dsa_backend)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model = random_llama(args.layers)
    for name, kw in {"inductor": {}, "dsa": {"backend": "dsa",
                                             "options": {"top_k": 2048}}}.items():
        torch._dynamo.reset()
        fwd = torch.compile(type(model).forward.__get__(model), **kw)
        ids = torch.randint(0, 1000, (1, args.length), device="cuda")
        cache = StaticCache(config=model.config, max_cache_len=args.length + 64)
        with torch.no_grad():
            fwd(input_ids=ids, past_key_values=cache,
                cache_position=torch.arange(args.length, device="cuda"), logits_to_keep=1)
            nxt = ids[:, :1]

            def step(i, fwd=fwd, nxt=nxt, cache=cache):
                return fwd(input_ids=nxt, past_key_values=cache,
                           cache_position=torch.tensor([args.length + i], device="cuda"))

            for i in range(3):
                step(i)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(3 + i)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(args.steps):
                    step(3 + args.steps + i)
                torch.cuda.synchronize()
        print(f"== {name}: {ms:.2f} ms per step, {args.layers} layers, L={args.length}")
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        print(table.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
