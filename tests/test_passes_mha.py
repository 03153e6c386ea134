"""nn.MultiheadAttention / nn.TransformerEncoder through the passes: exact, sparse, negatives.

Dynamo keeps these modules' attention as one opaque call (F.multi_head_attention_forward,
torch._transformer_encoder_layer_fwd, or torch._native_multi_head_attention); the MHA
pass decomposes it around ``torch.ops.dsa.attention``. With top_k >= every key and the
sparse path forced, the rewritten model must give the dense model's output.
"""

import dataclasses
from collections.abc import Callable

import models as M  # tests/ is on sys.path (rootdir conftest)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsa_compile
from dsa_compile import DSAConfig
from dsa_compile.backends import dynamo as backend
from dsa_compile.passes import COUNTERS

EXACT = DSAConfig(top_k=4096, dense_below=0)     # top_k >= every key, sparse path forced
DSA_OP = torch.ops.dsa.attention.default
OPAQUE = (F.multi_head_attention_forward, torch._transformer_encoder_layer_fwd,
          torch._native_multi_head_attention)
ENCODER = ("encoder.layers.0.self_attn", "encoder.layers.1.self_attn")
PAD = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dataclasses.dataclass
class Case:
    """A model and how to call it.

    pad: key padding of batch row 1 ('none' | 'left' | 'right'). Query rows that see no
    key (causal + left padding: dense gives NaN) and, for a nested-tensor encoder, padded
    rows (eager writes 0 there) are not compared.
    """

    build: Callable
    names: tuple = ("attn",)
    pad: str = "none"
    batch_first: bool = True
    causal: bool = False
    nested: bool = False
    mask_input: bool = False
    memory: int = 0           # cross-attention: key length (the padding applies to it)

    def inputs(self, length: int):
        x = torch.randn(2, length, 32)
        keys = self.memory or length
        pad = torch.zeros(2, keys, dtype=torch.bool)
        if self.pad == "left":
            pad[1, :PAD] = True
        elif self.pad == "right":
            pad[1, -PAD:] = True
        kwargs = {"x": self._layout(x)}
        if self.pad != "none":
            kwargs["key_padding_mask"] = pad
        if self.mask_input:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        if self.memory:
            kwargs["memory"] = self._layout(torch.randn(2, self.memory, 24))
        valid = torch.ones(2, length, dtype=torch.bool)
        if self.causal and self.pad == "left":
            valid[1, :PAD] = False
        if self.nested:
            valid &= ~pad
        return kwargs, valid

    def _layout(self, t):
        return t if self.batch_first else t.transpose(0, 1)

    def assert_close(self, out, ref, valid):
        out, ref = self._layout(out), self._layout(ref)     # -> [B, L, E]
        torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


CASES = {
    "mha_batch_first": Case(lambda: M.MHABlock()),
    "mha_seq_first_unused_weights": Case(
        lambda: M.MHABlock(batch_first=False, weights="unused"), batch_first=False),
    "mha_padding_unused_weights": Case(lambda: M.MHABlock(weights="unused"), pad="left"),
    "mha_causal_bool_bool_padding": Case(lambda: M.MHABlock(mask="causal_bool"), pad="left",
                                         causal=True),
    "mha_seq_first_causal_float_float_padding": Case(
        lambda: M.MHABlock(batch_first=False, mask="causal_float", padding="float",
                           weights="unused"), pad="right", batch_first=False, causal=True),
    "mha_causal_buffer": Case(lambda: M.MHABlock(mask="causal_buffer", weights="unused"),
                              causal=True),
    "mha_is_causal_hint_on_input_mask": Case(lambda: M.MHABlock(mask="input", is_causal=True),
                                             mask_input=True, causal=True),
    "mha_cross_kdim_padding": Case(lambda: M.MHABlock(cross=True, kdim=24, vdim=24),
                                   pad="right", memory=17),
    # Called by the root module itself: the site is named after it ('').
    "native_fast_path_padding": Case(lambda: M.NativeMHA(), ("",), pad="left"),
    "native_fast_path_causal_padding": Case(lambda: M.NativeMHA(mask="causal_padding"), ("",),
                                            pad="right", causal=True),
    "encoder_causal_float_padding": Case(lambda: M.Encoder(causal="float"), ENCODER,
                                         pad="right", causal=True),
    "encoder_causal_bool_padding": Case(lambda: M.Encoder(causal="bool"), ENCODER,
                                        pad="right", causal=True),
    "encoder_norm_first_gelu_padding": Case(
        lambda: M.Encoder(norm_first=True, activation="gelu"), ENCODER, pad="left"),
    "encoder_seq_first_causal": Case(lambda: M.Encoder(batch_first=False, causal="float"),
                                     ENCODER, batch_first=False, causal=True),
    "encoder_nested_padding": Case(lambda: M.Encoder(nested=True), ENCODER, pad="left",
                                   nested=True),
}


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("length", [13, 7])
@pytest.mark.parametrize("form", list(CASES))
def test_apply_exact(form, length):
    case = CASES[form]
    model = case.build().eval()
    kwargs, valid = case.inputs(length)
    before = COUNTERS.copy()
    g = dsa_compile.apply(model, kwargs, EXACT)
    report = g.dsa_report
    assert [s.name for s in report.sites] == list(case.names), str(report)
    assert all(s.rewritten for s in report.sites), str(report)
    assert sum(COUNTERS.values()) == sum(before.values()) + len(case.names)
    targets = _targets(g)
    assert targets.count(DSA_OP) == len(case.names)
    assert not any(t in OPAQUE for t in targets)
    with torch.no_grad():
        ref, out = model(**kwargs), g(**kwargs)
    case.assert_close(out, ref, valid)


@pytest.mark.parametrize("form", ["mha_causal_bool_bool_padding",
                                  "mha_seq_first_causal_float_float_padding",
                                  "encoder_causal_bool_padding", "encoder_nested_padding"])
def test_compile_exact(form):
    case = CASES[form]
    model = case.build().eval()
    kwargs, valid = case.inputs(11)
    with torch.no_grad():
        ref = model(**kwargs)
        out = torch.compile(model, backend="dsa", options={"top_k": 4096, "dense_below": 0},
                            fullgraph=True)(**kwargs)
    assert [(r.name, r.rewritten) for r in backend.DEFAULT.last.sites] == \
        [(n, True) for n in case.names], backend.DEFAULT.last.sites
    case.assert_close(out, ref, valid)


def test_small_top_k_changes_output_and_explain_lists_every_site():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 24, 32)
    sparse = DSAConfig(top_k=4, dense_below=0)
    report = dsa_compile.explain(model, (x,), sparse)
    assert [s.name for s in report.sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(s.rewritten and s.kind == "encoder_layer" for s in report.sites)
    assert "2 of 2 attention sites rewritten" in str(report)
    g = dsa_compile.apply(model, (x,), sparse)
    with torch.no_grad():
        assert (g(x) - model(x)).abs().max() > 1e-3


def test_compile_small_top_k_changes_output():
    model = M.MHABlock(mask="causal_float", weights="unused").eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="dsa", options={"top_k": 4, "dense_below": 0})(x)
    assert [(r.name, r.rewritten) for r in backend.DEFAULT.last.sites] == [("attn", True)]
    assert (out - ref).abs().max() > 1e-3


def _causal_input(x):
    return {"x": x, "attn_mask": nn.Transformer.generate_square_subsequent_mask(x.shape[1])}


NEGATIVE = {
    "training_dropout": (lambda: M.MHABlock(dropout=0.1).train(), None,
                         "training-mode dropout"),
    "weights_used": (lambda: M.MHABlock(weights="averaged"), None,
                     "attention weights output (average_attn_weights=True) is used"),
    "per_head_weights_used": (lambda: M.MHABlock(weights="per_head"), None,
                              "average_attn_weights=False"),
    "alibi_float_mask": (lambda: M.MHABlock(mask="alibi"), None, "not provably a mask"),
    "mask_is_a_model_input": (lambda: M.MHABlock(mask="input"), _causal_input, "model input"),
    "float_padding_input": (lambda: M.MHABlock(),
                            lambda x: {"x": x, "key_padding_mask": torch.zeros(2, x.shape[1])},
                            "pass a bool mask"),
    "per_head_3d_mask": (lambda: M.MHABlock(mask="per_head"), None, "3-D attn_mask"),
    "bias_kv": (lambda: M.MHABlock(add_bias_kv=True), None, "bias_k is set"),
    "zero_attn": (lambda: M.MHABlock(add_zero_attn=True), None, "add_zero_attn"),
    "encoder_training": (lambda: M.Encoder().train(), None, "training-mode dropout"),
}


@pytest.mark.parametrize("form", list(NEGATIVE))
def test_unprovable_forms_stay_dense(form):
    build, inputs, reason = NEGATIVE[form]
    model = build()
    x = torch.randn(2, 13, 32)
    kwargs = inputs(x) if inputs else {"x": x}
    report = dsa_compile.explain(model, kwargs, EXACT)
    assert report.sites, str(report)
    for site in report.sites:
        assert not site.rewritten and reason in site.reason, str(report)
    g = dsa_compile.apply(model, kwargs, EXACT)
    assert DSA_OP not in _targets(g)
    if not model.training:
        with torch.no_grad():
            torch.testing.assert_close(g(**kwargs), model(**kwargs), atol=0, rtol=0)
