"""Argument checks shared by the real and fake implementations of the DSA ops.

Every check names the argument and says what to do. Only metadata is inspected here
(no device sync), so the checks also run at trace time on fake tensors.
"""

from __future__ import annotations

import torch

from dsa_compile.reference.index_keys import check_packable, is_packed, packed_width

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        fail(op, msg)


def fail(op: str, msg: str) -> None:
    """Raise the ops' ValueError. The checks below test first and only then build their
    messages: a decode step runs them once per layer, and formatting a few dozen unused
    f-strings cost more than the step's arithmetic on a small model."""
    raise ValueError(f"dsa.{op}: {msg}")


def check_tensor(
    op: str, name: str, t: torch.Tensor, rank: int, dtypes=FLOAT_DTYPES, inner_contiguous=True
) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != rank:
        fail(op, f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        fail(op, f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]} "
             f"(cast it with .to(...))")
    if inner_contiguous and t.numel() > 0:
        if t.stride(-1) != 1:
            fail(op, f"{name} must be contiguous in its last dimension (stride {t.stride()}); "
                 f"call .contiguous() first")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}; "
                 f"move them to one device")


def check_same_device_groups(op: str, *groups: dict[str, torch.Tensor | None]) -> None:
    """Every tensor of every group on one device, e.g. ``({"q": q, "k": k, "v": v},
    {"q_idx": q_idx, "k_idx": k_idx, "w": w})``: each group is checked as
    :func:`check_same_device`, then the groups against the first one, naming both."""
    firsts = []
    for group in groups:
        check_same_device(op, **group)
        names = [n for n, t in group.items() if t is not None]
        firsts.append((", ".join(names), group[names[0]].device))
    first_names, first_device = firsts[0]
    for names, device in firsts[1:]:
        if device != first_device:
            fail(op, f"{names} are on {device} but {first_names} are on {first_device}; "
                 f"move them to one device")


def check_indexer_args(op, q_idx, k_idx, w, top_k, q_offset, key_mask) -> None:
    check_tensor(op, "q_idx", q_idx, 4)
    # uint8: packed FP8 index keys [B, Lk, d_I + 4] (reference/index_keys.py).
    check_tensor(op, "k_idx", k_idx, 3, dtypes=(*FLOAT_DTYPES, torch.uint8))
    check_tensor(op, "w", w, 3)
    check_same_device(op, q_idx=q_idx, k_idx=k_idx, w=w, key_mask=key_mask)
    b, lq, h, d = q_idx.shape
    packed = is_packed(k_idx)
    width = packed_width(d) if packed else d
    if not (k_idx.shape[0] == b and k_idx.shape[2] == width):
        fail(op, f"k_idx must be [B={b}, Lk, {'d_I + 4=' if packed else 'd_I='}{width}] to match "
             f"q_idx {tuple(q_idx.shape)}{' (packed FP8 keys)' if packed else ''}, "
             f"got {tuple(k_idx.shape)}")
    if packed:
        check_packable(d)
    if tuple(w.shape) != (b, lq, h):
        fail(op, f"w must be [B, Lq, H_I] = {(b, lq, h)} to match q_idx, got {tuple(w.shape)}")
    if top_k is not None:
        if not (isinstance(top_k, int) or isinstance(top_k, torch.SymInt)):
            fail(op, f"top_k must be an int, got {type(top_k).__name__}")
        if top_k <= 0:
            fail(op, f"top_k must be > 0, got {top_k}")
    if not isinstance(q_offset, (int, torch.SymInt)):
        fail(op, f"q_offset must be an int, got {type(q_offset).__name__}")
    if key_mask is not None:
        check_tensor(op, "key_mask", key_mask, 2, dtypes=(torch.bool,), inner_contiguous=False)
        if tuple(key_mask.shape) != (b, k_idx.shape[1]):
            fail(op, f"key_mask must be bool [B, Lk] = {(b, k_idx.shape[1])}, "
                 f"got {tuple(key_mask.shape)}")


def check_attention_args(op, q, k, v, softcap) -> None:
    check_tensor(op, "q", q, 4)
    check_tensor(op, "k", k, 4)
    check_tensor(op, "v", v, 4)
    check_same_device(op, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        fail(op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, _, d = q.shape
    if not (k.shape[0] == b and v.shape[0] == b):
        fail(op, f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    hkv = k.shape[1]
    if v.shape[1] != hkv:
        fail(op, f"k has {hkv} heads but v has {v.shape[1]}")
    if not (hkv > 0 and hq % hkv == 0):
        fail(op, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if k.shape[3] != d:
        fail(op, f"k head dim {k.shape[3]} != q head dim {d}")
    if v.shape[2] != k.shape[2]:
        fail(op, f"k has {k.shape[2]} keys but v has {v.shape[2]}")
    if softcap < 0:
        fail(op, f"softcap must be >= 0, got {softcap}")


def check_indices(op, indices, q, k) -> None:
    check_tensor(op, "indices", indices, 4, dtypes=INDEX_DTYPES)
    check_same_device(op, q=q, indices=indices)
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    g = indices.shape[1]
    if not (indices.shape[0] == b and g in (1, hkv) and indices.shape[2] == lq):
        fail(op, f"indices must be [B={b}, G, Lq={lq}, top_k] with G = 1 or Hkv = {hkv}, "
             f"got {tuple(indices.shape)}")
    if indices.shape[3] <= 0:
        fail(op, "indices must have top_k > 0 slots")


def check_indices_range(op, indices, lk) -> None:
    """Data-dependent range check (syncs on GPU): -1 <= indices < Lk."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if not (lo >= -1 and hi < lk):
        fail(op, f"indices out of range: found values in [{lo}, {hi}], "
             f"allowed -1 (unused) .. {lk - 1}")


def check_general_masks(op, q, lk, mask, bias) -> None:
    """``mask`` bool and ``bias`` float, each [B or 1, Lq, Lk] on q's device, or None."""
    b, lq = q.shape[0], q.shape[2]
    for name, t, dtypes in (("mask", mask, (torch.bool,)), ("bias", bias, FLOAT_DTYPES)):
        if t is None:
            continue
        check_tensor(op, name, t, 3, dtypes=dtypes, inner_contiguous=False)
        check_same_device(op, q=q, **{name: t})
        if not (t.shape[0] in (1, b) and tuple(t.shape[1:]) == (lq, lk)):
            fail(op, f"{name} must be [B or 1, Lq, Lk] = [{b} or 1, {lq}, {lk}] (one pattern "
                 f"for all heads), got {tuple(t.shape)}")
