"""CUDA graphs: ``torch.compile(..., backend="dsa", mode="reduce-overhead")``.

A replayed CUDA graph reads its inputs at the addresses it was recorded with; an input
the graph does not know to be static is copied into place on every replay (the weights
and the KV cache: the whole step's bytes again) and one it writes in place makes
Inductor skip the graph. So the backend must hand Inductor dynamo's static-input marks
(weights, a StaticCache's buffers) through its rewrite, add its own for the index-key
mirrors, and keep a mirror's address when it re-projects one. On CPU the marks are
checked where AOTAutograd reads them; on the GPU the graphs are replayed and must give
what the same compiled model gives without them.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import tiny_lm

from dsa_compile import index_key_cache
from dsa_compile.backends import dynamo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPARSE = {"top_k": 8, "dense_below": 0}


def _decode(model, forward, steps: int, context: int = 23, device: str = "cpu"):
    """Eager prefill of ``context`` tokens into a StaticCache (as ``generate`` runs it),
    then ``steps`` greedy steps through ``forward``: (tokens [1, steps], logits list)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + steps + 4)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, model.config.vocab_size, (1, context), generator=g).to(device)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache,
                    cache_position=torch.arange(context, device=device))
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            out = forward(input_ids=nxt, past_key_values=cache,
                          cache_position=torch.tensor([context + i], device=device))
            logits.append(out.logits[:, -1].float().clone())
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
    return torch.cat(tokens, 1), logits


def test_mode_options():
    assert dynamo.inductor_mode(None) == {}
    assert dynamo.inductor_mode("reduce-overhead") == {"triton.cudagraphs": True}
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        dynamo.inductor_mode("fast")


def test_static_inputs_reach_aot_autograd(monkeypatch):
    """Every large input of a DSA decode graph is static for AOTAutograd: the weights,
    the StaticCache's K/V buffers and the index-key mirrors; only the token ids and
    positions (a few elements) would be copied per replay."""
    import torch._functorch.aot_autograd as aot

    seen = []
    real = aot._try_get_metadata_from_dynamo

    def spy(mod, param_keys, full_args_num, *rest):
        sources, static = real(mod, param_keys, full_args_num, *rest)
        placeholders = list(mod.graph.find_nodes(op="placeholder"))
        seen.append((len(param_keys), placeholders, set(static)))
        return sources, static

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    model = tiny_lm("llama")
    torch._dynamo.reset()
    index_key_cache().clear()
    forward = torch.compile(type(model).forward.__get__(model), backend="dsa",
                            options={**SPARSE, "mode": "reduce-overhead"})
    _decode(model, forward, steps=3)
    assert any(r.rewritten for r in dynamo.DEFAULT.last.sites)
    assert seen
    n_params, placeholders, static = seen[-1]
    assert set(range(n_params)) <= static  # the indexers' own parameters
    mirrors = [i for i, n in enumerate(placeholders) if n.name.startswith("dsa_index_keys")]
    assert len(mirrors) == model.config.num_hidden_layers
    copied = []
    for i, node in enumerate(placeholders):
        value = node.meta.get("val", node.meta.get("example_value"))
        if n_params + i not in static and isinstance(value, torch.Tensor):
            copied.append((node.name, value.numel()))
    assert copied and all(numel <= 4 for _, numel in copied), copied
    assert index_key_cache().stats()["misses"] == model.config.num_hidden_layers


def test_miss_keeps_the_mirror_address():
    """A re-projection of a known cache tensor (a reset, an in-place edit) writes into the
    mirror it had: a CUDA graph recorded with that address stays valid."""
    from dsa_compile.backends.index_cache import IndexKeyStore
    from dsa_compile.indexer import Indexer

    store = IndexKeyStore()
    indexer = Indexer(4, 2, 8, index_heads=2, index_dim=6)
    k = torch.randn(1, 2, 9, 8)
    first = store.lookup(k, indexer, torch.float32)
    store.record(k, first, indexer)
    k.mul_(2)  # an edit outside the graph: the entry is stale
    again = store.lookup(k, indexer, torch.float32)
    assert again.data_ptr() == first.data_ptr()
    torch.testing.assert_close(again, indexer.project_keys(k).float())
    assert store.misses == 2


@pytest.mark.gpu
@pytest.mark.parametrize("options", [SPARSE, {"top_k": 4096, "dense_below": 0}],
                         ids=["sparse", "full-top-k"])
def test_cudagraph_decode_matches(options):
    """Replayed CUDA graphs of DSA decode steps (decode kernels, index-key cache) give
    the tokens and logits of the same compiled model without CUDA graphs; with top_k
    covering every key, those of the dense model. No graph is skipped."""
    from torch._dynamo.utils import counters

    model = tiny_lm("llama").cuda()
    runs = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        index_key_cache().clear()
        counters.clear()
        opts = dict(options, **({"mode": mode} if mode else {}))
        forward = torch.compile(type(model).forward.__get__(model), backend="dsa",
                                options=opts)
        runs[mode] = _decode(model, forward, steps=8, device="cuda")
        if mode:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
            stats = index_key_cache().stats()
            assert stats["misses"] == model.config.num_hidden_layers
            assert stats["hits"] == model.config.num_hidden_layers * 7
    (t0, l0), (t1, l1) = runs[None], runs["reduce-overhead"]
    assert torch.equal(t0, t1)
    for a, b in zip(l0, l1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if options["top_k"] >= 4096:
        dense_tokens, dense_logits = _decode(model, model.forward, steps=8, device="cuda")
        assert torch.equal(t1, dense_tokens)
        for a, b in zip(l1, dense_logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _skip_unless_inductor_runs_the_recipe(inputs):
    """The same recipe with the stock backend. On torch 2.11 + transformers 5.17 (H100,
    2026-12-07) it fails inside Inductor's cudagraph trees with "TypeError: Pointer
    argument must be either uint64 or have data_ptr method" (a segfault with the static
    CUDA launcher), padded batch or not: an upstream failure that DSA cannot fix, so the
    test says so instead of failing on it."""
    model = tiny_lm("llama").cuda()
    torch._dynamo.reset()
    model.forward = torch.compile(type(model).forward.__get__(model), mode="reduce-overhead")
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=6, do_sample=False,
                           cache_implementation="static")
    except Exception as e:  # noqa: BLE001 -- any failure of the stock recipe
        pytest.skip(f"the stock Inductor recipe fails here too ({type(e).__name__}: {e})")
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
def test_cudagraph_generate_static_cache(monkeypatch):
    """The Hugging Face recipe: a compiled forward (reduce-overhead) and ``generate``
    with a static cache, the prefill compiled too; equal to the compiled model without
    CUDA graphs, no graph skipped. (Inductor's static CUDA launcher is off: where the
    recipe fails upstream it segfaults instead of raising.)"""
    import torch._inductor.config as inductor_config
    from test_hf import _padded_batch
    from torch._dynamo.utils import counters

    if hasattr(inductor_config, "use_static_cuda_launcher"):
        monkeypatch.setattr(inductor_config, "use_static_cuda_launcher", False)

    inputs = {k: v.cuda() for k, v in _padded_batch().items()}
    _skip_unless_inductor_runs_the_recipe(inputs)
    outs = {}
    for mode in (None, "reduce-overhead"):
        model = tiny_lm("llama").cuda()
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(type(model).forward.__get__(model), backend="dsa",
                                      options=dict(SPARSE, **({"mode": mode} if mode else {})))
        with torch.no_grad():
            outs[mode] = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                        cache_implementation="static")
        if mode:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert torch.equal(outs[None], outs["reduce-overhead"])
