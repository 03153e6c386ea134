"""The CPU decode path (reference/decode.py): ``dsa.attention`` steps of few queries on
CPU tensors take it, and it computes what the general reference path computes (the
indexer's exact top-k, then sparse attention) on every awkward input."""

from __future__ import annotations

import importlib

import pytest
import torch

from dsa_compile import reference
from dsa_compile.config import DENSE_BELOW_DEFAULT
from dsa_compile.ops.dispatch import force_reference
from dsa_compile.reference.index_keys import pack_index_keys

op = importlib.import_module("dsa_compile.ops.attention")

# (B, Hq, Hkv, D, H_I, d_I)
SHAPES = {"gqa3-d64": (2, 9, 3, 64, 3, 48), "gqa4-d128": (3, 8, 2, 128, 2, 32),
          "mha-d64": (1, 2, 2, 64, 1, 16), "mqa-d64": (2, 4, 1, 64, 4, 8)}


def inputs(shape, lq, lk, dtype=torch.float32, seed=0):
    b, hq, hkv, d, h_i, d_i = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g).to(dtype)

    w = torch.rand(b, lq, h_i, generator=g).to(dtype)
    return (rand(b, hq, lq, d), rand(b, hkv, lk, d), rand(b, hkv, lk, d),
            rand(b, lq, h_i, d_i), rand(b, lk, d_i), w)


def both(monkeypatch, args, top_k, q_offset, causal=True, key_mask=None, softcap=0.0,
         mask=None):
    """(decode-path output, general-reference output, decode calls made)."""
    calls, real = [], reference.decode_attention
    monkeypatch.setattr(reference, "decode_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, q_idx, k_idx, w = args
    call = (q, k, v, q_idx, k_idx, w, top_k, q.shape[-1] ** -0.5, causal, q_offset, key_mask,
            softcap, 0)
    out = torch.ops.dsa.attention(*call, mask=mask)
    with force_reference():  # the general path: indexer_topk + sparse_attention
        ref = torch.ops.dsa.attention(*call, mask=mask)
    return out, ref, len(calls)


def left_padding(b, lk):
    mask = torch.ones(b, lk, dtype=torch.bool)
    for i in range(1, b):
        mask[i, : min(lk, i * lk // 3 + 1)] = False
    return mask


@pytest.mark.parametrize("lk", [1, 63, 1025])
@pytest.mark.parametrize("lq", [1, 2, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_path_equals_general_path(monkeypatch, shape, lq, lk):
    """Lq in {1, 2, 4}, odd cache lengths, GQA / MHA / MQA, D 64 / 128, top_k both
    below and above the visible keys, with and without left padding."""
    args = inputs(shape, lq, lk)
    for top_k in (7, 2000):
        for key_mask in (None, left_padding(args[0].shape[0], lk)):
            out, ref, calls = both(monkeypatch, args, top_k, max(lk - lq, 0), key_mask=key_mask)
            assert calls == 1
            assert not out.isnan().any()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_full_top_k_equals_dense(monkeypatch):
    args = inputs("gqa3-d64", 1, 300)
    out, _, calls = both(monkeypatch, args, 300, 299)
    q, k, v = args[:3]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert calls == 1
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_small_top_k_is_really_sparse(monkeypatch):
    """With top_k 4 the step differs from dense, and equals attention over the indexer's
    own top-4 keys."""
    args = inputs("gqa3-d64", 1, 200)
    out, ref, _ = both(monkeypatch, args, 4, 199)
    q, k, v = args[:3]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert (out - dense).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ties_nan_weights_and_empty_rows(monkeypatch):
    """Integer-valued index scores (ties at the k-th value go to the smaller key), a NaN
    index weight (NaN ranks as the lowest finite score), and a sequence whose every key
    is padding (zeros, no NaN)."""
    q, k, v, q_idx, k_idx, w = inputs("gqa3-d64", 2, 101)
    q_idx, k_idx = q_idx.round().clamp(-1, 1), k_idx.round().clamp(-1, 1)  # many ties
    for top_k in (5, 17):
        out, ref, _ = both(monkeypatch, (q, k, v, q_idx, k_idx, w), top_k, 99)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w_nan = w.clone()
    w_nan[0, 1, 0] = float("nan")
    out, ref, _ = both(monkeypatch, (q, k, v, q_idx, k_idx, w_nan), 5, 99)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    key_mask = torch.ones(2, 101, dtype=torch.bool)
    key_mask[1] = False
    out, ref, _ = both(monkeypatch, (q, k, v, q_idx, k_idx, w), 5, 99, key_mask=key_mask)
    assert not out.isnan().any() and (out[1] == 0).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["non-causal", "softcap", "bf16", "packed-fp8", "mask",
                                  "strided-cache"])
def test_decode_path_variants(monkeypatch, case):
    lq, lk = 2, 77
    args = inputs("gqa4-d128", lq, lk, torch.bfloat16 if case == "bf16" else torch.float32)
    q, k, v, q_idx, k_idx, w = args
    kw = {}
    if case == "non-causal":
        kw["causal"] = False
    if case == "softcap":
        kw["softcap"] = 5.0
    if case == "packed-fp8":
        k_idx = pack_index_keys(k_idx)
    if case == "mask":  # one query per row: the general mask is a key mask
        lq = 1
        q, q_idx, w = q[:, :, :1], q_idx[:, :1], w[:, :1]
        kw["mask"] = (torch.arange(lk) % 3 != 1).expand(1, 1, lk).contiguous()
    if case == "strided-cache":  # a view into a longer cache buffer
        k = torch.cat([k, torch.randn_like(k)], dim=2)[:, :, :lk]
        v = torch.cat([v, torch.randn_like(v)], dim=2)[:, :, :lk]
    out, ref, calls = both(monkeypatch, (q, k, v, q_idx, k_idx, w), 9, lk - lq, **kw)
    assert calls == 1 and out.dtype == q.dtype and not out.isnan().any()
    tol = 2e-2 if case == "bf16" else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if case == "strided-cache":  # both paths gather from the view: check against a copy
        again, _, _ = both(monkeypatch, (q, k.contiguous(), v.contiguous(), q_idx, k_idx, w),
                           9, lk - lq)
        torch.testing.assert_close(out, again, atol=1e-6, rtol=1e-6)


def test_general_steps_stay_on_the_general_path(monkeypatch):
    """An additive bias, a general mask over several queries, or more than
    DECODE_MAX_QUERIES queries do not take the decode path."""
    lk = 50
    q, k, v, q_idx, k_idx, w = inputs("gqa3-d64", 2, lk)
    mask = (torch.arange(lk) % 2 == 0).expand(1, 2, lk).contiguous()
    _, _, calls = both(monkeypatch, (q, k, v, q_idx, k_idx, w), 4, lk - 2, mask=mask)
    assert calls == 0
    many = inputs("gqa3-d64", op.DECODE_MAX_QUERIES + 1, lk)
    _, _, calls = both(monkeypatch, many, 4, lk - many[0].shape[2])
    assert calls == 0


def test_cpu_crossover_dispatches_short_steps_dense(monkeypatch):
    """With the default dense_below, a CPU decode step over at most the CPU crossover's
    keys is dense (exactly SDPA), a longer one sparse."""
    calls, real = [], reference.decode_attention
    monkeypatch.setattr(reference, "decode_attention", lambda *a: calls.append(1) or real(*a))
    cross = op.decode_crossover(1, "cpu")
    for lk, sparse in ((cross, False), (cross + 1, True)):
        q, k, v, q_idx, k_idx, w = inputs("mha-d64", 1, lk)
        out = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, 8, 0.125, True, lk - 1, None,
                                      0.0, DENSE_BELOW_DEFAULT)
        assert len(calls) == int(sparse)
        if not sparse:
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125)
            torch.testing.assert_close(out, dense)
