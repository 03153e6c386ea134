"""Which implementation the CUDA registrations run, decided at run time.

- The Triton kernels or the reference: the reference runs on any device; forcing it on
  CUDA lets a benchmark check the kernels against the spec inside the same compiled model.
- FP8 on CUDA (:func:`fp8`): the indexer's scores and/or sparse attention's K/V
  gathers in e4m3 with per-row scales. A kernel choice like TF32: the reference and CPU
  ignore it.
"""

from __future__ import annotations

import contextlib

_force_reference = False
_fp8 = {"indexer": False, "kv": False}


def use_triton() -> bool:
    return not _force_reference


@contextlib.contextmanager
def force_reference():
    """Run the pure PyTorch reference even for CUDA tensors inside this block."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous



def indexer_fp8() -> bool:
    return _fp8["indexer"]


def kv_fp8() -> bool:
    return _fp8["kv"]


@contextlib.contextmanager
def fp8(indexer: bool = True, kv: bool = False):
    """FP8 (e4m3) kernels on CUDA inside this block; for inference (no effect on CPU).

    Args:
        indexer: score the lightning indexer in FP8 (per-row scales, as DeepSeek's
            indexer). Measured on an H200 (benchmarks/RESULTS.md): 5-10% faster indexer
            at 32K-128K (slower at 4K), keeping 96.5-99.3% of the bf16 selection.
        kv: gather K and V as FP8 rows in sparse attention (half the bytes; exact
            attention over the dequantised K/V). Used for bf16/fp16 models when autograd
            is not recording; float32 models and training keep full precision.
    """
    previous = dict(_fp8)
    _fp8.update(indexer=indexer, kv=kv)
    try:
        yield
    finally:
        _fp8.update(previous)
