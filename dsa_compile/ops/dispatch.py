"""Which implementation the CUDA registrations run: the Triton kernels, or the reference.

The reference runs on any device; forcing it on CUDA lets a benchmark check the kernels
against the spec inside the same compiled model.
"""

from __future__ import annotations

import contextlib

_force_reference = False


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
