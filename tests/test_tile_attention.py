"""The query-tile sparse attention kernel (kernels/tile_attention.py) vs the reference.

Under TRITON_INTERPRET=1 on CPU in CI (tiny shapes), the same cases on a GPU. Outputs
are poisoned with NaN before the kernels write them. Selections are random (the worst
case for tiles) and structured (neighbouring queries share most keys, as real ones do).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from dsa_compile import kernels, reference
from dsa_compile.metrics import rel_err

tile_module = importlib.import_module("dsa_compile.kernels.tile_attention")
sparse_module = importlib.import_module("dsa_compile.kernels.sparse_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(tile_module, "_empty", poisoned)
    monkeypatch.setattr(sparse_module, "_empty", poisoned)


def random_selection(b, g, lq, lk, top_k, q_offset, gen, missing=0.2):
    """[B, G, Lq, top_k] int32, causal (query t sees keys <= q_offset + t), unsorted,
    -1 in unused and some dropped slots; query 0 of batch 0 selects nothing."""
    idx = torch.full((b, g, lq, top_k), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(g):
            for t in range(lq):
                seen = min(lk, max(q_offset + t + 1, 0))
                n = min(top_k, seen)
                row = torch.randperm(seen, generator=gen)[:n]
                row[torch.rand(n, generator=gen) < missing] = -1
                idx[i, j, t, :n] = row.to(torch.int32)
    idx[0, :, 0] = -1
    return idx


def structured_selection(b, g, lq, lk, top_k, q_offset, gen, churn=0.15):
    """Like :func:`random_selection`, but query t keeps query t-1's keys except a
    ``churn`` share, replaced by fresh visible keys (real selections' locality)."""
    idx = torch.full((b, g, lq, top_k), -1, dtype=torch.int32)
    for i in range(b):
        for j in range(g):
            prev: list[int] = []
            for t in range(lq):
                seen = min(lk, max(q_offset + t + 1, 0))
                keep = [s for s in prev if torch.rand(1, generator=gen).item() > churn]
                pool = [s for s in torch.randperm(seen, generator=gen).tolist()
                        if s not in set(keep)]
                row = (keep + pool)[: min(top_k, seen)]
                prev = row
                idx[i, j, t, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return idx


# (B, Hq, Hkv, Lq, Lk, D, top_k, G, dtype, softcap, structured)
CASES = {
    "gqa4-d64-random": (1, 8, 2, 37, 63, 64, 16, 1, torch.float32, 0.0, False),
    "gqa4-d64-structured": (2, 8, 2, 45, 70, 64, 24, 1, torch.float32, 0.0, True),
    "mha-per-head-idx": (1, 4, 4, 9, 40, 128, 8, 4, torch.float32, 0.0, False),
    "gqa8-d128-bf16": (1, 8, 1, 20, 50, 128, 48, 1, torch.bfloat16, 0.0, True),
    "gqa3-softcap-bf16": (1, 9, 3, 19, 33, 64, 12, 1, torch.bfloat16, 5.0, False),
    "mqa1-topk-gt-keys": (1, 1, 1, 70, 70, 64, 80, 1, torch.float32, 0.0, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tile_attention_matches_reference(case):
    b, hq, hkv, lq, lk, d, top_k, g, dtype, softcap, structured = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    make = structured_selection if structured else random_selection
    idx = make(b, g, lq, lk, top_k, lk - lq, gen).to(DEVICE)
    q = torch.randn(b, hq, lq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(DEVICE, dtype)
    scale = d ** -0.5 * 2
    out, lse = kernels.sparse_attention(q, k, v, idx, scale, softcap, tiles=True)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, scale, softcap)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) < TOL[dtype]
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    finite = ~empty
    assert torch.allclose(lse[finite], ref_lse[finite].float(), atol=1e-2 if dtype != torch.float32
                          else 1e-4)


@pytest.mark.parametrize("block_q", [1, 5, 32])
def test_tile_unions_are_the_sorted_union_with_membership(block_q):
    gen = torch.Generator().manual_seed(block_q)
    lq, lk, top_k = 41, 90, 12
    idx = random_selection(2, 1, lq, lk, top_k, lk - lq, gen).to(DEVICE)
    keys, bits, count = tile_module.tile_unions(idx, lk, block_q)
    assert keys.shape[2] == -(-lq // block_q)
    for b in range(2):
        for tile in range(keys.shape[2]):
            rows = idx[b, 0, tile * block_q : (tile + 1) * block_q].cpu()
            want = sorted({int(s) for s in rows.flatten().tolist() if s >= 0})
            n = int(count[b, 0, tile])
            assert keys[b, 0, tile, :n].cpu().tolist() == want
            for key, word in zip(want, bits[b, 0, tile, :n].cpu().tolist(), strict=True):
                members = {j for j in range(rows.shape[0]) if key in rows[j].tolist()}
                assert {j for j in range(32) if (word >> j) & 1} == members


def test_tile_attention_chunks_tiles_and_reuses_scratch(monkeypatch):
    """Several chunks of tiles (a tiny union budget) and more tiles than programs
    (each program's scratch row is zeroed again between tiles), block_q forced odd."""
    monkeypatch.setattr(tile_module, "UNION_BYTES", 8 * 3 * 40)
    gen = torch.Generator().manual_seed(3)
    lq, lk, top_k = 53, 53, 10
    idx = structured_selection(1, 1, lq, lk, top_k, 0, gen).to(DEVICE)
    q = torch.randn(1, 4, lq, 64, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, lk, 64, generator=gen).to(DEVICE)
    v = torch.randn(1, 2, lk, 64, generator=gen).to(DEVICE)
    out, lse = tile_module.tile_sparse_attention(q, k, v, idx, 0.125, block_q=3)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, 0.125)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_dispatch_takes_tiles_for_long_calls_and_the_row_kernel_otherwise(monkeypatch):
    calls = []
    real = tile_module.tile_sparse_attention
    monkeypatch.setattr(tile_module, "tile_sparse_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    lk, top_k = 70, 8
    for lq in (tile_module.TILE_MIN_QUERIES - 1, tile_module.TILE_MIN_QUERIES):
        idx = random_selection(1, 1, lq, lk, top_k, lk - lq, gen).to(DEVICE)
        q = torch.randn(1, 2, lq, 64, generator=gen).to(DEVICE)
        k = torch.randn(1, 1, lk, 64, generator=gen).to(DEVICE)
        out, _ = kernels.sparse_attention(q, k, k, idx, 0.125)
        assert rel_err(out, reference.sparse_attention(q, k, k, idx, 0.125)[0]) < 2e-3
        bias = torch.randn(idx.shape, generator=gen).to(DEVICE)
        kernels.sparse_attention(q, k, k, idx, 0.125, bias=bias)  # a slot bias: per row
    assert calls == [tile_module.TILE_MIN_QUERIES]
    with pytest.raises(ValueError, match="no slot bias"):
        kernels.sparse_attention(q, k, k, idx, 0.125, bias=bias, tiles=True)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_large_unions_go_to_the_row_kernel(monkeypatch, share):
    """The dispatcher's tiles beside the per-query kernel: tiles whose union exceeds
    LARGE_UNION of their slots are served per query (share 0: all, 1: none), decided on
    the device; every output written once (poisoned), all equal to the reference."""
    monkeypatch.setattr(tile_module, "LARGE_UNION", share)
    gen = torch.Generator().manual_seed(11)
    lq, lk, top_k = 70, 90, 12
    idx = torch.cat([structured_selection(1, 1, 40, lk, top_k, lk - lq, gen, churn=0.02),
                     random_selection(1, 1, 30, lk, top_k, lk - 30, gen)], dim=2).to(DEVICE)
    q = torch.randn(1, 8, lq, 64, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, lk, 64, generator=gen).to(DEVICE)
    v = torch.randn(1, 2, lk, 64, generator=gen).to(DEVICE)
    rows_launched = []
    real_rows = sparse_module._rows
    monkeypatch.setattr(sparse_module, "_rows",
                        lambda *a, **kw: rows_launched.append(a[-1]) or real_rows(*a, **kw))
    out, lse = kernels.sparse_attention(q, k, v, idx, 0.125)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, 0.125)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert rows_launched == [int(share * tile_module.block_q_for(4) * top_k)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structured", [False, True])
def test_gpu_tile_attention_real_shapes(dtype, structured):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(7)
    lq, lk, top_k = 1025, 1025, 256
    if structured:
        idx = structured_selection(1, 1, lq, lk, top_k, 0, gen, churn=0.05)
    else:
        idx = random_selection(1, 1, lq, lk, top_k, 0, gen)
    idx = idx.cuda()
    q = torch.randn(1, 32, lq, 128, device="cuda", dtype=dtype)
    k = torch.randn(1, 8, lk, 128, device="cuda", dtype=dtype)
    v = torch.randn(1, 8, lk, 128, device="cuda", dtype=dtype)
    out, lse = kernels.sparse_attention(q, k, v, idx, 128 ** -0.5, tiles=True)
    row_out, row_lse = kernels.sparse_attention(q, k, v, idx, 128 ** -0.5, tiles=False)
    ref_out, _ = reference.sparse_attention(q.float(), k.float(), v.float(), idx, 128 ** -0.5)
    assert rel_err(out, ref_out) < 2e-2
    assert rel_err(out, row_out) < 2e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(row_lse))
