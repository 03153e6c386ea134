"""torch.compile(backend="dsa"): exactness, sparsity, dynamic shapes, fallback."""

import warnings

import models as M  # tests/ is on sys.path (rootdir conftest)
import pytest
import torch

from dsa_compile.backends import dynamo as backend

EXACT = {"top_k": 4096, "dense_below": 0}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(model, options, **kw):
    return torch.compile(model, backend="dsa", options=options, **kw)


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "eager"),
                                       ("bert", "sdpa")])
def test_compile_exact_hugging_face(name, attn):
    model = getattr(M, name)(attn)
    inputs = M.token_inputs(length=13, pad=3)
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = _compile(model, EXACT)(**inputs)[0]
    assert backend.DEFAULT.last.sites and all(r.rewritten for r in backend.DEFAULT.last.sites)
    rows = (slice(None), slice(3, None)) if name != "bert" else (slice(None),)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [M.CausalSelfAttention, M.HandAttention, M.SDPAAttention],
                         ids=["nanogpt", "hand", "sdpa"])
def test_compile_exact_small_modules(build):
    model = build().eval()
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ref = model(x)
        out = _compile(model, EXACT, fullgraph=True)(x)
    assert [r.rewritten for r in backend.DEFAULT.last.sites] == [True]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_small_top_k_changes_output():
    model = M.llama("sdpa")
    inputs = M.token_inputs(length=40, pad=0)
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = _compile(model, {"top_k": 4, "dense_below": 0})(**inputs)[0]
    sites = backend.DEFAULT.last.sites
    assert len(sites) == 2 and all(r.rewritten for r in sites)
    assert (out - ref).abs().max() > 1e-3


def test_backend_object_keeps_each_graphs_report():
    """A DSABackend instance: its options, one report per graph (a recompile adds one,
    the oldest go past ``keep``), and last_report() for the name "dsa"."""
    import dsa_compile

    be = dsa_compile.DSABackend({"top_k": 4, "dense_below": 0}, keep=2)
    assert be.last.sites == [] and be.compiles == 0
    model = M.SDPAAttention().eval()
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for length in (20, 21, 22):  # static shapes: three graphs
            x = torch.randn(1, length, 32)
            assert (compiled(x) - model(x)).abs().max() > 1e-4, "top_k 4 is not sparse"
    assert be.compiles == 3 and len(be.reports) == 2
    assert [r.rewritten for r in be.last.sites] == [True]
    assert "1 of 1 attention sites rewritten" in str(be.last)
    with pytest.raises(ValueError, match="unknown dsa option"):
        dsa_compile.DSABackend({"top_kk": 4})
    with torch.no_grad():
        _compile(model, EXACT)(x)
    assert dsa_compile.last_report() is backend.DEFAULT.last
    assert dsa_compile.last_report().rewritten


def test_dynamic_lengths_compile_once():
    model = M.llama("sdpa", layers=1)
    compiled = _compile(model, {"top_k": 64}, dynamic=True)
    with torch.no_grad():
        compiled(input_ids=torch.randint(0, 64, (1, 128)))
        after_first = backend.DEFAULT.compiles
        for length in (640, 1500, 4096):
            ids = torch.randint(0, 64, (1, length))
            out = compiled(input_ids=ids)[0]
            assert out.shape == (1, length, 64)
    assert backend.DEFAULT.compiles == after_first     # no recompile per length
    assert all(r.rewritten for r in backend.DEFAULT.last.sites)


def test_rewrite_failure_falls_back_to_dense(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("synthetic pass failure")

    monkeypatch.setattr(backend, "run_passes", boom)
    model = M.HandAttention().eval()
    x = torch.randn(2, 11, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _compile(model, EXACT)(x)
    assert any("synthetic pass failure" in str(w.message) for w in caught)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)


def test_unknown_option_raises():
    with pytest.raises(Exception, match="unknown dsa option"):
        _compile(M.HandAttention().eval(), {"topk": 3})(torch.randn(1, 5, 32))


def test_compile_reference_style_dsa_layer():
    from test_passes import _dsa_layer

    layer = _dsa_layer()().eval()
    x = torch.randn(2, 29, 64)
    with torch.no_grad():
        out = _compile(layer, None, fullgraph=True)(x)
    assert [r.kind for r in backend.DEFAULT.last.sites] == ["dsa_reference"]
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_first_compile_fits_the_indexers_on_the_example_inputs(dynamic):
    """A plain torch.compile must not select with data-free projections (SmolLM2: 1.88x
    perplexity): the backend fits each new indexer on the inputs of its first compile."""
    from dsa_compile.indexer import REGISTRY

    model = M.llama("sdpa")
    ids = torch.randint(0, 64, (1, 300))
    with torch.no_grad():
        ref = model(input_ids=ids)[0]
        out = _compile(model, {"top_k": 4096, "dense_below": 0}, dynamic=dynamic)(input_ids=ids)[0]
    indexers = REGISTRY.indexers_of(model)
    assert len(indexers) == 2 and all(ix.fitted for ix in indexers.values())
    assert all(r.rewritten for r in backend.DEFAULT.last.sites)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_compiled_graph_reads_the_live_indexer_parameters():
    """Calibrating after compiling must reach the compiled graph (no frozen copies)."""
    from dsa_compile.indexer import REGISTRY

    model = M.llama("sdpa")
    ids = torch.randint(0, 64, (1, 300))
    compiled = _compile(model, {"top_k": 8, "dense_below": 0})
    with torch.no_grad():
        before = compiled(input_ids=ids)[0]
        for indexer in REGISTRY.indexers_of(model).values():
            indexer.wk.mul_(-1.0)
        after = compiled(input_ids=ids)[0]
    assert backend.DEFAULT.compiles >= 1 and (before - after).abs().max() > 1e-3


def test_index_fp8_option_runs_the_compiled_model_under_fp8_indexer(monkeypatch):
    # On CPU the reference ignores the switch; what is checked is that every indexer
    # call of the compiled model runs with it on, and that it is off again afterwards.
    from dsa_compile import reference
    from dsa_compile.ops import dispatch

    seen = []
    real = reference.indexer_topk

    def spy(*args, **kwargs):
        seen.append(dispatch.indexer_fp8())
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "indexer_topk", spy)
    model = M.llama("sdpa")
    inputs = M.token_inputs(length=40, pad=0)
    with torch.no_grad():
        _compile(model, {"top_k": 8, "dense_below": 0, "index_fp8": True})(**inputs)
    assert seen and all(seen)
    assert dispatch.indexer_fp8() is False
