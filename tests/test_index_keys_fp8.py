"""Packed FP8 index keys (reference/index_keys.py): the format, every op and kernel that
reads ``k_idx``, and the FP8 index-key cache of compiled generation.

The contract: a packed key scores as scale * sum_j w_j ReLU(q_j . k8), i.e. the indexer on
the dequantised key, so selections are exact for the dequantised keys. Kernels run in
Triton's interpreter on CPU (small shapes); ``gpu`` cases add the Llama-3-8B shape.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_decode_kernels import (  # _poison: the decode kernels' outputs start as NaN
    DEVICE,
    TOL,
    _poison,  # noqa: F401
    left_padding,
    positions,
    ref_scores,
    ref_step,
    step_inputs,
)

from dsa_compile import kernels, reference
from dsa_compile.backends.index_cache import IndexKeyStore
from dsa_compile.indexer import Indexer
from dsa_compile.metrics import rel_err
from dsa_compile.reference.index_keys import (
    dequantize_index_keys,
    pack_index_keys,
    unpack_index_keys,
)

decode = importlib.import_module("dsa_compile.kernels.decode")
indexer_module = importlib.import_module("dsa_compile.kernels.indexer_topk")


def test_pack_round_trip_and_layout():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 9, 32, generator=g) * torch.rand(2, 9, 1, generator=g) * 10
    k[0, 3] = 0.0  # an all-zero key
    p = pack_index_keys(k)
    assert p.dtype == torch.uint8 and p.shape == (2, 9, 36) and p.is_contiguous()
    k8, scale = unpack_index_keys(p)
    assert k8.dtype == torch.float8_e4m3fn and scale.shape == (2, 9)
    assert (scale > 0).all() and torch.equal(scale, k.abs().amax(-1).clamp_min(1e-12) / 448)
    err = (dequantize_index_keys(p) - k).abs() / k.abs().amax(-1, keepdim=True).clamp_min(1e-9)
    assert err.max() < 2 ** -3  # e4m3: 3 mantissa bits
    assert (dequantize_index_keys(p)[0, 3] == 0).all()
    # A cache slice (what a StaticCache site reads) unpacks to views of the same bytes.
    k8s, scale_s = unpack_index_keys(p[:, :5])
    assert k8s.data_ptr() == p.data_ptr() and torch.equal(scale_s, scale[:, :5])
    nan = k.clone()
    nan[1, 2, 7] = float("nan")
    assert unpack_index_keys(pack_index_keys(nan))[1][1, 2].isnan()


def test_pack_op_and_checks_refuse_bad_input():
    with pytest.raises(ValueError, match="divisible by 4"):
        torch.ops.dsa.pack_index_keys(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.dsa.pack_index_keys(torch.ones(2, 3, 8, dtype=torch.int64))
    q = torch.randn(1, 2, 2, 16)
    w = torch.rand(1, 2, 2)
    with pytest.raises(ValueError, match="d_I \\+ 4=20"):
        torch.ops.dsa.indexer_topk(q, torch.zeros(1, 5, 16, dtype=torch.uint8), w, 2)
    k = torch.randn(1, 5, 16)
    assert torch.equal(torch.ops.dsa.pack_index_keys(k), pack_index_keys(k))


def test_reference_scores_are_the_dequantised_keys_scores():
    g = torch.Generator().manual_seed(1)
    q, k, w = torch.randn(2, 5, 3, 16, generator=g), torch.randn(2, 11, 16, generator=g), \
        torch.rand(2, 5, 3, generator=g)
    p = pack_index_keys(k)
    got = reference.indexer_scores(q, p, w, 6, True)
    want = reference.indexer_scores(q, dequantize_index_keys(p), w, 6, True)
    fin = want.isfinite()
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got[fin], want[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "left-pad"])
def test_decode_scores_read_packed_keys(lq, masked, dtype):
    b, lk, h, d = 3, 63, 4, 32
    q_idx = torch.randn(b, lq, h, d, device=DEVICE).to(dtype)
    k_idx = pack_index_keys(torch.randn(b, lk, d, device=DEVICE) * 3)
    w = (torch.rand(b, lq, h, device=DEVICE) - 0.2).to(dtype)
    q_pos = positions(b, lq, lk).to(DEVICE)
    key_mask = left_padding(b, lk).to(DEVICE) if masked else None
    got = decode.decode_index_scores(q_idx, k_idx, w, q_pos, key_mask)
    ref = ref_scores(q_idx, k_idx, w, q_pos, key_mask)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and not got.isnan().any()
    fin = ref.isfinite()
    assert rel_err(got[fin], ref[fin]) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("lq", [1, 2, 4])
@pytest.mark.parametrize("shape", ["gqa4-d64", "gqa8-d128"])
def test_decode_step_with_packed_keys_matches_reference(shape, lq):
    b, hq, hkv, d, top_k = {"gqa4-d64": (2, 8, 2, 64, 24), "gqa8-d128": (2, 8, 1, 128, 40)}[shape]
    lk = 63
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 4, 32, torch.float32)
    k_idx = pack_index_keys(k_idx)
    q_pos = positions(b, lq, lk).to(DEVICE)
    key_mask = left_padding(b, lk).to(DEVICE)
    out = decode.decode_attention(q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, q_pos, key_mask)
    ref = ref_step(q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, q_pos, key_mask)
    assert not out.isnan().any() and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-scores", "fp8-scores"])
def test_prefill_indexer_topk_reads_packed_keys(fp8):
    g = torch.Generator().manual_seed(2)
    b, lq, lk, h, d, top_k = 2, 37, 90, 3, 32, 11
    q = torch.randn(b, lq, h, d, generator=g).to(DEVICE)
    k = pack_index_keys(torch.randn(b, lk, d, generator=g).to(DEVICE))
    w = torch.rand(b, lq, h, generator=g).to(DEVICE)
    key_mask = (torch.rand(b, lk, generator=g) > 0.2).to(DEVICE)
    got = kernels.indexer_topk(q, k, w, top_k, lk - lq, True, key_mask, fp8=fp8)
    if fp8:  # exact for the dequantised queries too
        q8, q_scale = indexer_module.quantize_fp8(q)
        q = q8.float() * q_scale[..., None]
    ref = reference.indexer_topk(q, k, w, top_k, lk - lq, True, key_mask)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("lq", [1, 40])
def test_attention_op_with_packed_keys(monkeypatch, lq):
    """dsa.attention takes packed k_idx on the decode kernels (lq = 1, the interpreter
    allowed on CPU) and on the prefill path (lq = 40) and matches the reference op."""
    op = importlib.import_module("dsa_compile.ops.attention")
    from dsa_compile.ops.dispatch import force_reference

    monkeypatch.setattr(op, "DECODE_DEVICES", ("cuda", "cpu"))
    b, hq, hkv, d, top_k, lk = 2, 8, 2, 64, 16, 60
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 4, 32, torch.float32)
    args = (q, k, v, q_idx, pack_index_keys(k_idx), w, top_k, d ** -0.5, True, lk - lq, None,
            0.0, 0)
    out = torch.ops.dsa.attention(*args)
    with force_reference():
        ref = torch.ops.dsa.attention(*args)
    assert not out.isnan().any() and rel_err(out, ref) < TOL[torch.float32]


def test_store_projects_packed_keys_on_a_miss():
    store = IndexKeyStore()
    indexer = Indexer(4, 2, 8)
    k = torch.randn(2, 2, 9, 8)
    packed = store.lookup(k, indexer, torch.uint8)
    assert torch.equal(packed, pack_index_keys(indexer.project_keys(k)))
    store.record(k, packed, indexer)
    assert store.lookup(k, indexer, torch.uint8) is packed
    assert store.stats()["bytes"] == 2 * 9 * (indexer.index_dim + 4)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8])
def test_gpu_decode_step_packed_keys_llama_shape_and_cuda_graph(b):
    hq, hkv, lq, lk, d, top_k = 32, 8, 1, 8192, 128, 2048
    q, k, v, q_idx, k_idx, w = step_inputs(b, hq, hkv, lq, lk, d, 8, 128, torch.bfloat16)
    k_idx = pack_index_keys(k_idx)
    q_pos = torch.full((b, 1), lk - 1, dtype=torch.int32, device=DEVICE)
    q_pos[0] = 5000
    scratch = decode.DecodeScratch.allocate(q, k, v, k_idx, top_k)
    args = (q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, q_pos)
    assert rel_err(decode.decode_attention(*args, scratch=scratch), ref_step(*args, None)) \
        < TOL[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode.decode_attention(*args, scratch=scratch)
    k_idx.copy_(pack_index_keys(torch.randn(b, lk, 128, device=DEVICE)))
    graph.replay()
    assert rel_err(out, ref_step(*args, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [48, 128])
def test_pack_kernel_matches_reference_bytes(d, dtype):
    """The one-launch pack kernel writes the reference's bytes: an odd number of rows (a
    partial last program), a zero key, a NaN key, huge and tiny magnitudes."""
    pack = importlib.import_module("dsa_compile.kernels.index_keys").pack_index_keys
    x = torch.randn(3, 7, d, device=DEVICE) * torch.logspace(-3, 3, 7, device=DEVICE)[:, None]
    x[0, 1] = 0.0
    x[2, 3, 5] = float("nan")
    x = x.to(dtype)
    got, want = pack(x), pack_index_keys(x)
    assert got.shape == want.shape == (3, 7, d + 4) and got.dtype == torch.uint8
    assert torch.equal(got, want)
    assert torch.equal(pack(x[:, 2:5]), pack_index_keys(x[:, 2:5]))  # a strided view


def test_pack_op_runs_the_kernel_on_cuda(monkeypatch):
    """dsa::pack_index_keys dispatches CUDA tensors to the kernel (checked on CPU by
    calling the CUDA registration's body through the interpreter)."""
    ops_mod = importlib.import_module("dsa_compile.ops.index_keys")
    kern = importlib.import_module("dsa_compile.kernels.index_keys")
    calls, real = [], kern.pack_index_keys
    monkeypatch.setattr(kern, "pack_index_keys", lambda x: calls.append(1) or real(x))
    x = torch.randn(2, 5, 16, device=DEVICE)
    if DEVICE == "cuda":
        out = torch.ops.dsa.pack_index_keys(x)
    else:
        out = ops_mod.pack_index_keys._backend_fns["cuda"](x)
    assert calls == [1] and torch.equal(out, pack_index_keys(x))
