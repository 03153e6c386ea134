"""Triton kernels vs the reference (CPU interpreter in CI; the same cases on a GPU).

Outputs are poisoned (NaN, or -7 for indices) before the kernels write them, so an
unwritten element fails. Shapes are tiny on CPU (the interpreter is slow); the
``gpu``-marked cases add real lengths such as 1025.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from dsa_compile import kernels, reference
from dsa_compile.metrics import rel_err

# The package re-exports functions under the modules' names: fetch the modules themselves.
indexer_module = importlib.import_module("dsa_compile.kernels.indexer_topk")
sparse_module = importlib.import_module("dsa_compile.kernels.sparse_attention")
select_module = importlib.import_module("dsa_compile.kernels.select_topk")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(sparse_module, "_empty", poisoned)
    monkeypatch.setattr(indexer_module, "_empty", poisoned)


def random_indices(b, g, lq, lk, top_k, *, missing=0.25, sort=True):
    """[B, G, Lq, top_k] int32: distinct keys per row, some slots -1, a few rows all -1."""
    rows = []
    for _ in range(b * g * lq):
        n = min(top_k, lk)
        row = torch.randperm(lk)[:n]
        row = torch.where(torch.rand(n) < missing, -1, row)
        if sort:
            row = torch.sort(torch.where(row < 0, lk, row)).values
            row = torch.where(row == lk, -1, row)
        rows.append(torch.cat([row, row.new_full((top_k - n,), -1)]))
    idx = torch.stack(rows).view(b, g, lq, top_k).to(torch.int32)
    idx[0, :, 0] = -1  # a query with no valid key
    return idx


# (B, Hq, Hkv, Lq, Lk, D, Dv, top_k, G, dtype, softcap)
SPARSE_CASES = {
    "decode-mqa-d64": (1, 4, 1, 1, 63, 64, 64, 16, 1, torch.float32, 0.0),
    "gqa4-d64-fp32": (2, 8, 2, 7, 63, 64, 64, 40, 1, torch.float32, 0.0),
    "mha-per-head-idx": (1, 4, 4, 5, 111, 64, 64, 24, 4, torch.float32, 0.0),
    "gqa8-d128-bf16": (1, 8, 1, 6, 111, 128, 128, 48, 1, torch.bfloat16, 0.0),
    "gqa4-softcap-bf16": (2, 8, 2, 5, 63, 64, 64, 32, 2, torch.bfloat16, 5.0),
    "topk-gt-keys-fp16": (1, 4, 1, 3, 20, 64, 32, 33, 1, torch.float16, 0.0),
    "one-head-d128-fp32": (1, 1, 1, 4, 111, 128, 128, 40, 1, torch.float32, 0.0),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES), ids=list(SPARSE_CASES))
def test_sparse_attention_matches_reference(case):
    b, hq, hkv, lq, lk, d, dv, top_k, g, dtype, softcap = SPARSE_CASES[case]
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, lk, dv, device=DEVICE).to(dtype)
    idx = random_indices(b, g, lq, lk, top_k, sort=case != "mha-per-head-idx").to(DEVICE)
    scale = d ** -0.5 * 2
    out, lse = kernels.sparse_attention(q, k, v, idx, scale, softcap)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, scale, softcap)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=TOL[dtype] * 4, rtol=0)


def test_sparse_attention_strided_inputs_and_int64_indices():
    b, hq, hkv, lq, lk, d = 1, 4, 2, 5, 63, 64
    q = torch.randn(b, lq, hq, d, device=DEVICE).transpose(1, 2)  # [B, Hq, Lq, D], strided
    kv = torch.randn(b, lk, 2, hkv, d, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    idx = random_indices(b, 1, lq, lk, 16).long().to(DEVICE)
    out, lse = kernels.sparse_attention(q, k, v, idx, 0.125)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, 0.125)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def make_indexer_inputs(b, lq, lk, h, d, dtype):
    q_idx = torch.randn(b, lq, h, d, device=DEVICE).to(dtype)
    k_idx = torch.randn(b, lk, d, device=DEVICE).to(dtype)
    w = (torch.rand(b, lq, h, device=DEVICE) + 0.1).to(dtype)
    return q_idx, k_idx, w


# (B, Lq, Lk, H_I, d_I, top_k, q_offset, causal, with key_mask)
INDEXER_CASES = {
    "decode": (1, 1, 63, 4, 64, 16, 62, True, False),
    "chunk-prefill-offset": (1, 20, 63, 1, 64, 8, 43, True, False),
    "square-topk-gt-visible": (1, 63, 63, 4, 32, 40, 0, True, False),
    "batch-key-mask": (2, 17, 45, 4, 64, 12, 28, True, True),
    "non-causal-d128": (1, 9, 111, 2, 128, 32, 0, False, False),
}


def _key_mask(b, lk):
    mask = torch.rand(b, lk, device=DEVICE) > 0.3
    mask[-1] = False  # a batch row with no key at all: every query gets only -1
    return mask


@pytest.mark.parametrize("case", list(INDEXER_CASES), ids=list(INDEXER_CASES))
def test_indexer_topk_exact_fp32(case):
    b, lq, lk, h, d, top_k, q_offset, causal, masked = INDEXER_CASES[case]
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, torch.float32)
    key_mask = _key_mask(b, lk) if masked else None
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    assert got.dtype == torch.int32 and got.shape == (b, lq, top_k)
    assert torch.equal(got, ref)


@pytest.mark.parametrize(("case", "dtype"), [("chunk-prefill-offset", torch.bfloat16),
                                             ("batch-key-mask", torch.bfloat16),
                                             ("decode", torch.float16)])
def test_indexer_topk_low_precision_selects_top_scores(case, dtype):
    b, lq, lk, h, d, top_k, q_offset, causal, masked = INDEXER_CASES[case]
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, dtype)
    key_mask = _key_mask(b, lk) if masked else None
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    scores = reference.indexer_scores(q_idx, k_idx, w, q_offset, causal, key_mask)
    # Same number of valid slots, -1 only at the end, and rounding-level score gaps only.
    assert torch.equal(got >= 0, ref >= 0)
    pick = got.clamp_min(0).long()
    got_s = torch.where(got >= 0, torch.gather(scores, -1, pick), 0).sort(-1).values
    ref_s = torch.where(ref >= 0, torch.gather(scores, -1, ref.clamp_min(0).long()), 0)
    ref_s = ref_s.sort(-1).values
    assert torch.isfinite(got_s).all()
    atol = 2e-2 * float(scores[scores.isfinite()].abs().max())
    torch.testing.assert_close(got_s, ref_s, atol=atol, rtol=0)


def test_indexer_topk_ties_go_to_smaller_index():
    # Integer-valued inputs make many scores exactly equal (and several exactly 0).
    b, lq, lk, h, d, top_k = 1, 6, 40, 2, 16, 10
    q_idx = torch.randint(-1, 2, (b, lq, h, d), device=DEVICE).float()
    k_idx = torch.randint(-1, 2, (b, lk // 4, d), device=DEVICE).float().repeat(1, 4, 1)
    w = torch.ones(b, lq, h, device=DEVICE)
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, 30, True, None)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, 30, True, None)
    assert torch.equal(got, ref)


def test_indexer_topk_nan_scores_select_like_the_reference():
    # A NaN head weight makes a query's every score NaN, a NaN key one column NaN.
    b, lq, lk, h, d, top_k = 1, 9, 40, 2, 16, 12
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, torch.float32)
    w[0, 2, 1] = float("nan")
    k_idx[0, 5, 3] = float("nan")
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, 30, True, None)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, 30, True, None)
    assert torch.equal(got, ref)
    assert (got >= 0).all()  # every query sees >= top_k keys, NaN or not


def test_indexer_topk_chunks_and_strided_inputs(monkeypatch):
    # A tiny chunk budget forces several query chunks of different widths.
    monkeypatch.setattr(indexer_module, "CHUNK_BYTES", 4 * 40)
    b, lq, lk, h, d, top_k = 1, 150, 150, 2, 32, 24
    q_idx = torch.randn(b, h, lq, d, device=DEVICE).transpose(1, 2)  # strided view
    k_idx = torch.randn(b, lk, d, device=DEVICE)
    w = torch.rand(b, lq, h + 3, device=DEVICE)[..., :h]  # padded rows
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, 0, True, None)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, 0, True, None)
    assert torch.equal(got, ref)


stream_module = importlib.import_module("dsa_compile.kernels.stream_topk")

# (B, Lq, Lk, H_I, d_I, top_k, q_offset, causal, inputs): the streamed selection with a
# tiny sample geometry (pieces of 4 keys every 20 for top_k 37), so rows of > 80 keys stream.
STREAM_CASES = {
    "decode-rows": (1, 40, 300, 2, 32, 37, 260, True, "randn"),
    "batch-key-mask-d64": (2, 30, 300, 3, 64, 37, 270, True, "key-mask"),
    "integer-ties": (1, 20, 300, 2, 16, 37, 280, True, "integers"),
    "nan-weight-and-key": (1, 20, 300, 2, 16, 37, 280, True, "nan"),
    "non-causal-d128": (1, 9, 300, 2, 128, 37, 0, False, "randn"),
    "prefill-from-0": (1, 150, 150, 2, 32, 37, 0, True, "randn"),
    "topk-odd-fp8": (1, 20, 300, 2, 32, 45, 280, True, "fp8"),
}


def _stream_inputs(b, lq, lk, h, d, kind):
    g = torch.Generator().manual_seed(3)
    if kind == "integers":  # many exactly equal scores: ties cut at the k-th place
        q_idx = torch.randint(-1, 2, (b, lq, h, d), generator=g).float()
        k_idx = torch.randint(-1, 2, (b, lk // 4, d), generator=g).float().repeat(1, 4, 1)
        w = torch.ones(b, lq, h)
    else:
        q_idx = torch.randn(b, lq, h, d, generator=g)
        k_idx = torch.randn(b, lk, d, generator=g)
        w = torch.rand(b, lq, h, generator=g) + 0.1
    if kind == "nan":
        w[0, 2, 1] = float("nan")
        k_idx[0, 5, 3] = float("nan")
    key_mask = torch.rand(b, lk, generator=g) > 0.3 if kind == "key-mask" else None
    if key_mask is not None:
        key_mask = key_mask.to(DEVICE)
    return q_idx.to(DEVICE), k_idx.to(DEVICE), w.to(DEVICE), key_mask


def _watch_stream(monkeypatch):
    """Patch in the tiny sample geometry; returns the list of per-chunk fallback flags."""
    monkeypatch.setattr(indexer_module, "STREAM", True)
    monkeypatch.setattr(stream_module, "SAMPLE", 4)
    monkeypatch.setattr(stream_module, "SAMPLE_RANK", 8)
    flags = []
    chunk = indexer_module.stream_topk_chunk

    def watched(*args, **kwargs):
        flags.append(chunk(*args, **kwargs).clone())
        return flags[-1]

    monkeypatch.setattr(indexer_module, "stream_topk_chunk", watched)

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -5
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(stream_module, "_buffer", poisoned)
    return flags


@pytest.mark.parametrize("case", list(STREAM_CASES), ids=list(STREAM_CASES))
def test_indexer_topk_streamed_matches_reference(monkeypatch, case):
    b, lq, lk, h, d, top_k, q_offset, causal, kind = STREAM_CASES[case]
    flags = _watch_stream(monkeypatch)
    q_idx, k_idx, w, key_mask = _stream_inputs(b, lq, lk, h, d, kind)
    fp8 = kind == "fp8"
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask, fp8=fp8)
    if fp8:  # exact for the dequantised inputs
        q8, q_scale = indexer_module.quantize_fp8(q_idx)
        k8, k_scale = indexer_module.quantize_fp8(k_idx)
        q_idx, k_idx = q8.float() * q_scale[..., None], k8.float() * k_scale[..., None]
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    assert torch.equal(got, ref)
    fell = torch.cat(flags)
    assert fell.numel() > 0 and ((fell == 0) | (fell == 1)).all()  # every row decided
    if kind == "integers":
        assert fell.any()  # cut ties cannot be ordered in the scratch: exact fallback
    else:
        assert (fell == 0).any()  # the candidate path itself served rows


@pytest.mark.parametrize("force", ["bound-too-low", "bound-too-high"])
def test_indexer_topk_streamed_fallback_is_exact(monkeypatch, force):
    """Every row's candidates overflow the scratch (CAP = top_k) or miss keys (a sample
    rank far too high... made by a bound above every score): all rows fall back."""
    flags = _watch_stream(monkeypatch)
    if force == "bound-too-low":
        monkeypatch.setattr(stream_module, "cap_for", lambda top_k: top_k)
    else:
        monkeypatch.setattr(stream_module, "sample_geometry",
                            lambda top_k: (20, 4, 1))  # rank ~1-3 of the sample: too high
    b, lq, lk, h, d, top_k, q_offset, causal, kind = STREAM_CASES["batch-key-mask-d64"]
    q_idx, k_idx, w, key_mask = _stream_inputs(b, lq, lk, h, d, kind)
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    assert torch.equal(got, ref)
    assert torch.cat(flags).float().mean() > 0.9


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_indexer_topk_streamed_real_geometry(monkeypatch, dtype):
    """top_k 2048 with the product's sample geometry: rows past 20480 keys stream."""
    b, lq, lk, h, d, top_k = 1, 700, 24577, 8, 128, 2048
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, dtype)
    monkeypatch.setattr(indexer_module, "STREAM", True)
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, lk - lq, True, None)
    monkeypatch.setattr(indexer_module, "STREAM", False)
    stored = kernels.indexer_topk(q_idx, k_idx, w, top_k, lk - lq, True, None)
    ref = reference.indexer_topk(q_idx.float(), k_idx.float(), w.float(), top_k, lk - lq,
                                 True, None)
    assert torch.equal(got >= 0, ref >= 0)
    # Rounding-level near-ties only (bf16 tensor-core products vs the fp32 reference).
    assert (got != ref).float().mean() < (1e-3 if dtype == torch.float32 else 3e-2)
    assert (got != stored).float().mean() < 1e-3


def _select_case(name):
    """[B, rows, width] float32 scores for the selection kernel, with -inf hidden keys."""
    g = torch.Generator().manual_seed(7)
    if name == "random":
        s = torch.randn(2, 9, 300, generator=g)
    elif name == "integer-ties":
        s = torch.randint(-3, 4, (2, 7, 200), generator=g).float()
    elif name == "deep-digits":  # keys differ only in the last mantissa bits
        s = 1.0 + torch.randint(0, 5, (1, 5, 150), generator=g).float() * 1.2e-7
    elif name == "mostly-hidden":
        s = torch.randn(1, 6, 120, generator=g)
        s[:, :, ::3] = float("-inf")
    elif name == "with-nan":  # NaN ranks as the lowest finite score; one row is all NaN
        s = torch.randn(1, 6, 120, generator=g)
        s[:, :, ::4] = float("nan")
        s[:, :, 1::6] = float("-inf")
        s[:, 2] = float("nan")
    else:  # "zeros-and-inf": +0 ties everywhere, one +inf
        s = torch.zeros(1, 3, 100)
        s[0, 0, 5] = float("inf")
    return s.to(DEVICE)


@pytest.mark.parametrize("path", ["plain", "sampled"])
@pytest.mark.parametrize("name", ["random", "integer-ties", "deep-digits", "mostly-hidden",
                                  "with-nan", "zeros-and-inf"])
@pytest.mark.parametrize(("top_k", "causal", "q_offset", "row0"),
                         [(37, False, 0, 0), (50, True, 90, 3), (90, True, 0, 0),
                          (40, True, 250, 0)])
def test_select_topk_kernel_matches_reference(monkeypatch, path, name, top_k, causal,
                                              q_offset, row0):
    if path == "sampled":
        # Tiny sample pieces so that these short rows take the sample -> scratch path
        # (on rows where the sample's bound fails, the kernel falls back to the plain path).
        monkeypatch.setattr(select_module, "SAMPLE", 4)
        monkeypatch.setattr(select_module, "SAMPLE_RANK", 8)
    else:
        monkeypatch.setattr(select_module, "SAMPLE", 1 << 20)
    scores = _select_case(name)
    b, rows, width = scores.shape
    if causal:  # the kernel reads each row only up to its query position
        pos = torch.arange(row0, row0 + rows, device=DEVICE) + q_offset
        hidden = torch.arange(width, device=DEVICE)[None, None] > pos[None, :, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    out = torch.full((b, row0 + rows + 2, top_k), -7, dtype=torch.int32, device=DEVICE)
    scratch = []

    def watched(shape, device):
        scratch.append(torch.full(shape, -5, dtype=torch.int32, device=device))
        return scratch[-1]

    monkeypatch.setattr(select_module, "_scratch", watched)
    select_module.select_topk_rows(scores, out, row0, q_offset, causal)
    assert torch.equal(out[:, row0 : row0 + rows], reference.select_topk(scores, top_k))
    assert (out[:, :row0] == -7).all() and (out[:, row0 + rows :] == -7).all()
    if path == "sampled" and name == "random" and (not causal or q_offset >= 250):
        # Rows long enough to sample: the sample's bound must have held on some of them.
        assert scratch and (scratch[1] != -5).any()
    if path == "plain":
        assert not scratch


@pytest.mark.parametrize("masked", [False, True])
def test_indexer_topk_fp8_is_exact_for_dequantised_inputs(masked):
    b, lq, lk, h, d, top_k = 2, 40, 70, 3, 32, 16
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, torch.float32)
    key_mask = _key_mask(b, lk) if masked else None
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, 30, True, key_mask, fp8=True)
    q8, q_scale = indexer_module.quantize_fp8(q_idx)
    k8, k_scale = indexer_module.quantize_fp8(k_idx)
    assert q8.dtype == torch.float8_e4m3fn and (q_scale > 0).all()
    ref = reference.indexer_topk(q8.float() * q_scale[..., None], k8.float() * k_scale[..., None],
                                 w, top_k, 30, True, key_mask)
    assert torch.equal(got >= 0, ref >= 0)
    # Exact on CPU; the GPU's FP8 dot may round a near-tie the other way.
    assert (got != ref).float().mean() <= (0.0 if DEVICE == "cpu" else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_odd_length_1025(dtype):
    b, hq, hkv, length, d, top_k = 2, 8, 2, 1025, 128, 256
    q_idx, k_idx, w = make_indexer_inputs(b, length, length, 4, 64, dtype)
    key_mask = torch.rand(b, length, device=DEVICE) > 0.1
    sel = kernels.indexer_topk(q_idx, k_idx, w, top_k, 0, True, key_mask)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, 0, True, key_mask)
    assert torch.equal(sel >= 0, ref >= 0)
    if dtype == torch.float32:
        assert (sel != ref).float().mean() < 1e-3  # only rounding-level near-ties may swap
    q = torch.randn(b, hq, length, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, length, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, length, d, device=DEVICE).to(dtype)
    out, lse = kernels.sparse_attention(q, k, v, sel.unsqueeze(1), d ** -0.5, 0.0)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, sel.unsqueeze(1), d ** -0.5, 0.0)
    assert not out.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("case", ["gqa4-d64-fp32", "mha-per-head-idx", "gqa4-softcap-bf16"])
def test_sparse_attention_slot_bias_matches_reference(case):
    """A per-slot additive bias (a carried additive mask, gathered at the selection)."""
    b, hq, hkv, lq, lk, d, dv, top_k, g, dtype, softcap = SPARSE_CASES[case]
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, lk, dv, device=DEVICE).to(dtype)
    idx = random_indices(b, g, lq, lk, top_k).to(DEVICE)
    bias = torch.randn(idx.shape, device=DEVICE) * 3
    out, lse = kernels.sparse_attention(q, k, v, idx, d ** -0.5, softcap, bias)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, d ** -0.5, softcap, bias)
    plain, _ = reference.sparse_attention(q, k, v, idx, d ** -0.5, softcap)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(plain, ref_out) > 10 * TOL[dtype]  # the bias really moved the result
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


@pytest.mark.parametrize("case", ["chunk-prefill-offset", "batch-key-mask", "non-causal-d128"])
def test_indexer_topk_general_mask_matches_reference(case):
    b, lq, lk, h, d, top_k, q_offset, causal, masked = INDEXER_CASES[case]
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, h, d, torch.float32)
    key_mask = _key_mask(b, lk) if masked else None
    mask = torch.rand(b, lq, lk, device=DEVICE) > 0.5
    got = kernels.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask, mask=mask)
    ref = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask, mask)
    assert torch.equal(got, ref)
    picked = got.clamp_min(0).long()
    allowed = torch.gather(mask, 2, picked) | (got < 0)
    assert allowed.all()  # a masked key is never selected


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_attention_with_carried_mask_and_bias(dtype):
    """dsa.attention on CUDA (Triton indexer with a general mask, sparse kernel with the
    gathered bias) against the CPU reference of the same op."""
    b, hq, hkv, lq, lk, d = 2, 8, 2, 300, 1025, 64
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE).to(dtype)
               for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    q_idx, k_idx, w = make_indexer_inputs(b, lq, lk, 2, 32, dtype)
    mask = torch.rand(1, lq, lk, device=DEVICE) > 0.3
    bias = torch.randn(b, lq, lk, device=DEVICE).masked_fill(
        torch.rand(b, lq, lk, device=DEVICE) > 0.8, -1e9)
    args = (q, k, v, q_idx, k_idx, w, 128, d ** -0.5, True, lk - lq)
    got = torch.ops.dsa.attention(*args, None, 0.0, 0, mask=mask, bias=bias)
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    ref = torch.ops.dsa.attention(*cpu, None, 0.0, 0, mask=mask.cpu(), bias=bias.cpu())
    assert not got.isnan().any()
    assert rel_err(got.cpu().float(), ref.float()) < (TOL[dtype] if dtype == torch.float32
                                                      else 3e-2)
