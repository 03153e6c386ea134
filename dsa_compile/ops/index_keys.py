"""`dsa::pack_index_keys`: index keys -> packed FP8 keys (reference/index_keys.py).

The index-key cache pass (passes/index_cache.py) inserts it where a graph writes new
index keys into an FP8 cache (``DSAConfig(index_cache_fp8=True)``); an opaque op keeps
the byte layout out of Inductor's hands. Any device; on CUDA one Triton launch
(kernels/index_keys.py) once that kernel is enabled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsa_compile.ops.checks import check, check_tensor
from dsa_compile.ops.dispatch import use_triton
from dsa_compile.reference.index_keys import check_packable, packed_width
from dsa_compile.reference.index_keys import pack_index_keys as _pack


def _check(k_idx):
    op = "pack_index_keys"
    check(isinstance(k_idx, Tensor) and k_idx.dim() >= 1, op,
          "k_idx must be a tensor [..., d_I]")
    check_tensor(op, "k_idx", k_idx, k_idx.dim(), inner_contiguous=False)
    check_packable(k_idx.shape[-1])


@torch.library.custom_op("dsa::pack_index_keys", mutates_args=())
def pack_index_keys(k_idx: Tensor) -> Tensor:
    """float [..., d_I] -> uint8 [..., d_I + 4]: e4m3 values, then the float32 scale.

    Raises:
        ValueError: a non-float input or d_I not divisible by 4.
    """
    _check(k_idx)
    return _pack(k_idx)


@pack_index_keys.register_fake
def _(k_idx):
    _check(k_idx)
    return k_idx.new_empty((*k_idx.shape[:-1], packed_width(k_idx.shape[-1])),
                           dtype=torch.uint8)


@pack_index_keys.register_kernel("cuda")
def _(k_idx):
    _check(k_idx)
    from dsa_compile.kernels import index_keys as kernel

    if not use_triton():
        return _pack(k_idx)
    return kernel.pack_index_keys(k_idx)
