"""Compile time of backend="dsa" against Inductor's default, and recompiles across lengths.

    python benchmarks/compile_time.py

Model: a tiny Llama (2 layers, 4 query heads, 2 KV heads, hidden 32, random weights).
Each measurement starts from a reset dynamo cache (so dynamo traces again); both
backends are warmed once first, so Inductor's FX graph cache is warm for both alike.
The best of 3 runs is reported.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import models  # noqa: E402  (the test zoo's tiny Llama)

from dsa_compile.backends import dynamo as dsa_backend  # noqa: E402


def first_call_seconds(model, ids, **compile_kw) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kw)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(input_ids=ids)
    return time.perf_counter() - start


def recompiles_across_lengths(model, lengths, **compile_kw) -> int:
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, **compile_kw)
    with torch.no_grad():
        compiled(input_ids=torch.randint(0, 64, (1, lengths[0])))
        first = dsa_backend.DEFAULT.compiles
        for n in lengths[1:]:
            compiled(input_ids=torch.randint(0, 64, (1, n)))
    return dsa_backend.DEFAULT.compiles - first


def main() -> None:
    torch.manual_seed(0)
    model = models.llama("sdpa", layers=2)
    ids = torch.randint(0, 64, (1, 128))
    # Warm both code paths once (imports, first Inductor use), then measure.
    first_call_seconds(model, ids, backend="inductor")
    first_call_seconds(model, ids, backend="dsa", options={"top_k": 64})
    inductor = [first_call_seconds(model, ids, backend="inductor") for _ in range(3)]
    dsa = [first_call_seconds(model, ids, backend="dsa", options={"top_k": 64})
           for _ in range(3)]
    print("compile + first call, tiny Llama (2 layers), L=128, CPU")
    print(f"  inductor (default): {min(inductor):.2f} s")
    print(f"  dsa:                {min(dsa):.2f} s   (x{min(dsa) / min(inductor):.2f})")
    lengths = [128, 256, 512, 1024, 2048, 4096]
    n = recompiles_across_lengths(model, lengths, backend="dsa", options={"top_k": 64})
    print(f"dsa backend, dynamic=True, lengths {lengths}: {n} recompiles after the first")


if __name__ == "__main__":
    main()
