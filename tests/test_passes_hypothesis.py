"""Property tests: over generated attention graphs, the rewrite is exact or absent.

With top_k >= every visible key and the sparse path forced, a rewritten graph must
give the dense output; a graph the passes reject must be left without DSA ops.
"""

import models as M  # tests/ is on sys.path (rootdir conftest)
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsa_compile
from dsa_compile import DSAConfig

EXACT = DSAConfig(top_k=4096, dense_below=0)
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _check(model, args, dtype, valid_from=0):
    model = model.to(dtype).eval()
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    g = dsa_compile.apply(model, args, EXACT)
    has_dsa = any(n.target is torch.ops.dsa.attention.default for n in g.graph.nodes)
    (site,) = g.dsa_report.sites
    assert has_dsa == site.rewritten, str(g.dsa_report)
    with torch.no_grad():
        ref, out = model(*args), g(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if site.rewritten:
        torch.testing.assert_close(out[:, valid_from:], ref[:, valid_from:], atol=tol, rtol=tol)
    else:
        torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)
    return site


@SETTINGS
@given(
    scale_on=st.sampled_from(["scores", "q", "div"]),
    mask=st.sampled_from(["none", "causal_where", "causal_add", "padding", "causal_padding"]),
    heads=st.sampled_from([(4, 4, "none"), (4, 2, "repeat_kv"), (4, 1, "repeat_interleave"),
                           (8, 2, "repeat_kv")]),
    product=st.sampled_from(["matmul", "einsum"]),
    upcast=st.booleans(),
    length=st.sampled_from([7, 13, 33]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_hand_written_exact_or_untouched(scale_on, mask, heads, product, upcast, length, dtype):
    h, hkv, gqa = heads
    model = M.HandAttention(dim=32, heads=h, kv_heads=hkv, scale_on=scale_on, mask=mask,
                            gqa=gqa, product=product, upcast=upcast)
    x = torch.randn(2, length, 32)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, :3] = False
    site = _check(model, (x, key_mask), dtype, valid_from=3 if mask == "causal_padding" else 0)
    assert site.rewritten, site.reason      # every generated form is supported
    assert site.num_kv_heads == hkv


@SETTINGS
@given(
    causal=st.booleans(),
    mask=st.sampled_from([None, "bool", "additive", "alibi"]),
    kv_heads=st.sampled_from([1, 2, 4]),
    scale=st.sampled_from([None, 0.25]),
    length=st.sampled_from([5, 19]),
)
def test_sdpa_exact_or_untouched(causal, mask, kv_heads, scale, length):
    if causal and mask is not None:
        mask = None                          # SDPA forbids is_causal with attn_mask
    model = M.SDPAAttention(dim=32, heads=4, kv_heads=kv_heads, causal=causal, mask=mask,
                            scale=scale)
    x = torch.randn(2, length, 32)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[0, -2:] = False
    site = _check(model, (x, key_mask), torch.float32)
    assert site.rewritten == (mask != "alibi"), site.reason
