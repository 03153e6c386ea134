"""Lightning indexer scores in Triton, streamed through a chunked top-k selection.

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])

The score kernel computes [BLOCK_M queries, BLOCK_N keys] tiles: one key tile is
loaded once and multiplied by each indexer head's query tile on the tensor cores,
ReLU and the head weight are applied in registers, and the sum is written as float32
with -inf where the key is hidden (causal, padding). Tiles wholly above the causal
diagonal skip the arithmetic.

Selection streams chunks of query rows so that memory stays bounded (never L x L at
long length): scores for a chunk, only as wide as its last query can see, then an
exact radix select per row (kernels/select_topk.py). The output is ascending without
a sort and ties go to the smaller key index, as the contract says.

With ``STREAM`` on and top_k large enough to sample (DeepSeek's 2048), rows that see
more than 2 x top_k keys take the streamed selection instead (kernels/stream_topk.py):
the score kernel scores a ~1/20 sample of the keys for a per-row bound, then scores
every key again and keeps only those at or above the bound, so the float32 L x L
scores are never written; the top-k runs on ~1.25 x top_k candidates per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_compile.kernels import stream_topk
from dsa_compile.kernels.common import INTERPRET, dot, kernel_configs, key_offsets
from dsa_compile.kernels.select_topk import FLOAT32_LOWEST, _ordered_key, select_topk_rows
from dsa_compile.reference.index_keys import is_packed, unpack_index_keys

# Float32 scores kept per chunk of query rows (bytes); bounds the selection's memory.
CHUNK_BYTES = 1 << 30
# True: rows that see enough keys take the streamed selection (kernels/stream_topk.py).
# Off by default until it has been timed and checked on a GPU (it is tested under the
# Triton interpreter only); set dsa_compile.kernels.indexer_topk.STREAM = True to use it.
STREAM = False
# Score kernel modes: store the scores, store the sampled columns' scores, or collect
# the candidates at or above each row's bound (kernels/stream_topk.py).
WRITE, SAMPLE, COLLECT = 0, 1, 2


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs before the kernel writes."""
    return torch.empty(shape, dtype=dtype, device=device)


def _configs():
    return kernel_configs(
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
         for bm, bn in ((64, 64), (64, 128), (128, 64), (128, 128))
         for w in (4, 8)
         for s in (2, 3)])


@triton.autotune(configs=_configs(), key=["H", "D", "CAUSAL", "HAS_MASK", "KEY_SCALE", "MODE"],
                 restore_value=["CNT"])
@triton.jit
def indexer_scores_kernel(
    QI, KI, W, KM, KS, OUT, BOUND, CNT, SI,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_sb,
    stride_wb, stride_wt, stride_wh,
    stride_mb, stride_ms,
    stride_ob, stride_ot, stride_os,
    rows, width, row0, q_offset, out_width, stride_sample,
    H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KEY_SCALE: tl.constexpr, MODE: tl.constexpr, SAMPLE_W: tl.constexpr, CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """[BLOCK_M rows, BLOCK_N columns] of scores. A column is a key (WRITE, COLLECT) or
    a sampled key (SAMPLE: column v is key (v // SAMPLE_W) * stride_sample + v %
    SAMPLE_W). WRITE / SAMPLE store float32 scores (-inf where hidden) to OUT [B, rows,
    out_width]; COLLECT appends (ordered key, index) of the visible keys at or above
    BOUND[row] to the row's CAP-slot scratch OUT / SI, counting them in CNT."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this chunk
    offs_v = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    if MODE == 1:
        offs_n = (offs_v // SAMPLE_W) * stride_sample + offs_v % SAMPLE_W  # keys
        first = (pid_n * BLOCK_N // SAMPLE_W) * stride_sample + (pid_n * BLOCK_N) % SAMPLE_W
        n_ok = (offs_v < out_width) & (offs_n < width)
    else:
        offs_n = offs_v
        first = pid_n * BLOCK_N
        n_ok = offs_n < width
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < rows
    t = (row0 + offs_m).to(tl.int64)  # absolute row in q_idx
    pos = t + q_offset  # query position: sees keys s <= pos when causal

    visible = m_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        visible &= offs_n[None, :] <= pos[:, None]
    if HAS_MASK:
        km = tl.load(KM + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0)
        visible &= (km != 0)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    live = True
    if CAUSAL:
        # Tiles wholly above the diagonal are all -inf: skip the products.
        live = first <= row0 + pid_m * BLOCK_M + BLOCK_M - 1 + q_offset
    if live:
        kt = tl.load(
            KI + key_offsets(b, stride_kb, offs_n, stride_ks, KEY_SCALE)[None, :]
            + offs_d[:, None],
            mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0,
        )  # [BD, BN]
        q_base = QI + b * stride_qb + t[:, None] * stride_qt + offs_d[None, :]
        w_base = W + b * stride_wb + t * stride_wt
        for h in range(H):
            q = tl.load(q_base + h * stride_qh, mask=m_ok[:, None] & (offs_d[None, :] < D),
                        other=0.0)  # [BM, BD]
            wh = tl.load(w_base + h * stride_wh, mask=m_ok, other=0.0).to(tl.float32)  # [BM]
            s = dot(q, kt, IEEE, UPCAST)
            acc += tl.maximum(s, 0.0) * wh[:, None]
        if KEY_SCALE:
            # FP8 keys carry a positive per-key scale: it commutes with the ReLU.
            ks = tl.load(KS + b * stride_sb + offs_n, mask=n_ok, other=0.0)
            acc *= ks[None, :]
    # + 0.0 turns a -0.0 sum into +0.0, so equal scores compare equal bit for bit.
    scores = tl.where(visible, acc + 0.0, float("-inf"))
    if MODE == 2:
        if live:
            key = _ordered_key(tl.where(scores != scores, FLOAT32_LOWEST, scores))
            row = b * rows + offs_m
            bound = tl.load(BOUND + row, mask=m_ok, other=2147483647)
            cand = visible & (key >= bound[:, None])
            c = cand.to(tl.int32)
            cnt = tl.sum(c, 1)
            base = tl.atomic_add(CNT + row, cnt, mask=m_ok & (cnt > 0))
            slot = base[:, None] + tl.cumsum(c, 1) - 1
            keep = cand & (slot < CAP)
            ptrs = row[:, None] * CAP + slot
            tl.store(OUT + ptrs, key, mask=keep)
            tl.store(SI + ptrs, offs_n[None, :].to(tl.int32) + 0 * slot, mask=keep)
    else:
        o_ptrs = OUT + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_ot
        o_ptrs += offs_v[None, :] * stride_os
        tl.store(o_ptrs, scores, mask=m_ok[:, None] & (offs_v < out_width)[None, :])


def _optional_args(key_mask, k_scale, placeholder):
    """(key mask as the kernels read it, key scales), ``placeholder`` (any tensor, unread
    without HAS_MASK / KEY_SCALE) for the missing ones."""
    km = placeholder
    if key_mask is not None:
        km = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
    return km, (k_scale if k_scale is not None else placeholder)


def _launch_scores(q_idx, k_idx, w, row0, rows, width, q_offset, causal, key_mask, k_scale,
                   out, mode=WRITE, out_width=None, stride_sample=0, sample_w=1,
                   bound=None, cnt=None, si=None, cap=1):
    """One launch of :func:`indexer_scores_kernel` (see its modes)."""
    b, _, h, d = q_idx.shape
    out_width = width if out_width is None else out_width
    km, ks = _optional_args(key_mask, k_scale, out)
    bound = out if bound is None else bound
    if cnt is None:  # unread; the autotuner saves and restores CNT around trials: keep it small
        cnt = torch.empty(1, dtype=torch.int32, device=out.device)
    si = out if si is None else si

    def grid(meta):
        return (triton.cdiv(out_width, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]), b)

    o_strides = (out.stride(0), out.stride(1), out.stride(2)) if mode != COLLECT else (0, 0, 0)
    indexer_scores_kernel[grid](
        q_idx, k_idx, w, km, ks, out, bound, cnt, si,
        q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
        k_idx.stride(0), k_idx.stride(1), ks.stride(0),
        w.stride(0), w.stride(1), w.stride(2),
        km.stride(0) if key_mask is not None else 0, km.stride(1) if key_mask is not None else 0,
        *o_strides,
        rows, width, row0, q_offset, out_width, stride_sample,
        H=h, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        CAUSAL=causal, HAS_MASK=key_mask is not None, IEEE=q_idx.dtype == torch.float32,
        UPCAST=INTERPRET and q_idx.dtype in (torch.bfloat16, torch.float8_e4m3fn),
        KEY_SCALE=k_scale is not None, MODE=mode, SAMPLE_W=sample_w, CAP=cap,
    )


def indexer_scores_chunk(q_idx, k_idx, w, row0, rows, width, q_offset, causal, key_mask,
                         k_scale=None):
    """Float32 scores [B, rows, width] of queries row0 .. row0 + rows over keys 0 .. width.

    -inf where the key is hidden (causal at q_offset, key_mask False). ``k_scale``
    (float32 [B, Lk], FP8 keys only) multiplies each key's score.
    """
    out = _empty((q_idx.shape[0], rows, width), torch.float32, q_idx.device)
    _launch_scores(q_idx, k_idx, w, row0, rows, width, q_offset, causal, key_mask, k_scale, out)
    return out


def stream_topk_chunk(q_idx, k_idx, w, out, row0, rows, width, q_offset, causal, key_mask,
                      k_scale, geometry):
    """Rows row0 .. row0 + rows of ``out`` by the streamed selection (stream_topk.py):
    sampled bound, candidates collected while scoring, exact finish, flagged rows
    recomputed. ``geometry`` = stream_topk.sample_geometry(top_k)."""
    b, _, h, d = q_idx.shape
    top_k = out.shape[-1]
    dev = q_idx.device
    stride, sample_w, sample_k = geometry
    cap = stream_topk.cap_for(top_k)
    buf = stream_topk._buffer
    vwidth = stream_topk.sampled_width(width, stride, sample_w)
    sample = buf((b, rows, vwidth), torch.float32, dev)
    _launch_scores(q_idx, k_idx, w, row0, rows, width, q_offset, causal, key_mask, k_scale,
                   sample, mode=SAMPLE, out_width=vwidth, stride_sample=stride,
                   sample_w=sample_w)
    bound = buf((b * rows,), torch.int32, dev)
    cnt = buf((b * rows,), torch.int32, dev)
    stream_topk.bound_kernel[(rows, b)](
        sample, bound, cnt, sample.stride(1), width, row0, q_offset, stride,
        CAUSAL=causal, SAMPLE_W=sample_w, SAMPLE_K=sample_k, TOPK=top_k)
    del sample
    sk = buf((b * rows, cap), torch.int32, dev)
    si = buf((b * rows, cap), torch.int32, dev)
    _launch_scores(q_idx, k_idx, w, row0, rows, width, q_offset, causal, key_mask, k_scale,
                   sk, mode=COLLECT, bound=bound, cnt=cnt, si=si, cap=cap)
    fail = buf((b * rows,), torch.int32, dev)
    stream_topk.finish_kernel[(rows, b)](
        sk, si, cnt, fail, out, out.stride(0), out.stride(1), row0,
        TOPK=top_k, TOPK_P2=triton.next_power_of_2(top_k), CAP=cap)
    del sk, si
    programs = min(rows, stream_topk.FALLBACK_PROGRAMS)
    fs = buf((b * programs, width), torch.float32, dev)
    km, ks = _optional_args(key_mask, k_scale, fs)
    stream_topk.fallback_kernel[(programs, b)](
        q_idx, k_idx, w, km, ks, fail, fs, out,
        q_idx.stride(0), q_idx.stride(1), q_idx.stride(2),
        k_idx.stride(0), k_idx.stride(1), ks.stride(0),
        w.stride(0), w.stride(1), w.stride(2),
        km.stride(0) if key_mask is not None else 0, km.stride(1) if key_mask is not None else 0,
        fs.stride(0), out.stride(0), out.stride(1),
        rows, width, row0, q_offset,
        H=h, H_P=max(16, triton.next_power_of_2(h)), D=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        CAUSAL=causal, HAS_MASK=key_mask is not None, IEEE=q_idx.dtype == torch.float32,
        UPCAST=INTERPRET and q_idx.dtype in (torch.bfloat16, torch.float8_e4m3fn),
        KEY_SCALE=k_scale is not None, TOPK=top_k, BLOCK_N=stream_topk.FALLBACK_BLOCK_N)
    return fail


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dimension) float8 e4m3 quantisation: x ~= q.float() * scale[..., None].

    Returns (q float8_e4m3fn like x, scale float32 of x.shape[:-1]); scale > 0.
    """
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def indexer_topk(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    top_k: int,
    q_offset: int = 0,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
    fp8: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query's top_k keys by lightning-indexer score (Triton scores + chunked top-k).

    Args:
        q_idx: [B, Lq, H_I, d_I]; k_idx: [B, Lk, d_I]; w: [B, Lq, H_I]; float32/bf16/fp16,
            any strides with the last dimension contiguous. k_idx may also be packed FP8
            keys, uint8 [B, Lk, d_I + 4] (reference/index_keys.py).
        top_k: slots per query (> 0). q_offset: absolute position of query 0.
        causal: query t sees keys s <= q_offset + t. key_mask: optional bool [B, Lk].
        fp8: score with float8 e4m3 q_I and k_I (per-row scales, as DeepSeek's indexer)
            on the FP8 tensor cores (Hopper and later). The selection is then exact for
            the dequantised inputs (:func:`quantize_fp8`), not for the original ones.
        mask: optional bool [B or 1, Lq, Lk], True where query t may select key s (a
            general mask, applied to each chunk's scores before selection).

    Returns:
        int32 [B, Lq, top_k]: selected keys ascending, -1 in unused slots, ties to the
        smaller key index. Memory: one chunk of float32 scores, at most CHUNK_BYTES.
        Hidden keys (-inf) are never selected.
    """
    b, lq = q_idx.shape[:2]
    lk = k_idx.shape[1]
    out = _empty((b, lq, top_k), torch.int32, q_idx.device)
    if out.numel() == 0:
        return out
    if lk == 0:
        return out.fill_(-1)
    for name, t in (("q_idx", q_idx), ("k_idx", k_idx), ("w", w)):
        if t.stride(-1) != 1:
            raise ValueError(f"indexer_topk: {name} must be contiguous in its last dimension")
    k_scale = None
    if is_packed(k_idx):
        # Packed FP8 keys (reference/index_keys.py): e4m3 values are exact in bf16 / fp16
        # / fp32, and the per-key scale multiplies each key's score in the kernel.
        k8, k_scale = unpack_index_keys(k_idx)
        k_idx, k_scale = (k8.contiguous() if fp8 else k8.to(q_idx.dtype)), k_scale.contiguous()
    elif fp8:
        k_idx, k_scale = quantize_fp8(k_idx)
    if fp8:
        # Scales are positive, so ReLU(q . k) * w = ReLU(q8 . k8) * (w * q_scale) * k_scale.
        q_idx, q_scale = quantize_fp8(q_idx)
        w = w.float() * q_scale
    geometry = stream_topk.sample_geometry(top_k) if STREAM and mask is None else None
    # Rows from `first_stream` on see enough keys to be streamed.
    first_stream = lq
    if geometry is not None:
        wide = stream_topk.first_streamed_width(top_k, geometry[0])
        if not causal:
            first_stream = 0 if lk > wide else lq
        else:
            first_stream = min(lq, max(0, wide - q_offset))
    chunk = max(128, CHUNK_BYTES // (4 * b * lk))
    for row0 in range(0, first_stream, chunk):
        rows = min(chunk, first_stream - row0)
        width = max(0, min(lk, q_offset + row0 + rows)) if causal else lk
        if width == 0:
            out[:, row0 : row0 + rows] = -1
            continue
        scores = indexer_scores_chunk(q_idx, k_idx, w, row0, rows, width, q_offset, causal,
                                      key_mask, k_scale)
        if mask is not None:
            scores.masked_fill_(~mask[:, row0 : row0 + rows, :width], float("-inf"))
        select_topk_rows(scores, out, row0, q_offset, causal)
    if first_stream < lq:
        # Per row: sampled scores (4 B per sampled key) + a 2 x top_k scratch of pairs.
        per_row = 4 * b * (lk // 16 + 4 * top_k + 4)
        chunk = max(128, CHUNK_BYTES // per_row)
        for row0 in range(first_stream, lq, chunk):
            rows = min(chunk, lq - row0)
            width = min(lk, q_offset + row0 + rows) if causal else lk
            stream_topk_chunk(q_idx, k_idx, w, out, row0, rows, width, q_offset, causal,
                              key_mask, k_scale, geometry)
    return out
