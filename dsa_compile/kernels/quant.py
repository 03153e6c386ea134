"""FP8 (e4m3) quantisation shared by the kernels' FP8 options."""

from __future__ import annotations

import torch


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dimension) float8 e4m3 quantisation: x ~= q.float() * scale[..., None].

    Returns (q float8_e4m3fn of x's shape, scale float32 of x.shape[:-1]); scale > 0,
    so it commutes with ReLU and max.
    """
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values that the FP8 kernels compute with: q.float() * scale[..., None]."""
    return q.float() * scale[..., None]
