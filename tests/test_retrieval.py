"""Per-KV-group selection, mixed-length calibration blocks and the retrieval check."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsa_compile.calibration import calibrate
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import SiteCall, attention_override, grouped_dsa_attention
from dsa_compile.indexer import GROUPED_REGISTRY, GroupedIndexer, default_index_shape
from dsa_compile.metrics import peak_recall

CFG = DSAConfig(top_k=16, dense_below=0)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def ids(length=97, seed=1):
    return torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(seed))


def test_grouped_indexer_costs_what_the_shared_default_costs():
    heads, dim = default_index_shape(9, 3, 64)  # SmolLM2
    ix = GroupedIndexer(9, 3, 64)
    assert ix.cost_per_pair == heads * dim == 144 <= 9 * 64 // 4
    assert [(g.num_q_heads, g.num_kv_heads, g.index_heads, g.index_dim) for g in ix.groups] \
        == [(3, 1, 1, 48)] * 3


def _explicit_grouped_attention(call, indexer, top_k):
    """Per group: score every visible key, keep the top_k, softmax over those only."""
    b, hq, lq, d = call.q.shape
    hkv, lk = call.k.shape[1], call.k.shape[2]
    out = torch.empty(b, hq, lq, call.v.shape[-1])
    visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None]
    for g, (q_idx, k_idx, w) in enumerate(indexer(call.q, call.k)):
        scores = torch.einsum("bqhk,bqh->bqk",
                              torch.relu(torch.einsum("bqhd,bkd->bqhk", q_idx, k_idx)), w)
        scores = scores.masked_fill(~visible, float("-inf"))
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-1, scores.topk(min(top_k, lk), -1).indices, True)
        keep &= visible
        heads = slice(g * hq // hkv, (g + 1) * hq // hkv)
        logits = torch.einsum("bhqd,bkd->bhqk", call.q[:, heads], call.k[:, g]) * call.scale
        probs = logits.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
        out[:, heads] = torch.einsum("bhqk,bkd->bhqd", probs, call.v[:, g])
    return out


@pytest.mark.parametrize("dense_below", [0, 40])
def test_grouped_dsa_attention_matches_an_explicit_per_group_selection(dense_below):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 63, 8), torch.randn(1, 2, 63, 8), torch.randn(1, 2, 63, 8)
    call = SiteCall("site", torch.nn.Identity(), q, k, v, 8 ** -0.5, True)
    ix = GroupedIndexer(4, 2, 8, index_dim=5).fit(q, k)
    config = DSAConfig(top_k=16, dense_below=dense_below)
    got = grouped_dsa_attention(call, ix, config)
    want = _explicit_grouped_attention(call, ix, 16)
    if dense_below:  # queries seeing at most 40 keys are exact dense attention
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                 enable_gqa=True)
        want[:, :, :40] = dense[:, :, :40]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The two groups choose differently: one shared selection could not reproduce this.
    sel = [torch.ops.dsa.indexer_topk(*t, 16, 0, True, None) for t in ix(q, k)]
    assert not torch.equal(sel[0], sel[1])


def test_per_group_harness_uses_grouped_indexers_and_top_k_covering_all_is_dense():
    model = tiny_llama()
    x = ids(300)  # an unfitted indexer fits itself on a call with at least 256 keys
    with torch.no_grad():
        dense = model(x).logits
        with attention_override(model, "dsa", DSAConfig(top_k=300, dense_below=0),
                                per_group=True) as o:
            full = model(x).logits
        with attention_override(model, "dsa", CFG, per_group=True):
            sparse = model(x).logits
    assert o.swapped == 2
    assert all(isinstance(ix, GroupedIndexer) and ix.fitted
               for ix in GROUPED_REGISTRY.indexers_of(model).values())
    assert len(GROUPED_REGISTRY.indexers_of(model)) == 2
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_peak_recall_counts_a_kept_and_a_dropped_peak():
    # One head, three keys; the query's attention peaks on key 0.
    q = torch.tensor([[[[0.0, 0.0], [0.0, 0.0], [20.0, 0.0]]]])  # [1, 1, 3, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]])

    class Fixed(torch.nn.Module):
        def __init__(self, prefer):
            super().__init__()
            self.prefer = prefer

        def forward(self, q, k):  # index score = 1 on the preferred key, 0 elsewhere
            b, _, lq, _ = q.shape
            k_idx = torch.zeros(b, k.shape[2], 3)
            k_idx[:, self.prefer, 0] = 1.0
            return torch.ones(b, lq, 1, 3), k_idx, torch.ones(b, lq, 1)

    rows = torch.tensor([2])
    assert peak_recall(Fixed(0), q, k, 1.0, True, rows, top_k=1) == (1, 1)
    assert peak_recall(Fixed(1), q, k, 1.0, True, rows, top_k=1) == (0, 1)
    # A peak on an attention sink, or on a key too close, is not a retrieval peak.
    assert peak_recall(Fixed(1), q, k, 1.0, True, rows, top_k=1, sinks=1) == (0, 0)
    assert peak_recall(Fixed(1), q, k, 1.0, True, rows, top_k=1, min_distance=3) == (0, 0)
    assert peak_recall(Fixed(1), q, k, 1.0, True, rows, top_k=1, min_distance=2) == (0, 1)


@pytest.mark.parametrize("per_group", [False, True])
def test_calibrate_reports_the_retrieval_check(per_group):
    model = tiny_llama()
    batches = [ids(97, seed=s) for s in range(3)] + [ids(50, seed=9)]
    res = calibrate(model, batches, DSAConfig(top_k=16), steps=3, progress=False,
                    per_group=per_group)
    assert res.peaks > 0 and 0.0 <= res.retrieval_before <= 1.0
    assert 0.0 <= res.retrieval_after <= 1.0
    assert "retrieval check" in str(res)
    if per_group:
        assert len(GROUPED_REGISTRY.indexers_of(model)) == 2
    off = calibrate(model, batches, DSAConfig(top_k=16), steps=1, progress=False,
                    check_retrieval=False, per_group=per_group)
    assert math.isnan(off.retrieval_after) and off.peaks == 0


def test_per_group_with_checkpoints_raises(tmp_path):
    with pytest.raises(ValueError, match="per_group"):
        calibrate(tiny_llama(), [ids()], CFG, steps=1, progress=False, per_group=True,
                  checkpoint_dir=tmp_path)


def test_mixed_length_blocks_cover_every_length_disjointly():
    from dsa_compile.evaluation import mixed_length_blocks

    class Tok:
        def __call__(self, text, return_tensors=None):
            class Out:
                input_ids = torch.arange(100_000)[None]
            return Out()

    blocks = mixed_length_blocks(Tok(), 8192, 32768, offset_tokens=1000, min_length=2048)
    assert [b.shape[1] for b in blocks] == [8192] + [4096] * 2 + [2048] * 4
    flat = torch.cat([b[0] for b in blocks])
    assert torch.equal(flat, torch.arange(1000, 1000 + flat.numel()))
    with pytest.raises(ValueError, match="fewer than"):
        mixed_length_blocks(Tok(), 8192, 10 ** 6)
