"""Packed FP8 index keys: the index-key cache's compact storage format.

A decode step reads one index key per cached token, so the key's width is the step's
bandwidth. DeepSeek stores its indexer keys as float8 e4m3 with one float32 scale per
token (132 B at d_I = 128 against 256 B in bf16). Here a packed key is one uint8 row

    bytes 0 .. d_I - 1      the key's e4m3 values  k8 = round(k / scale)
    bytes d_I .. d_I + 3    scale, float32 (native byte order): amax(|k|) / 448

so a packed cache is a single uint8 tensor [B, L, d_I + 4] that an in-place
``index_copy_`` or a ``cat`` along L updates like any cache. Every op that takes
``k_idx`` accepts it (detected by dtype uint8) and scores the keys as

    I[t, s] = scale[s] * sum_j w[t, j] * ReLU(q_idx[t, j] . k8[s])

which is the indexer formula on the dequantised key k8 * scale (the scale is positive,
so it leaves the ReLU), computed so that kernels can apply the scale once per key.
Selections are exact for the dequantised keys, not for the keys before quantisation.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_BYTES = 4
_TINY = 1e-12  # the scale of an all-zero key (its e4m3 values are zeros anyway)


def is_packed(k_idx: torch.Tensor) -> bool:
    """True for packed FP8 index keys (uint8 [..., d_I + 4])."""
    return k_idx.dtype == torch.uint8


def packed_width(d_index: int) -> int:
    """Bytes per packed key of width ``d_index``."""
    return d_index + SCALE_BYTES


def check_packable(d_index: int) -> None:
    """The scale's 4 bytes must sit at an aligned offset of every row."""
    if d_index % SCALE_BYTES:
        raise ValueError(f"FP8 index keys need d_I divisible by {SCALE_BYTES}, got {d_index}; "
                         f"pick another index_dim or keep the bf16 index-key cache")


def pack_index_keys(k_idx: torch.Tensor) -> torch.Tensor:
    """float [..., d_I] -> packed uint8 [..., d_I + 4] (contiguous). A NaN key packs to
    NaN values and a NaN scale: its scores are NaN, which rank as the lowest finite."""
    d = k_idx.shape[-1]
    check_packable(d)
    x = k_idx.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(_TINY) / FP8_MAX
    scale = torch.where(x.isnan().any(-1, keepdim=True), float("nan"), scale)
    k8 = (x / scale).to(FP8)
    out = torch.empty((*k_idx.shape[:-1], packed_width(d)), dtype=torch.uint8,
                      device=k_idx.device)
    out[..., :d] = k8.view(torch.uint8)
    out[..., d:] = scale.contiguous().view(torch.uint8)
    return out


def unpack_index_keys(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a packed tensor [..., d_I + 4]: (k8 float8_e4m3fn [..., d_I] with the
    packed row stride, scale float32 [...])."""
    d = packed.shape[-1] - SCALE_BYTES
    if packed.stride(-1) != 1 or any(s % SCALE_BYTES for s in packed.stride()[:-1]):
        packed = packed.contiguous()
    k8 = packed[..., :d].view(FP8)
    scale = packed[..., d:].view(torch.float32).squeeze(-1)
    return k8, scale


def dequantize_index_keys(packed: torch.Tensor) -> torch.Tensor:
    """float32 [..., d_I]: k8 * scale (for analysis; the ops score k8 and scale apart)."""
    k8, scale = unpack_index_keys(packed)
    return k8.float() * scale[..., None]
