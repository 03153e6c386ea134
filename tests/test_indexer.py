"""Indexer: shapes, cost, the fitted training-free start, lazy fit, the registry."""

import gc

import pytest
import torch

from dsa_compile.config import DSAConfig
from dsa_compile.indexer import (
    FIT_MIN_TOKENS,
    REGISTRY,
    Indexer,
    IndexerRegistry,
    default_index_shape,
    ensure_fitted,
    low_rank_bilinear,
)


def test_default_cost_is_at_most_a_quarter_of_qk():
    heads, dim = default_index_shape(9, 3, 64)  # SmolLM2-135M
    assert (heads, dim) == (3, 48)
    assert heads * dim <= 9 * 64 // 4


@pytest.mark.parametrize("hq,hkv,d,lq,lk", [(9, 3, 64, 63, 111), (4, 4, 128, 17, 17),
                                            (8, 2, 64, 5, 300)], ids=str)
def test_forward_shapes_and_dtype(hq, hkv, d, lq, lk):
    ix = Indexer(hq, hkv, d)
    q, k = torch.randn(2, hq, lq, d), torch.randn(2, hkv, lk, d)
    q_idx, k_idx, w = ix(q, k)
    assert q_idx.shape == (2, lq, ix.index_heads, ix.index_dim)
    assert k_idx.shape == (2, lk, ix.index_dim) and w.shape == (2, lq, ix.index_heads)
    assert (w > 0).all() and torch.isfinite(q_idx).all() and torch.isfinite(k_idx).all()
    q_idx16, _, _ = ix(q.to(torch.bfloat16), k.to(torch.bfloat16))
    assert q_idx16.dtype == torch.bfloat16


def test_low_rank_bilinear_full_rank_is_exact():
    q, k = torch.randn(500, 16), torch.randn(400, 16) + 0.5
    p, r = low_rank_bilinear(q, k, 16)
    kc = k - k.mean(0)
    torch.testing.assert_close((q @ p) @ (kc @ r).T, q @ kc.T, atol=1e-3, rtol=1e-3)


def test_fit_selects_the_planted_keys():
    torch.manual_seed(0)
    hq, hkv, d, L = 4, 2, 32, 400
    q, k = torch.randn(1, hq, L, d), torch.randn(1, hkv, L, d)
    ix = Indexer(hq, hkv, d, index_dim=2 * d + 1).fit(q, k)  # full rank per group
    q_idx, k_idx, w = ix(q, k)
    scores = torch.ops.dsa.indexer_scores(q_idx, k_idx, w, 0, False, None)
    logits = torch.einsum("bgrqd,bgkd->bqk", q.reshape(1, hkv, 2, L, d), k)
    top_scores = scores.topk(8, -1).indices
    top_logits = logits.topk(8, -1).indices
    overlap = (top_scores[..., :, None] == top_logits[..., None, :]).any(-1).float().mean()
    assert overlap > 0.9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Indexer(9, 2, 64)
    with pytest.raises(ValueError, match="index_dim"):
        Indexer(8, 4, 16, index_dim=3)
    ix = Indexer(4, 2, 16)
    with pytest.raises(ValueError, match="built for"):
        ix.fit(torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32))


def test_lazy_fit_only_with_enough_real_keys():
    ix = Indexer(4, 2, 16)
    ix(torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16))
    assert not ix.fitted
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ix(mode.from_tensor(torch.randn(1, 4, FIT_MIN_TOKENS, 16)),
           mode.from_tensor(torch.randn(1, 2, FIT_MIN_TOKENS, 16)))
    assert not ix.fitted
    ix(torch.randn(1, 4, FIT_MIN_TOKENS, 16), torch.randn(1, 2, FIT_MIN_TOKENS, 16))
    assert ix.fitted


def test_ensure_fitted_is_the_one_fit_decision():
    """ensure_fitted: never refits, respects min_tokens, and with real=True (the backend's
    fit run, inside the compiler) skips the fake/traced checks but not the token count."""
    ix = Indexer(4, 2, 16)
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    assert not ensure_fitted(ix, q, k) and not ix.fitted  # 40 < FIT_MIN_TOKENS keys
    assert not ensure_fitted(ix, q, k, real=True) and not ix.fitted
    before = ix.wq.detach().clone()
    assert ensure_fitted(ix, q, k, min_tokens=1) and ix.fitted
    assert not torch.equal(ix.wq, before)  # the fit changed the projections
    fitted = ix.wq.detach().clone()
    assert not ensure_fitted(ix, 2 * q, 2 * k, min_tokens=1)  # a fitted indexer stays
    assert torch.equal(ix.wq, fitted)


def test_registry_finds_by_any_anchor_and_forgets_dead_ones():
    reg = IndexerRegistry()
    lin = torch.nn.Linear(4, 4)
    ix = reg.get_or_create("attn", ["w", "b"], [lin.weight, lin.bias], 4, 2, 8, DSAConfig())
    assert reg.lookup([lin.bias]) is ix
    assert reg.get_or_create("attn", ["b"], [lin.bias], 4, 2, 8, DSAConfig()) is ix
    assert reg.lookup([torch.nn.Parameter(lin.weight.detach().clone())]) is None
    assert reg.indexers_of(lin) == {"attn": ix}
    del lin
    gc.collect()
    assert not reg._by_id


def test_global_registry_is_an_indexer_registry():
    assert isinstance(REGISTRY, IndexerRegistry)
