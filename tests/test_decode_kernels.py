"""Decode kernels (dsa_compile/kernels/decode.py) vs the reference.

CPU runs them in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
small there; cases marked ``gpu`` add long rows (1025, 4097 keys) on a CUDA machine.
Outputs and scratch are poisoned (NaN, or -7 for integers) before the kernels write.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from dsa_compile import reference
from dsa_compile.metrics import rel_err

decode = importlib.import_module("dsa_compile.kernels.decode")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
GPU = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(decode, "_empty", poisoned)


def lengths(*values):
    """Key counts as pytest params: > 300 keys only on the GPU (the interpreter is slow)."""
    return [pytest.param(n, marks=GPU) if n > 300 else n for n in values]


def positions(b, lq, lk):
    """q_pos [B, Lq]: consecutive queries ending at different places per sequence."""
    last = torch.tensor([lk - 1 - (lk // 3) * i for i in range(b)]).clamp_min(lq - 1)
    return (last[:, None] - lq + 1 + torch.arange(lq)).to(torch.int32)


def left_padding(b, lk):
    """bool [B, Lk]: sequence i > 0 starts with i * Lk // 5 padding keys."""
    mask = torch.ones(b, lk, dtype=torch.bool)
    for i in range(1, b):
        mask[i, : i * lk // 5] = False
    return mask


def ref_scores(q_idx, k_idx, w, q_pos, key_mask):
    """reference.indexer_scores per sequence (its queries sit at q_pos[b, 0] + t)."""
    rows = []
    for i in range(q_idx.shape[0]):
        km = None if key_mask is None else key_mask[i : i + 1]
        rows.append(reference.indexer_scores(q_idx[i : i + 1], k_idx[i : i + 1], w[i : i + 1],
                                             int(q_pos[i, 0]), True, km))
    return torch.cat(rows)


def ref_indices(q_idx, k_idx, w, top_k, q_pos, key_mask):
    rows = []
    for i in range(q_idx.shape[0]):
        km = None if key_mask is None else key_mask[i : i + 1]
        rows.append(reference.indexer_topk(q_idx[i : i + 1], k_idx[i : i + 1], w[i : i + 1],
                                           top_k, int(q_pos[i, 0]), True, km))
    return torch.cat(rows)


# --- 1. index scores ---------------------------------------------------------------------


@pytest.mark.parametrize("lk", lengths(1, 63, 1025, 4097))
@pytest.mark.parametrize("lq", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "left-pad"])
def test_decode_scores_match_reference(lq, lk, masked):
    b, h, d = 3, 4, 32
    q_idx = torch.randn(b, lq, h, d, device=DEVICE)
    k_idx = torch.randn(b, lk, d, device=DEVICE)
    w = torch.rand(b, lq, h, device=DEVICE) - 0.2  # some negative head weights
    q_pos = positions(b, lq, lk).to(DEVICE)
    key_mask = left_padding(b, lk).to(DEVICE) if masked else None
    got = decode.decode_index_scores(q_idx, k_idx, w, q_pos, key_mask)
    ref = ref_scores(q_idx, k_idx, w, q_pos, key_mask)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and not got.isnan().any()
    fin = ref.isfinite()
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)


def test_decode_scores_bf16_d128_eight_heads():
    b, lq, lk, h, d = 2, 2, 100, 8, 128
    q_idx = torch.randn(b, lq, h, d, device=DEVICE).bfloat16()
    k_idx = torch.randn(b, lk, d, device=DEVICE).bfloat16()
    w = torch.rand(b, lq, h, device=DEVICE).bfloat16()
    q_pos = positions(b, lq, lk).to(DEVICE)
    got = decode.decode_index_scores(q_idx, k_idx, w, q_pos)
    ref = ref_scores(q_idx, k_idx, w, q_pos, None)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = ref.isfinite()
    assert rel_err(got[fin], ref[fin]) < 1e-3


# --- 2. top-k ------------------------------------------------------------------------------


def score_rows(name, rows, width):
    g = torch.Generator().manual_seed(3)
    if name == "random":
        s = torch.randn(rows, width, generator=g)
    elif name == "integer-ties":
        s = torch.randint(-3, 4, (rows, width), generator=g).float()
    elif name == "all-equal":  # every key in one bin at every radix level
        s = torch.full((rows, width), 0.75)
    elif name == "deep-digits":  # keys differ only in the last mantissa bits
        s = 1.0 + torch.randint(0, 5, (rows, width), generator=g).float() * 1.2e-7
    elif name == "zeros-signed-inf":  # +0 / -0 ties, +inf, -inf
        s = torch.zeros(rows, width)
        s[:, 1::2] = -0.0
        s[0, width // 2] = float("inf")
        s[:, ::3] = float("-inf")
    elif name == "nan":
        s = torch.randn(rows, width, generator=g)
        s[:, ::7] = float("nan")
    else:  # "mostly-hidden"
        s = torch.randn(rows, width, generator=g)
        s[:, torch.rand(width, generator=g) < 0.9] = float("-inf")
    return s.to(DEVICE)


TOPK_NAMES = ["random", "integer-ties", "all-equal", "deep-digits", "zeros-signed-inf", "nan",
              "mostly-hidden"]


@pytest.mark.parametrize("width", lengths(1, 63, 257, 1025, 4097))
@pytest.mark.parametrize("name", TOPK_NAMES)
def test_decode_topk_matches_reference(name, width):
    scores = score_rows(name, 3, width)
    seg = 64 if DEVICE == "cpu" else 256  # several segments per row on both
    for top_k in sorted({1, 16, max(1, width // 3), width + 5}):
        scratch = decode.TopkScratch.allocate(3, width, DEVICE, seg=seg)
        got = decode.decode_topk(scores, top_k, scratch=scratch)
        assert torch.equal(got, reference.select_topk(scores, top_k)), top_k


@pytest.mark.parametrize("width", lengths(200, 4097))
def test_decode_topk_row_len_and_batched_rows(width):
    # [B, Lq, Lk] rows with per-row lengths; keys at or past row_len are never selected
    # (their scores are garbage here, as the cache past a sequence's end would be).
    scores = score_rows("integer-ties", 6, width).view(2, 3, width)
    row_len = torch.tensor([width, 1, 0, width // 2, width - 1, 37], dtype=torch.int32,
                           device=DEVICE)
    top_k = 40
    got = decode.decode_topk(scores, top_k, row_len=row_len)
    cut = torch.arange(width, device=DEVICE)[None] >= row_len[:, None].long()
    ref = reference.select_topk(scores.view(6, width).masked_fill(cut, float("-inf")), top_k)
    assert torch.equal(got.view(6, top_k), ref)


def test_decode_topk_massive_ties_across_segments(monkeypatch):
    # All-equal rows: the k-th key's bin holds the whole row at every radix level. There
    # is no candidate buffer to overflow (every level is a multi-program histogram; a
    # tied block adds its count with one atomic) and the ties are taken by position
    # across segments (smallest indices). The scratch is reused: the last kernel must
    # leave the histograms zeroed.
    scores = torch.full((2, 300), -1.5, device=DEVICE)
    scores[1, 17] = 2.0
    scratch = decode.TopkScratch.allocate(2, 300, DEVICE, seg=64 if DEVICE == "cpu" else 32)
    for top_k in (1, 5, 100, 299, 300, 1):
        got = decode.decode_topk(scores, top_k, scratch=scratch, hist_ready=False)
        assert torch.equal(got, reference.select_topk(scores, top_k))
        assert not scratch.hist.any()


# --- 3. split-K sparse attention ------------------------------------------------------------


def random_indices(b, g, lq, lk, top_k, missing=0.25):
    """[B, G, Lq, top_k] int32: distinct keys per row in any order, some -1 slots, and
    query 0 of sequence 0 with no valid key at all."""
    rows = []
    for _ in range(b * g * lq):
        n = min(top_k, lk)
        row = torch.randperm(lk)[:n]
        row = torch.where(torch.rand(n) < missing, -1, row)
        rows.append(torch.cat([row, row.new_full((top_k - n,), -1)]))
    idx = torch.stack(rows).view(b, g, lq, top_k).to(torch.int32)
    idx[0, :, 0] = -1
    return idx


# (B, Hq, Hkv, Lq, Lk, D, top_k, G, dtype, softcap, splits)
ATTN_CASES = {
    "mha-d64-fp32": (2, 4, 4, 1, 63, 64, 16, 1, torch.float32, 0.0, 2),
    "gqa4-d64-lq2-per-head": (2, 8, 2, 2, 63, 64, 40, 2, torch.float32, 0.0, 3),
    "gqa8-d128-lq4-bf16": (1, 8, 1, 4, 111, 128, 48, 1, torch.bfloat16, 0.0, 4),
    "gqa4-softcap-bf16": (2, 8, 2, 2, 63, 64, 32, 1, torch.bfloat16, 5.0, 2),
    "topk-gt-keys-one-split": (1, 4, 1, 1, 20, 64, 33, 1, torch.float32, 0.0, 1),
    "gqa8-d128-long": (2, 32, 4, 2, 4097, 128, 512, 1, torch.bfloat16, 0.0, None),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=GPU) if c.endswith("long") else c
                                  for c in ATTN_CASES])
def test_decode_sparse_attention_matches_reference(case):
    b, hq, hkv, lq, lk, d, top_k, g, dtype, softcap, splits = ATTN_CASES[case]
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    idx = random_indices(b, g, lq, lk, top_k).to(DEVICE)
    scale = 2 * d ** -0.5
    out, lse = decode.decode_sparse_attention(q, k, v, idx, scale, softcap, splits=splits)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, scale, softcap)
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=4 * TOL[dtype], rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-combine", "combine-kernel"])
def test_decode_sparse_attention_merge_forms_and_scratch_reuse(fused):
    """The merge inside the attention kernel (last program per KV head, a ticket per
    head) and the separate combine kernel give the reference; a reused scratch (a CUDA
    graph replay) gets its tickets back at zero."""
    b, hq, hkv, lq, lk, d, top_k, g, dtype, softcap, splits = ATTN_CASES["gqa4-d64-lq2-per-head"]
    scratch = decode.AttentionScratch.allocate(b, hq, lq, d, splits, DEVICE, hkv)
    for seed in (0, 1):
        torch.manual_seed(seed)
        q = torch.randn(b, hq, lq, d, device=DEVICE)
        k = torch.randn(b, hkv, lk, d, device=DEVICE)
        v = torch.randn(b, hkv, lk, d, device=DEVICE)
        idx = random_indices(b, g, lq, lk, top_k).to(DEVICE)
        out, lse = decode.decode_sparse_attention(q, k, v, idx, 0.2, scratch=scratch,
                                                  fused=fused)
        ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, 0.2)
        assert not out.isnan().any() and rel_err(out, ref_out) < TOL[dtype]
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        assert not scratch.ticket.any()


# --- 4. the whole step ----------------------------------------------------------------------


def step_inputs(b, hq, hkv, lq, lk, d, h_i, d_i, dtype):
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    q_idx = torch.randn(b, lq, h_i, d_i, device=DEVICE).to(dtype)
    k_idx = torch.randn(b, lk, d_i, device=DEVICE).to(dtype)
    w = torch.rand(b, lq, h_i, device=DEVICE).to(dtype)
    return q, k, v, q_idx, k_idx, w


def ref_step(q, k, v, q_idx, k_idx, w, top_k, scale, q_pos, key_mask, softcap=0.0):
    idx = ref_indices(q_idx, k_idx, w, top_k, q_pos, key_mask)
    return reference.sparse_attention(q, k, v, idx[:, None], scale, softcap)[0]


# (B, Hq, Hkv, D, top_k)
STEP_SHAPES = {"gqa4-d64": (2, 8, 2, 64, 24), "gqa8-d128": (2, 8, 1, 128, 40),
               "mha-d64": (2, 2, 2, 64, 16)}


@pytest.mark.parametrize("lk", lengths(1, 63, 1025, 4097))
@pytest.mark.parametrize("lq", [1, 2, 4])
@pytest.mark.parametrize("shape", list(STEP_SHAPES))
def test_decode_attention_matches_reference(shape, lq, lk):
    b, hq, hkv, d, top_k = STEP_SHAPES[shape]
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 4, 32, torch.float32)
    q_pos = positions(b, lq, lk).to(DEVICE)
    key_mask = left_padding(b, lk).to(DEVICE)
    scale = d ** -0.5
    scratch = decode.DecodeScratch.allocate(q, k, v, k_idx, top_k)
    out = decode.decode_attention(q, k, v, q_idx, k_idx, w, top_k, scale, q_pos, key_mask,
                                  scratch=scratch)
    ref = ref_step(q, k, v, q_idx, k_idx, w, top_k, scale, q_pos, key_mask)
    assert out.shape == q.shape and not out.isnan().any()
    assert rel_err(out, ref) < TOL[torch.float32]
    assert not scratch.topk.hist.any()  # left clean for the next step


@pytest.mark.parametrize("lk", lengths(50, 1025))
def test_decode_attention_equals_dense_when_top_k_covers_every_key(lk):
    b, hq, hkv, lq, d = 2, 8, 2, 2, 64
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 4, 32, torch.float32)
    q_pos = torch.stack([torch.arange(lk - lq, lk), torch.arange(3, 3 + lq)]).int().to(DEVICE)
    key_mask = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    key_mask[1, :4] = False  # sequence 1: query 0 sees no key at all, query 1 one key
    out = decode.decode_attention(q, k, v, q_idx, k_idx, w, lk + 7, 0.125, q_pos, key_mask,
                                  softcap=4.0)
    for i in range(b):
        ref, _ = reference.dense_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], 0.125, True,
                                           int(q_pos[i, 0]), key_mask[i : i + 1], softcap=4.0)
        assert rel_err(out[i], ref[0]) < TOL[torch.float32]
    assert (out[1, :, 0] == 0).all()


@GPU
@pytest.mark.parametrize("d_i", [64, 128])
def test_decode_attention_bf16_llama_shape_and_cuda_graph(d_i):
    b, hq, hkv, lq, lk, d, top_k = 2, 32, 8, 1, 8192, 128, 2048
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 8, d_i, torch.bfloat16)
    q_pos = torch.tensor([[lk - 1], [5000]], dtype=torch.int32, device=DEVICE)
    scratch = decode.DecodeScratch.allocate(q, k, v, k_idx, top_k)
    args = (q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, q_pos)
    eager = decode.decode_attention(*args, scratch=scratch).clone()
    ref = ref_step(*args, None)
    assert rel_err(eager, ref) < TOL[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode.decode_attention(*args, scratch=scratch)
    for _ in range(2):  # replays on new contents of the same buffers
        for x in (q, k, v, q_idx, k_idx, w):
            x.copy_(torch.randn_like(x) if x is not w else torch.rand_like(x))
        graph.replay()
        assert rel_err(out, ref_step(*args, None)) < TOL[torch.bfloat16]


# --- 4. dsa.attention dispatches decode steps to these kernels -----------------------------


@pytest.mark.parametrize("masks", ["none", "key_mask", "mask"])
@pytest.mark.parametrize("lk", lengths(63, 1025))
@pytest.mark.parametrize("lq", [1, 2, 4])
def test_attention_op_runs_decode_steps_on_the_decode_kernels(monkeypatch, lq, lk, masks):
    """A step of few queries goes to decode_attention (on CPU through the interpreter, by
    letting the dispatch take CPU tensors) and matches the reference op; a general mask
    with several queries, or the default dense_below at short length, does not."""
    from dsa_compile.config import DENSE_BELOW_DEFAULT
    op = importlib.import_module("dsa_compile.ops.attention")
    from dsa_compile.ops.dispatch import force_reference

    monkeypatch.setattr(op, "DECODE_DEVICES", ("cuda", "cpu"))
    calls, real = [], op._decode
    monkeypatch.setattr(op, "_decode", lambda *a: calls.append(1) or real(*a))
    b, hq, hkv, d, top_k = STEP_SHAPES["gqa4-d64"]
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 4, 32, torch.float32)
    key_mask = left_padding(b, lk).to(DEVICE) if masks == "key_mask" else None
    mask = None
    if masks == "mask":  # a pattern the passes could not prove: every third key hidden
        mask = (torch.arange(lk, device=DEVICE) % 3 != 1).expand(1, lq, lk).contiguous()
    args = (q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, True, lk - lq, key_mask, 0.0)
    out = torch.ops.dsa.attention(*args, 0, mask=mask)
    with force_reference():
        ref = torch.ops.dsa.attention(*args, 0, mask=mask)
    assert not out.isnan().any() and rel_err(out, ref) < TOL[torch.float32]
    assert len(calls) == (0 if masks == "mask" and lq > 1 else 1)
    calls.clear()
    dense = torch.ops.dsa.attention(*args, DENSE_BELOW_DEFAULT, mask=mask)
    assert not calls  # lk keys < the decode crossover: dense
    assert op.decode_crossover(1) > op.decode_crossover(8) >= op.decode_crossover(32) > top_k
    assert dense.shape == out.shape
