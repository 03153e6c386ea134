"""Which implementation the CUDA registrations run, decided at run time.

- The Triton kernels or the reference: the reference runs on any device; forcing it on
  CUDA lets a benchmark check the kernels against the spec inside the same compiled model.
- The indexer's precision on CUDA: bf16/fp32 as given, or FP8 e4m3 scores
  (``kernels.indexer_topk(fp8=True)``, per-row scales as DeepSeek's indexer). A kernel
  choice like TF32: the reference and CPU ignore it.
"""

from __future__ import annotations

import contextlib

_force_reference = False
_indexer_fp8 = False


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
    return _indexer_fp8


@contextlib.contextmanager
def fp8_indexer(enabled: bool = True):
    """Score the lightning indexer in FP8 (e4m3) on CUDA inside this block.

    Measured on an H200 (benchmarks/RESULTS.md): a 5-10% faster indexer at 32K-128K
    (slower at 4K), keeping 96.5-99.3% of the bf16 indexer's selected keys. No effect
    on CPU.
    """
    global _indexer_fp8
    previous, _indexer_fp8 = _indexer_fp8, enabled
    try:
        yield
    finally:
        _indexer_fp8 = previous
