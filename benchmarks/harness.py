"""What the GPU benchmarks share: timing, the card's measured rates, its name.

Every benchmark prints its card and the rates its floors use, measured in the same run
(benchmarks/RESULTS.md quotes them). Scripts run as ``python3 benchmarks/NAME.py``, so
this directory is on ``sys.path`` and they ``import harness``.
"""

from __future__ import annotations

import time

import torch


def bench(fn) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench: 25 ms warm-up, 100 ms)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def card() -> str:
    """'<GPU name>  torch <version>  triton <version>' (or the CPU's when no GPU)."""
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{name}  torch {torch.__version__}  triton {triton.__version__}"


def matmul_rate(device="cuda") -> float:
    """bf16 matmul rate of the card, TFLOP/s (one 8192^3 product, median)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / bench(lambda: a @ a) / 1e9


def copy_bandwidth(device="cuda") -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (128 MiB on CPU),
    median of 10: the rate byte floors are quoted at."""
    n = 1 << (30 if torch.device(device).type == "cuda" else 26)
    a = torch.empty(n, dtype=torch.int16, device=device).random_()
    b = torch.empty_like(a)
    if torch.device(device).type == "cuda":
        return 2 * a.numel() * 2 / bench(lambda: b.copy_(a)) * 1e3
    b.copy_(a)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 2 / sorted(times)[len(times) // 2]
