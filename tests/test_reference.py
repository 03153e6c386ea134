"""Reference ops vs a naive dense formulation (dense scores, mask, top-k, masked softmax)."""

import numpy as np
import pytest
import torch

from dsa_compile import reference

# (B, Hq, Hkv, Lq, Lk, D, top_k, key_padding)
CASES = [
    pytest.param(1, 4, 4, 1, 63, 64, 16, False, id="decode-Lq1-MHA"),
    pytest.param(2, 8, 1, 1, 111, 64, 200, True, id="decode-MQA-topk>visible-pad"),
    pytest.param(1, 8, 4, 37, 111, 128, 32, False, id="chunked-prefill-offset"),
    pytest.param(2, 4, 1, 63, 63, 64, 8, True, id="B2-padding-MQA"),
    pytest.param(1, 8, 8, 111, 111, 128, 111, False, id="topk=L-exact"),
    pytest.param(1, 1, 1, 63, 63, 64, 100, False, id="H1-topk>L"),
    pytest.param(1, 4, 1, 1025, 1025, 64, 64, False, id="L1025"),
]


def naive_scores(q_idx, k_idx, w, q_offset, causal, key_mask):
    """[B, Lq, Lk] dense in float64."""
    dots = torch.einsum("bthd,bsd->bths", q_idx.double(), k_idx.double())
    s = (torch.relu(dots) * w.double()[..., None]).sum(2)
    lq, lk = s.shape[1:]
    if causal:
        pos = torch.arange(lq)[:, None] + q_offset
        s = s.masked_fill(torch.arange(lk)[None] > pos, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None], float("-inf"))
    return s


def naive_topk_sets(scores, top_k):
    """Python-level selection: score descending, then index ascending; -inf never selected."""
    out = []
    for row in scores.reshape(-1, scores.shape[-1]).numpy():
        finite = np.nonzero(np.isfinite(row))[0]
        order = finite[np.lexsort((finite, -row[finite]))]
        out.append(set(order[:top_k].tolist()))
    return out


def naive_sparse_attention(q, k, v, indices, scale, softcap=0.0):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    allowed = torch.zeros(b, indices.shape[1], lq, lk + 1, dtype=torch.bool)
    idx = indices.long().clone()
    idx[idx < 0] = lk
    allowed.scatter_(-1, idx, True)
    allowed = allowed[..., :lk].repeat_interleave(hq // indices.shape[1], dim=1)
    kk = k.double().repeat_interleave(hq // hkv, 1)
    vv = v.double().repeat_interleave(hq // hkv, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, vv), torch.logsumexp(s, -1)


def make_indexer_inputs(b, lq, lk, h=4, d=32, dtype=torch.float32):
    return (
        torch.randn(b, lq, h, d, dtype=dtype),
        torch.randn(b, lk, d, dtype=dtype),
        torch.rand(b, lq, h, dtype=dtype) + 0.1,
    )


def padding_mask(b, lk):
    m = torch.ones(b, lk, dtype=torch.bool)
    for i in range(1, b):
        m[i, : lk // (i + 2)] = False  # left padding of different lengths
    return m


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,top_k,pad", CASES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_indexer_topk_matches_naive(B, Hq, Hkv, Lq, Lk, D, top_k, pad, causal):
    q_idx, k_idx, w = make_indexer_inputs(B, Lq, Lk)
    key_mask = padding_mask(B, Lk) if pad else None
    q_offset = Lk - Lq
    got = reference.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal, key_mask)
    assert got.dtype == torch.int32 and got.shape == (B, Lq, top_k)
    scores = naive_scores(q_idx, k_idx, w, q_offset, causal, key_mask)
    want = naive_topk_sets(scores, top_k)
    for row, expected in zip(got.reshape(-1, top_k), want):
        valid = row[row >= 0].tolist()
        assert valid == sorted(valid), "indices must be ascending"
        assert (row[len(valid) :] == -1).all(), "-1 slots must trail"
        assert set(valid) == expected
    torch.testing.assert_close(
        reference.indexer_scores(q_idx, k_idx, w, q_offset, causal, key_mask),
        scores.float(),
    )


def test_ties_go_to_smaller_index():
    # Every key scores the same: the first top_k visible keys must win.
    q_idx = torch.ones(1, 3, 2, 4)
    k_idx = torch.ones(1, 10, 4)
    w = torch.ones(1, 3, 2)
    got = reference.indexer_topk(q_idx, k_idx, w, 4, q_offset=7, causal=True)
    assert got.tolist() == [[[0, 1, 2, 3]] * 3]


def test_relu_zero_scores_are_selectable_but_masked_keys_never_are():
    q_idx = -torch.ones(1, 1, 1, 4)  # every dot product negative: all scores 0 after ReLU
    k_idx = torch.rand(1, 6, 4)
    key_mask = torch.tensor([[False, True, False, True, True, True]])
    got = reference.indexer_topk(q_idx, k_idx, torch.ones(1, 1, 1), 8, 5, True, key_mask)
    assert got.tolist() == [[[1, 3, 4, 5, -1, -1, -1, -1]]]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,top_k,pad", CASES)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["G1", "GHkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_attention_matches_naive(B, Hq, Hkv, Lq, Lk, D, top_k, pad, per_kv_head, dtype):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    g = Hkv if per_kv_head else 1
    key_mask = padding_mask(B, Lk) if pad else None
    indices = torch.stack(
        [
            reference.indexer_topk(*make_indexer_inputs(B, Lq, Lk), top_k, Lk - Lq, True, key_mask)
            for _ in range(g)
        ],
        dim=1,
    )
    scale = D**-0.5
    out, lse = reference.sparse_attention(q, k, v, indices, scale)
    want_out, want_lse = naive_sparse_attention(q, k, v, indices, scale)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)


PATHS = {"fused": (0, 10**9), "gemm": (10**9, 0), "gathered": (0, 0)}  # (GEMM, fused) ratios


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,top_k,pad", [CASES[1], CASES[2], CASES[3], CASES[6]])
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["G1", "GHkv"])
def test_every_evaluation_path_matches_naive(path, B, Hq, Hkv, Lq, Lk, D, top_k, pad,
                                             per_kv_head, monkeypatch):
    """The reference picks fused-kernel / GEMM / gathered evaluation by length: each one,
    forced, must give the spec's numbers (rows without keys included)."""
    sa = __import__("dsa_compile.reference.sparse_attention", fromlist=["x"])
    monkeypatch.setattr(sa, "DENSE_GEMM_RATIO", PATHS[path][0])
    monkeypatch.setattr(sa, "FUSED_RATIO", PATHS[path][1])
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    g = Hkv if per_kv_head else 1
    key_mask = padding_mask(B, Lk) if pad else None
    indices = torch.stack([reference.indexer_topk(*make_indexer_inputs(B, Lq, Lk), top_k,
                                                  Lk - Lq, True, key_mask) for _ in range(g)], 1)
    indices[..., 0, :] = -1  # query 0 has no key at all
    out, lse = reference.sparse_attention(q, k, v, indices, D**-0.5)
    want_out, want_lse = naive_sparse_attention(q, k, v, indices, D**-0.5)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)


def test_sparse_attention_softcap_and_empty_rows():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    indices = torch.randint(0, 9, (1, 1, 5, 4)).sort(-1).values.unique_consecutive(dim=-1)
    indices = torch.tensor([[[[0, 3, 5, -1], [-1, -1, -1, -1], [8, -1, -1, -1], [1, 2, 4, 7],
                              [6, 7, 8, 0]]]])
    out, lse = reference.sparse_attention(q, k, v, indices, 0.7, softcap=2.0)
    want_out, want_lse = naive_sparse_attention(q, k, v, indices, 0.7, softcap=2.0)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all()
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_full_selection_equals_dense_attention():
    """top_k covering every visible key: sparse == dense, through the indexer selection."""
    b, hq, hkv, lq, lk, d = 2, 8, 2, 17, 40, 64
    q, k, v = (torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d))
    key_mask = padding_mask(b, lk)
    idx = reference.indexer_topk(*make_indexer_inputs(b, lq, lk), lk, lk - lq, True, key_mask)
    out, lse = reference.sparse_attention(q, k, v, idx[:, None], d**-0.5)
    dense, dense_lse = reference.dense_attention(q, k, v, d**-0.5, True, lk - lq, key_mask)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse)


@pytest.mark.parametrize("path", list(PATHS))
def test_value_head_size_may_differ(path, monkeypatch):
    sa = __import__("dsa_compile.reference.sparse_attention", fromlist=["x"])
    monkeypatch.setattr(sa, "DENSE_GEMM_RATIO", PATHS[path][0])
    monkeypatch.setattr(sa, "FUSED_RATIO", PATHS[path][1])
    q, k, v = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 32)
    indices = reference.indexer_topk(*make_indexer_inputs(1, 9, 9), 4)[:, None]
    out, lse = reference.sparse_attention(q, k, v, indices, 0.125)
    want_out, want_lse = naive_sparse_attention(q, k, v, indices, 0.125)
    assert out.shape == (1, 4, 9, 32)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-4)


def test_general_mask_and_bias_cover_every_visible_key_equals_dense():
    """dsa.attention with a carried bool mask and an additive bias equals dense attention
    (with the same mask and bias) when top_k covers every key; masked keys never count."""
    torch.manual_seed(0)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 13, 29, 16
    q, k, v = torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    q_idx, k_idx, w = torch.randn(b, lq, 2, 8), torch.randn(b, lk, 8), torch.rand(b, lq, 2)
    mask = torch.rand(1, lq, lk) > 0.3
    bias = torch.randn(b, lq, lk).masked_fill(torch.rand(b, lq, lk) > 0.7, -1e9)
    scale = d ** -0.5
    got = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, 64, scale, False, 0, None, 0.0, 0,
                                  mask=mask, bias=bias)
    want, _ = reference.dense_attention(q, k, v, scale, False, 0, None, 0.0, mask, bias)
    rows = (mask & (bias > -1e4)).any(-1)  # rows with a visible key (others: dense's choice)
    torch.testing.assert_close(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows],
                               atol=1e-5, rtol=1e-5)
    sparse = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, 3, scale, False, 0, None, 0.0,
                                     0, mask=mask, bias=bias)
    assert (sparse - got).abs().max() > 1e-3


def test_general_mask_shape_errors_say_what_to_do():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8)
    q_idx, k_idx, w = torch.randn(2, 5, 2, 4), torch.randn(2, 7, 4), torch.rand(2, 5, 2)
    bad = torch.ones(2, 4, 5, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match="one pattern for all heads"):
        torch.ops.dsa.attention(q, k, k, q_idx, k_idx, w, 4, 1.0, mask=bad.flatten(0, 1))
    with pytest.raises(ValueError, match="mask has dtype"):
        torch.ops.dsa.attention(q, k, k, q_idx, k_idx, w, 4, 1.0, mask=torch.ones(2, 5, 7))


@pytest.mark.parametrize("hq,hkv,lq,lk", [(4, 2, 5, 9), (6, 3, 7, 7), (2, 2, 1, 13)])
def test_grouped_probs_times_v_is_dense_attention(hq, hkv, lq, lk):
    """The probabilities the distillation target and the recall metrics sum over heads are
    dense attention's: grouped back to [B, Hq, Lq, Lk] and applied to V they give its output."""
    g = torch.Generator().manual_seed(hq * lk)
    q, k, v = (torch.randn(2, hq, lq, 16, generator=g), torch.randn(2, hkv, lk, 16, generator=g),
               torch.randn(2, hkv, lk, 8, generator=g))
    off = lk - lq
    visible = torch.arange(lk)[None, :] <= (torch.arange(lq) + off)[:, None]
    p = reference.grouped_probs(q, k, 0.3, visible)                  # [B, Hkv, R, Lq, Lk]
    assert p.shape == (2, hkv, hq // hkv, lq, lk)
    out = torch.einsum("bgrqk,bgke->bgrqe", p, v).reshape(2, hq, lq, 8)
    want, _ = reference.dense_attention(q, k, v, 0.3, True, off)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
