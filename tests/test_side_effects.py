"""Side effects and trusted state survive every pass.

In-place writes (a counter buffer, a KV cache filled by ``index_copy_`` / ``copy_``)
must happen in the DSA graph exactly as in the model; a causal-mask buffer the rewrite
trusted by its value must be watched; masks the passes cannot prove are carried into
the DSA ops by value (sliding windows, strictly causal masks, masks from inputs).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import CausalSelfAttention
from torch import nn

import dsa_compile
from dsa_compile.backends import dynamo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT = {"top_k": 4096, "dense_below": 0}


class CachedAttention(nn.Module):
    """Attention over a hand-written KV cache written in place at ``pos``, plus a call
    counter buffer: three side effects the dense graph has."""

    def __init__(self, write: str = "index_copy_", heads: int = 4, dim: int = 32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads, self.write = heads, write
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("k_cache", torch.zeros(1, heads, 320, dim // heads))
        self.register_buffer("v_cache", torch.zeros(1, heads, 320, dim // heads))

    def forward(self, x, pos):
        self.calls.add_(1)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        if self.write == "index_copy_":
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
        else:
            self.k_cache[:, :, : pos.numel()].copy_(k)
            self.v_cache[:, :, : pos.numel()].copy_(v)
        n = pos.numel()
        return F.scaled_dot_product_attention(q, self.k_cache[:, :, :n], self.v_cache[:, :, :n],
                                              is_causal=True)


@pytest.mark.parametrize("write", ["index_copy_", "copy_"])
def test_in_place_writes_survive_the_backend(write):
    torch.manual_seed(0)
    model = CachedAttention(write).eval()
    x, pos = torch.randn(1, 280, 32), torch.arange(280)
    with torch.no_grad():
        want = model(x, pos)
        want_k = model.k_cache.clone()
    model.calls.zero_()
    model.k_cache.zero_()
    model.v_cache.zero_()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dsa", options=EXACT)
    with torch.no_grad():
        compiled(x, pos)
        got = compiled(x, pos)
    assert dynamo.DEFAULT.last.sites and all(r.rewritten for r in dynamo.DEFAULT.last.sites)
    assert int(model.calls) == 2  # the fit run worked on copies: no third increment
    torch.testing.assert_close(model.k_cache, want_k)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_in_place_writes_survive_apply():
    torch.manual_seed(0)
    model = CachedAttention().eval()
    x, pos = torch.randn(1, 280, 32), torch.arange(280)
    with torch.no_grad():
        want = model(x, pos)
    model.calls.zero_()
    model.k_cache.zero_()
    gm = dsa_compile.apply(model, (x, pos), dsa_compile.DSAConfig(**EXACT))
    assert gm.dsa_report.rewritten
    with torch.no_grad():
        got = gm(x, pos)
    calls = [b for n, b in gm.named_buffers() if n.endswith("calls")]
    assert [int(c) for c in calls] == [1], calls  # one call: the fit run wrote a copy
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_changed_causal_buffer_falls_back_to_dense():
    """nanoGPT trusts its tril buffer; writing another pattern into it must not leave the
    compiled model assuming causal attention."""
    torch.manual_seed(0)
    model = CausalSelfAttention().eval()
    x = torch.randn(2, 40, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dsa", options={"top_k": 8, "dense_below": 0})
    with torch.no_grad():
        compiled(x)
        model.bias.copy_(torch.ones_like(model.bias))  # attend to every key now
        want = model(x)
        with pytest.warns(UserWarning, match="changed in place"):
            got = compiled(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_apply_refuses_to_run_after_its_causal_buffer_changed():
    model = CausalSelfAttention().eval()
    x = torch.randn(2, 40, 32)
    gm = dsa_compile.apply(model, (x,), dsa_compile.DSAConfig(**EXACT))
    with torch.no_grad():
        gm(x)
        model.bias.copy_(torch.ones_like(model.bias))
        with pytest.raises(ValueError, match="run dsa_compile.apply again"):
            gm(x)


def test_unchanged_buffer_write_keeps_the_rewrite():
    """Writing the same causal pattern again (e.g. load_state_dict) keeps DSA."""
    model = CausalSelfAttention().eval()
    x = torch.randn(2, 40, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dsa", options={"top_k": 8, "dense_below": 0})
    with torch.no_grad():
        sparse = compiled(x)
        model.bias.copy_(model.bias.clone())
        again = compiled(x)
    torch.testing.assert_close(again, sparse)
    assert (sparse - model(x)).abs().max() > 1e-4  # still the sparse result


class Masked(nn.Module):
    """Scores masked by a bool pattern built inside forward: strictly causal
    (tril(-1)) or a sliding window, neither of which the structural paths cover."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        n = q.shape[-2]
        i = torch.arange(n)
        if self.kind == "strict":
            keep = torch.ones(n, n, dtype=torch.bool).tril(diagonal=-1)
        else:
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 7)
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("kind", ["strict", "window"])
def test_unprovable_bool_masks_are_carried_exactly(kind):
    q, k, v = (torch.randn(2, 4, 29, 16) for _ in range(3))
    model = Masked(kind)
    with torch.no_grad():
        want = model(q, k, v)
        for options in (EXACT, {}):  # the default options compile too (dense dispatch)
            torch._dynamo.reset()
            got = torch.compile(model, backend="dsa", options=options)(q, k, v)
            assert dynamo.DEFAULT.last.sites[0].rewritten, dynamo.DEFAULT.last.sites
            rows = slice(1, None) if kind == "strict" else slice(None)  # row 0 sees no key
            torch.testing.assert_close(got[:, :, rows], want[:, :, rows], atol=1e-5, rtol=1e-5)
    if kind == "strict":  # the model gives NaN for a query with no key, DSA zeros
        assert want[:, :, 0].isnan().all() and (got[:, :, 0] == 0).all()
        return
    torch._dynamo.reset()
    sparse = torch.compile(model, backend="dsa", options={"top_k": 3, "dense_below": 0})
    assert (sparse(q, k, v) - want).abs().max() > 1e-3


class InputMasked(nn.Module):
    """SDPA with a mask handed in by the caller (bool or additive, any content)."""

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "additive", "bias"])
def test_masks_from_inputs_are_applied_exactly(kind):
    q, k, v = (torch.randn(2, 4, 23, 16) for _ in range(3))
    keep = torch.rand(2, 1, 23, 23) > 0.4
    keep[..., 0] = True  # every query sees a key
    if kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(2, 1, 23, 23).masked_fill(~keep, torch.finfo(torch.float32).min)
        if kind == "bias":  # finite non-zero entries: an arbitrary additive mask
            mask = mask + torch.randn(2, 1, 23, 23).clamp(-2, 2) * keep
    model = InputMasked()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dsa", options=EXACT)
    with torch.no_grad():
        got, want = compiled(q, k, v, mask), model(q, k, v, mask)
        assert dynamo.DEFAULT.last.sites[0].rewritten, dynamo.DEFAULT.last.sites
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        other = mask.flip(-1)  # the next call's mask differs: read at run time
        other[..., -1] = True if kind == "bool" else 0.0
        torch.testing.assert_close(compiled(q, k, v, other), model(q, k, v, other),
                                   atol=1e-5, rtol=1e-5)


def test_fully_masked_additive_row_matches_the_model():
    """An all-finfo.min row: the model averages every key; DSA does the same."""
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 9, 9)
    mask[..., 3, :] = torch.finfo(torch.float32).min
    model = InputMasked()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="dsa", options=EXACT)(q, k, v, mask)
        torch.testing.assert_close(got, model(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_per_head_input_mask_stays_dense_with_a_reason():
    q, k, v = (torch.randn(2, 4, 11, 8) for _ in range(3))
    mask = torch.rand(2, 4, 11, 11) > 0.3
    report = dsa_compile.explain(InputMasked(), (q, k, v, mask), dsa_compile.DSAConfig(**EXACT))
    assert not report.sites[0].rewritten
    assert "shared by all heads" in report.sites[0].reason


class _Writes(nn.Module):
    """Four buffers written four ways: only ``cache`` may be rewritten by a second run."""

    def __init__(self):
        super().__init__()
        for name in ("cache", "counter", "read_first", "twice"):
            self.register_buffer(name, torch.zeros(1, 2, 16, 4))

    def forward(self, x, pos):
        self.cache.index_copy_(2, pos, x)  # a KV cache: written once, read after
        self.counter.add_(1)  # read-modify-write
        early = self.read_first.sum()
        self.read_first.index_copy_(2, pos, x)  # read before the write
        self.twice[:, :, :1].copy_(x[:, :, :1])
        self.twice.index_copy_(2, pos, x)  # two writes
        return self.cache.sum() + self.counter.sum() + early + self.twice.sum()


def test_rerun_safe_roots():
    """The fit run skips the copy only of a root a second run provably rewrites."""
    from dsa_compile.passes.fit import _rerun_safe

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(_Writes(), backend=record, fullgraph=True)(torch.randn(1, 2, 3, 4),
                                                            torch.tensor([1, 5, 7]))
    (gm,) = graphs
    names = {n.name if isinstance(n, torch.fx.Node) else n for n in _rerun_safe(gm)}
    assert len(names) == 1 and "cache" in names.pop()


def test_fit_run_writes_the_kv_cache_in_place(monkeypatch):
    """A decode graph fitted on a long StaticCache runs the fit without copying the K/V
    buffers (at 128K the copy would double the cache), and decodes exactly: the fit
    run's write of this step's keys is overwritten by the real run's."""
    from hf_models import tiny_lm
    from transformers import StaticCache

    from dsa_compile.passes import fit

    safe = []
    real = fit._rerun_safe
    monkeypatch.setattr(fit, "_rerun_safe", lambda gm: safe.append(real(gm)) or safe[-1])
    model = tiny_lm("llama")
    context, steps = 300, 3

    def decode(forward):
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 4)
        ids = torch.randint(1, model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(3))
        out, logits = model(input_ids=ids, past_key_values=cache,
                            cache_position=torch.arange(context)), []
        for i in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = forward(input_ids=nxt, past_key_values=cache,
                          cache_position=torch.tensor([context + i]))
            logits.append(out.logits[:, -1])
        return torch.stack(logits), [layer.keys.clone() for layer in cache.layers]

    with torch.no_grad():
        want, want_keys = decode(model)
        torch._dynamo.reset()
        forward = torch.compile(type(model).forward.__get__(model), backend="dsa",
                                options=EXACT)
        got, got_keys = decode(forward)
    assert any(r.rewritten for r in dynamo.DEFAULT.last.sites)
    assert safe and len(safe[0]) >= 2 * model.config.num_hidden_layers, safe  # K and V
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_keys, want_keys):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
