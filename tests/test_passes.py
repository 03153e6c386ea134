"""The FX passes through dsa_compile.apply / explain: exactness, negatives, export."""

import models as M  # tests/ is on sys.path (rootdir conftest)
import pytest
import torch
import torch.nn.functional as F

import dsa_compile
from dsa_compile import DSAConfig
from dsa_compile.passes import COUNTERS

EXACT = DSAConfig(top_k=4096, dense_below=0)   # top_k >= every visible key, sparse path forced


def _inputs(length=13, pad=4):
    x = torch.randn(2, length, 32)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, :pad] = False
    return x, key_mask


def _close_on_valid_rows(out, ref, valid_rows=None):
    """Compare, skipping query rows that see no key (dense gives NaN/uniform there)."""
    if valid_rows is not None:
        out, ref = out[valid_rows], ref[valid_rows]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


HAND_FORMS = {
    "nanogpt": lambda: (M.CausalSelfAttention(), False),
    "matmul_scores_repeat_kv": lambda: (M.HandAttention(), False),
    "einsum_q_scale_interleave_add_upcast": lambda: (M.HandAttention(
        scale_on="q", product="einsum", gqa="repeat_interleave", mask="causal_add",
        upcast=True), False),
    "div_scale_causal_padding": lambda: (M.HandAttention(scale_on="div",
                                                         mask="causal_padding"), True),
    "padding_only_mha": lambda: (M.HandAttention(mask="padding", gqa="none", kv_heads=4), True),
    "sdpa_causal_gqa": lambda: (M.SDPAAttention(), False),
    "sdpa_bool_mask": lambda: (M.SDPAAttention(causal=False, mask="bool"), True),
    "sdpa_additive_mask_scale": lambda: (M.SDPAAttention(causal=False, mask="additive",
                                                         scale=0.3), True),
}


@pytest.mark.parametrize("form", list(HAND_FORMS))
def test_apply_exact_hand_written(form):
    model, uses_mask = HAND_FORMS[form]()
    model.eval()
    x, key_mask = _inputs()
    args = (x, key_mask) if uses_mask else (x,)
    before = COUNTERS.copy()
    g = dsa_compile.apply(model, args, EXACT)
    assert [s.rewritten for s in g.dsa_report.sites] == [True], str(g.dsa_report)
    assert sum(COUNTERS.values()) == sum(before.values()) + 1
    assert any(n.target is torch.ops.dsa.attention.default for n in g.graph.nodes)
    with torch.no_grad():
        ref, out = model(*args), g(*args)
    # causal + padding: queries 0..3 of row 1 see no key at all.
    valid = (slice(None), slice(4, None)) if form == "div_scale_causal_padding" else None
    _close_on_valid_rows(out, ref, valid)


NEGATIVE = {
    "alibi_bias": (lambda: M.SDPAAttention(causal=False, mask="alibi"), "not provably a mask"),
    "probabilities_returned": (lambda: M.ReturnsScores(), "used elsewhere"),
    "training_dropout": (lambda: M.TrainingDropout(), "training-mode dropout"),
    "sdpa_dropout": (lambda: M.SDPAAttention(dropout=0.1), "dropout"),
}


@pytest.mark.parametrize("form", list(NEGATIVE))
def test_unprovable_forms_stay_dense(form):
    build, reason = NEGATIVE[form]
    model = build().eval()
    x, key_mask = _inputs()
    report = dsa_compile.explain(model, (x, key_mask))
    assert len(report.sites) == 1
    site = report.sites[0]
    assert not site.rewritten and reason in site.reason, str(report)
    g = dsa_compile.apply(model, (x, key_mask), EXACT)
    assert not any(n.target is torch.ops.dsa.attention.default for n in g.graph.nodes)


def test_multihead_attention_is_found_and_rewritten():
    """Deeper MHA coverage (masks, encoder layers, negatives) is in test_passes_mha.py."""
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 13, 32)
    report = dsa_compile.explain(lambda_module(mha), (x,))
    assert [(s.name, s.rewritten) for s in report.sites] == [("attn", True)]


def lambda_module(mha):
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]
    return Wrap().eval()


@pytest.mark.parametrize("name,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "eager"),
                                       ("gpt2", "sdpa"), ("bert", "sdpa"), ("bert", "eager")])
def test_apply_exact_hugging_face(name, attn):
    model = getattr(M, name)(attn)
    inputs = M.token_inputs(length=11, pad=3)
    g = dsa_compile.apply(model, inputs, EXACT)
    report = g.dsa_report
    assert len(report.sites) == 2 and all(s.rewritten for s in report.sites), str(report)
    with torch.no_grad():
        ref, out = model(**inputs)[0], g(**inputs)[0]
    # Left-padded query rows of a causal model see no key: not compared.
    valid = (slice(None), slice(3, None)) if name != "bert" else None
    _close_on_valid_rows(out, ref, valid)


def test_small_top_k_changes_output_and_explain_lists_every_site():
    model = M.llama("eager", layers=2)
    inputs = M.token_inputs(length=24, pad=0)
    sparse = DSAConfig(top_k=4, dense_below=0)
    report = dsa_compile.explain(model, inputs, sparse)
    assert [s.name for s in report.sites] == ["model.layers.0.self_attn",
                                             "model.layers.1.self_attn"]
    assert all(s.rewritten for s in report.sites)
    assert "2 of 2 attention sites rewritten" in str(report)
    g = dsa_compile.apply(model, inputs, sparse)
    with torch.no_grad():
        diff = (g(**inputs)[0] - model(**inputs)[0]).abs().max()
    assert diff > 1e-3


def test_config_sites_and_exclude():
    model = M.llama("sdpa", layers=2)
    inputs = M.token_inputs()
    report = dsa_compile.explain(model, inputs, DSAConfig(exclude=("*.layers.1.*",)))
    assert [s.rewritten for s in report.sites] == [True, False]
    assert "exclude" in report.sites[1].reason


def test_applied_module_exports_with_dsa_ops():
    model = M.llama("sdpa", layers=1)
    inputs = M.token_inputs()
    g = dsa_compile.apply(model, inputs, EXACT)
    ep = torch.export.export(g, (), inputs, strict=False)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(torch.ops.dsa.attention.default) == 1


def test_same_model_finds_same_indexer():
    from dsa_compile.indexer import REGISTRY

    model = M.llama("sdpa", layers=2)
    dsa_compile.apply(model, M.token_inputs(length=11), EXACT)
    first = REGISTRY.indexers_of(model)
    dsa_compile.apply(model, M.token_inputs(length=17), EXACT)
    assert set(first) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(REGISTRY.indexers_of(model)[k] is v for k, v in first.items())
    assert first["model.layers.0.self_attn"].anchor_fqns[0].startswith(
        "model.layers.0.self_attn.")


def test_path_normalisation():
    from dsa_compile.passes import normalize_path

    assert normalize_path("L['self'].model.layers[0].self_attn") == "model.layers.0.self_attn"
    assert normalize_path("L['args'][0]._modules['model']._modules['layers']._modules['3']"
                          "._parameters['weight']") == "model.layers.3.weight"


def _dsa_layer():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "dsa_layer.py"
    spec = importlib.util.spec_from_file_location("dsa_layer_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DSALayer


def test_reference_style_dsa_is_lowered_to_dsa_ops():
    layer = _dsa_layer()().eval()
    x = torch.randn(2, 37, 64)
    before = COUNTERS["dsa_reference"]
    g = dsa_compile.apply(layer, (x,))
    (site,) = g.dsa_report.sites
    assert site.rewritten and site.kind == "dsa_reference", str(g.dsa_report)
    assert COUNTERS["dsa_reference"] == before + 1
    targets = {n.target for n in g.graph.nodes}
    assert torch.ops.dsa.indexer_topk.default in targets
    assert torch.ops.dsa.sparse_attention.default in targets
    assert not any(getattr(n, "name", "").startswith("dsa_indexer") for n in g.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(g(x), layer(x), atol=1e-5, rtol=1e-5)


def _einsum_dsa_layer(padded: bool = False):
    """The reference layer with q/k/v kept [B, L, H, D] (einsum products: the operands
    and the output carry permutes), optionally with a key-padding mask as well."""
    base = _dsa_layer()

    class EinsumDSALayer(base):
        def forward(self, x, keep=None):
            b, t, _ = x.shape
            q = self.wq(x).view(b, t, self.h, self.d)
            k = self.wk(x).view(b, t, self.h, self.d)
            v = self.wv(x).view(b, t, self.h, self.d)
            q_i = self.wq_index(x).view(b, t, self.hi, self.di)
            k_i = self.wk_index(x)
            w = self.w_index(x) * self.hi ** -0.5
            index = torch.einsum("bshd,btd->bsht", q_i, k_i).relu()
            index = (index * w[..., None]).sum(dim=2)
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            index = index.masked_fill(~causal, float("-inf"))
            top = index.topk(min(self.top_k, t), dim=-1)[1]
            sparse = torch.full((b, t, t), float("-inf")).scatter(-1, top, 0.0)
            scores = torch.einsum("bshd,bthd->bhst", q, k) * self.d ** -0.5 + sparse[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            if keep is not None:
                scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            out = torch.einsum("bhst,bthd->bshd", F.softmax(scores, dim=-1), v)
            return self.wo(out.reshape(b, t, -1))

    return EinsumDSALayer().eval()


def test_reference_style_dsa_in_einsum_layout_is_lowered_exactly():
    """The reference lowering applies the operands' and the output's layout transforms
    (it used to permute only k)."""
    layer = _einsum_dsa_layer()
    x = torch.randn(2, 37, 64)
    g = dsa_compile.apply(layer, (x,))
    (site,) = g.dsa_report.sites
    assert site.rewritten and site.kind == "dsa_reference", str(g.dsa_report)
    with torch.no_grad():
        torch.testing.assert_close(g(x), layer(x), atol=1e-5, rtol=1e-5)


def test_reference_style_dsa_with_key_padding_stays_dense():
    """The model's own index scores do not see its key padding: such a site is not
    lowered to the reference ops (it used to be, dropping the padding)."""
    layer = _einsum_dsa_layer()
    x = torch.randn(2, 37, 64)
    keep = torch.ones(2, 37, dtype=torch.bool)
    keep[1, -5:] = False  # padding at the end: every query still sees a key
    g = dsa_compile.apply(layer, (x, keep))
    assert not any(s.kind == "dsa_reference" and s.rewritten for s in g.dsa_report.sites), \
        str(g.dsa_report)
    with torch.no_grad():
        torch.testing.assert_close(g(x, keep), layer(x, keep), atol=1e-5, rtol=1e-5)


def test_apply_fits_new_indexers_on_the_example_inputs():
    """apply, like the backend, must not leave the indexers data-free (they would select
    poorly in everything built on it, ONNX export included)."""
    from dsa_compile.indexer import REGISTRY

    model = M.llama("sdpa")
    ids = torch.randint(0, 64, (1, 300))
    gm = dsa_compile.apply(model, (ids,), DSAConfig(top_k=4096, dense_below=0))
    indexers = REGISTRY.indexers_of(model)
    assert len(indexers) == 2 and all(ix.fitted for ix in indexers.values())
    with torch.no_grad():
        torch.testing.assert_close(gm(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)


def test_apply_honours_index_fp8(monkeypatch):
    """config.index_fp8 means under apply what it means under torch.compile: the graph
    runs with the FP8 indexer switched on (read by the CUDA kernels; a probe here)."""
    from dsa_compile import reference
    from dsa_compile.ops import dispatch

    seen = []
    real = reference.indexer_topk
    monkeypatch.setattr(reference, "indexer_topk",
                        lambda *a, **kw: seen.append(dispatch.indexer_fp8()) or real(*a, **kw))
    x = torch.randn(1, 300, 32)
    for fp8 in (False, True):
        model = M.SDPAAttention().eval()
        gm = dsa_compile.apply(model, (x,), DSAConfig(top_k=8, dense_below=0, index_fp8=fp8))
        seen.clear()
        with torch.no_grad():
            gm(x)
        assert seen and set(seen) == {fp8}
        assert not dispatch.indexer_fp8()  # switched off again after the call
