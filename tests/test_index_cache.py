"""The index-key cache: decode steps project only the new tokens' index keys, never stale.

A cached DSA model must select exactly what the uncached one selects (``index_cache=False``
projects every key each call), with a small top_k so the selection matters, under
DynamicCache and StaticCache, left-padded batches, beam search (the cache is reordered:
a miss, re-projected) and a StaticCache reset for a second prompt. The decode graphs
project one key row per step and the cache is hit on every step after the prefill.
"""

from __future__ import annotations

import gc

import pytest
import torch
from hf_models import tiny_lm
from test_hf import CACHES, _compile, _padded_batch

from dsa_compile import DSAConfig, index_key_cache
from dsa_compile.backends import dynamo
from dsa_compile.backends.index_cache import IndexKeyStore
from dsa_compile.indexer import Indexer, default_index_shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPARSE = {"top_k": 8, "dense_below": 0}
STEPS = 5


def _generate(model, inputs, cache, **kw):
    index_key_cache().clear()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             **CACHES[cache], **kw)
    return out, index_key_cache().stats()


def _cached_and_uncached(family, cache, inputs, **kw):
    runs = []
    for on in (True, False):
        model = tiny_lm(family, "sdpa")
        _compile(model, {**SPARSE, "index_cache": on})
        runs.append((*_generate(model, inputs, cache, **kw), list(dynamo.DEFAULT.last.sites)))
    return runs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "opt", "phi3", "gpt2"])
def test_cached_decode_selects_what_uncached_selects(family, cache):
    inputs = _padded_batch()
    (got, stats, records), (want, off_stats, off_records) = _cached_and_uncached(
        family, cache, inputs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The last graph compiled is a decode step: each site reads the cache and projects
    # the one new token's key.
    assert records and all(r.index_cache == cache and r.key_rows == "1" for r in records)
    layers = len(records)
    assert stats["hits"] == layers * (STEPS - 1) and stats["misses"] == 0
    assert stats["rows_projected"] == 0 and stats["bytes"] > 0
    assert off_stats["hits"] == off_stats["misses"] == 0
    assert all(r.index_cache == "" for r in off_records)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_reprojects_reordered_cache(cache):
    """Beam search replaces the cache tensors by ``index_select`` each step: every such
    step is a miss, re-projected from the reordered K (exact, counted), never stale."""
    inputs = _padded_batch()
    (got, stats, _), (want, _, _) = _cached_and_uncached("llama", cache, inputs, num_beams=3)
    assert torch.equal(got.sequences, want.sequences)
    assert stats["misses"] > 0 and stats["rows_projected"] > 0


def test_static_cache_reset_for_a_second_prompt_is_reprojected():
    from transformers import StaticCache

    first, second = _padded_batch(seed=1), _padded_batch((23, 31), seed=2)

    def run(on):
        model = tiny_lm("llama", "sdpa")
        _compile(model, {**SPARSE, "index_cache": on})
        cache = StaticCache(config=model.config, max_cache_len=64)
        outs = []
        for inputs in (first, second):
            index_key_cache().clear()
            with torch.no_grad():
                outs.append(model.generate(**inputs, past_key_values=cache, do_sample=False,
                                           max_new_tokens=STEPS))
            outs.append(index_key_cache().stats())
            cache.reset()
        return outs

    got, want = run(True), run(False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert got[1]["misses"] == 0 and got[3]["hits"] > 0


def test_cache_written_outside_the_graph_is_not_read_stale():
    """A user's in-place edit of the K cache between steps bumps its version: the next
    step re-projects it instead of reading the old index keys."""
    from transformers import StaticCache

    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(4))
    nxt = torch.tensor([[5], [7]])

    def step(on):
        model = tiny_lm("llama", "sdpa", layers=1)
        _compile(model, {"top_k": 4, "dense_below": 0, "index_cache": on})
        kv = StaticCache(config=model.config, max_cache_len=64)
        index_key_cache().clear()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=kv, cache_position=torch.arange(40))
            keys = kv.layers[0].keys
            g = torch.Generator().manual_seed(5)
            keys.mul_(torch.rand(keys.shape, generator=g) * 4)  # reorders the index scores
            out = model(input_ids=nxt, past_key_values=kv, cache_position=torch.tensor([40]))
        return out.logits, index_key_cache().stats()

    (got, stats), (want, _) = step(True), step(False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats["misses"] == 1 and stats["rows_projected"] == 2 * 64


def test_no_cache_call_is_left_alone():
    model = tiny_lm("llama", "sdpa")
    _compile(model, SPARSE)
    ids = torch.randint(1, 96, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert dynamo.DEFAULT.last.sites and all(r.index_cache == "" for r in dynamo.DEFAULT.last.sites)


def test_store_checks_version_identity_and_drops_dead_tensors():
    store = IndexKeyStore()
    indexer = Indexer(4, 2, 8)
    k = torch.randn(2, 2, 9, 8)
    first = store.lookup(k, indexer, torch.float32)
    torch.testing.assert_close(first, indexer.project_keys(k))
    assert (store.misses, store.rows_projected) == (1, 18)
    store.record(k, first, indexer)
    assert store.lookup(k, indexer, torch.float32) is first and store.hits == 1
    assert store.stats()["bytes"] == first.numel() * 4
    other = Indexer(4, 2, 8)
    assert store.lookup(k, other, torch.float32) is not first  # another site's indexer
    k.add_(1.0)  # written outside the graph
    again = store.lookup(k, indexer, torch.float32)
    torch.testing.assert_close(again, indexer.project_keys(k))
    assert store.misses == 3
    del k
    gc.collect()
    assert store.stats()["entries"] == 0


def test_index_cache_option_is_validated():
    with pytest.raises(ValueError, match="index_cache must be True or False"):
        DSAConfig(index_cache=1)
    assert DSAConfig.from_options({"index_cache": False}).index_cache is False


# --- the FP8 index-key cache (DSAConfig.index_cache_fp8) ----------------------------------


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_fp8_cache_with_every_key_selected_equals_dense(cache):
    inputs = _padded_batch()
    model = tiny_lm("llama", "sdpa")
    want, _ = _generate(model, inputs, cache)  # not compiled: the dense model
    _compile(model, {"top_k": 64, "dense_below": 0, "index_cache_fp8": True})
    got, stats = _generate(model, inputs, cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    records = dynamo.DEFAULT.last.sites
    assert records and all(r.index_cache == f"{cache} fp8" for r in records)
    assert stats["hits"] == len(records) * (STEPS - 1) and stats["misses"] == 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_fp8_cache_selects_by_the_dequantised_keys(monkeypatch, cache):
    """Small top_k: the FP8-cached model decodes what an uncached model whose index keys
    are rounded through the FP8 format decodes, from a cache of d_I + 4 bytes per token
    (a quarter of the float32 mirror's 4 d_I, plus the scale)."""
    from dsa_compile.reference.index_keys import dequantize_index_keys

    inputs = _padded_batch()
    model = tiny_lm("llama", "sdpa")
    _compile(model, {**SPARSE, "index_cache_fp8": True})
    got, stats = _generate(model, inputs, cache)
    model = tiny_lm("llama", "sdpa")
    _compile(model, {**SPARSE, "index_cache": True})
    _, fp32_stats = _generate(model, inputs, cache)

    real = Indexer.project_keys

    def rounded(self, k):
        packed = torch.ops.dsa.pack_index_keys(real(self, k))
        return dequantize_index_keys(packed).to(k.dtype)

    monkeypatch.setattr(Indexer, "project_keys", rounded)
    model = tiny_lm("llama", "sdpa")
    _compile(model, {**SPARSE, "index_cache": False})
    want, _ = _generate(model, inputs, cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = model.config
    _, d_i = default_index_shape(c.num_attention_heads, c.num_key_value_heads,
                                 c.hidden_size // c.num_attention_heads)
    if cache == "static":  # fixed buffers (a dynamic cache's live tensors vary with gc)
        assert stats["bytes"] * 4 * d_i == fp32_stats["bytes"] * (d_i + 4)
    assert 0 < stats["bytes"] < fp32_stats["bytes"]


def test_fp8_cache_option_is_validated():
    with pytest.raises(ValueError, match="index_cache_fp8 must be True or False"):
        DSAConfig(index_cache_fp8="yes")
