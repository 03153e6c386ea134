"""dsa_compile.onnx: function bodies on onnxruntime vs the PyTorch DSA ops, export, verify.

Every comparison runs the ONNX file in a stock onnxruntime (CPU) and checks it against
``torch.ops.dsa.*`` (whose CPU kernels are the reference) on tie-free random inputs:
outputs to 1e-4 in fp32, selected key sets exactly.
"""

from __future__ import annotations

import os
import warnings

import models  # tests/ is on sys.path (rootdir conftest)
import numpy as np
import onnx
import pytest
import torch

import dsa_compile.onnx as dsa_onnx
from dsa_compile.config import DSAConfig
from dsa_compile.indexer import Indexer
from dsa_compile.onnx import functions
from dsa_compile.onnx.schemas import register_schemas

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _np(*xs):
    return [x.detach().numpy() for x in xs]


def _indexer_inputs(b, lq, lk, h_i, d_i, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, h_i, d_i, generator=g), torch.randn(b, lk, d_i, generator=g),
            torch.rand(b, lq, h_i, generator=g) + 0.1)


def _attn_inputs(b, hq, hkv, lq, lk, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


# --------------------------------------------------------------------------------------
# Function bodies, one node at a time
# --------------------------------------------------------------------------------------

TOPK_CASES = [
    # b, lq, lk, h_i, d_i, top_k, q_offset, causal, chunk
    pytest.param(1, 63, 63, 2, 16, 8, 0, True, 16, id="causal-L63-k8"),
    pytest.param(2, 111, 111, 3, 32, 20, 0, True, 32, id="b2-L111-k20"),
    pytest.param(1, 17, 80, 4, 8, 12, 63, True, 8, id="offset63-Lq17-Lk80"),
    pytest.param(1, 40, 29, 2, 16, 50, 0, False, 16, id="noncausal-topk>Lk"),
    pytest.param(1, 33, 33, 1, 64, 64, 0, True, 64, id="topk>visible-chunk>L"),
]


@pytest.mark.parametrize("b,lq,lk,h_i,d_i,top_k,q_offset,causal,chunk", TOPK_CASES)
def test_indexer_topk_function_selects_same_keys(b, lq, lk, h_i, d_i, top_k, q_offset, causal,
                                                 chunk):
    q_idx, k_idx, w = _indexer_inputs(b, lq, lk, h_i, d_i)
    model = functions.op_model("IndexerTopK", top_k=top_k, q_offset=q_offset,
                               causal=int(causal), query_chunk=chunk)
    (got,) = _session(model).run(None, dict(zip(["q_idx", "k_idx", "w"], _np(q_idx, k_idx, w))))
    want = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, top_k, q_offset, causal)
    assert got.dtype == np.int32 and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.numpy())


SPARSE_CASES = [
    # b, hq, hkv, lq, lk, d, top_k, groups, softcap, chunk
    pytest.param(1, 4, 2, 63, 63, 64, 9, 1, 0.0, 16, id="gqa2-d64-G1"),
    pytest.param(2, 6, 3, 37, 111, 128, 16, 3, 0.0, 8, id="gqa2-d128-G=Hkv"),
    pytest.param(1, 8, 1, 20, 45, 64, 7, 1, 5.0, 64, id="mqa-softcap"),
    pytest.param(1, 3, 3, 24, 24, 32, 6, 3, 0.0, 5, id="mha-chunk5"),
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,top_k,groups,softcap,chunk", SPARSE_CASES)
def test_sparse_attention_function_matches_op(b, hq, hkv, lq, lk, d, top_k, groups, softcap,
                                              chunk):
    q, k, v = _attn_inputs(b, hq, hkv, lq, lk, d)
    g = torch.Generator().manual_seed(2)
    indices = torch.stack([torch.randperm(lk, generator=g)[:top_k]
                           for _ in range(b * groups * lq)]).view(b, groups, lq, top_k)
    indices = indices.masked_fill(torch.rand(indices.shape, generator=g) < 0.3, -1)
    indices[:, :, 0] = -1  # a query without any key: out 0, lse -inf
    indices = indices.to(torch.int32)
    scale = d ** -0.5
    model = functions.op_model("SparseAttention", scale=scale, softcap=softcap,
                               query_chunk=chunk)
    out, lse = _session(model).run(None, dict(zip(["q", "k", "v", "indices"],
                                                  _np(q, k, v, indices))))
    want_out, want_lse = torch.ops.dsa.sparse_attention(q, k, v, indices, scale, softcap)
    np.testing.assert_allclose(out, want_out.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(lse, want_lse.numpy(), atol=ATOL, rtol=0)
    assert np.all(out[:, :, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))


ATTENTION_CASES = [
    # b, hq, hkv, lq, lk, d, h_i, d_i, top_k, q_offset, causal, softcap, dense_below, chunk
    pytest.param(1, 9, 3, 111, 111, 64, 3, 48, 16, 0, True, 0.0, 0, 32, id="smol-shape-sparse"),
    pytest.param(2, 4, 2, 63, 63, 128, 2, 16, 8, 0, True, 0.0, 24, 16, id="d128-dense_below24"),
    pytest.param(1, 4, 1, 30, 70, 64, 2, 16, 10, 40, True, 0.0, 45, 8, id="offset40-mixed"),
    pytest.param(1, 4, 4, 40, 40, 64, 2, 16, 64, 0, True, 0.0, 0, 16, id="topk>L"),
    pytest.param(1, 4, 2, 33, 50, 64, 2, 16, 12, 0, False, 0.0, 0, 16, id="noncausal-sparse"),
    pytest.param(1, 4, 2, 33, 50, 64, 2, 16, 12, 0, False, 0.0, 60, 16, id="noncausal-dense"),
    pytest.param(1, 6, 2, 48, 48, 64, 2, 16, 8, 0, True, 4.0, 20, 16, id="softcap-mixed"),
    pytest.param(1, 4, 2, 50, 50, 64, 2, 16, 8, 0, True, 0.0, 100, 16, id="all-dense"),
]


def _force_path(monkeypatch, path: str) -> None:
    """Sparse chunks as one tile over the union of their selections, as one tile over the
    visible keys, or by per-query row gathers (functions' dispatch constants)."""
    monkeypatch.setattr(functions, "GATHER_ABOVE_KEYS", 0 if path == "rows" else 10**9)
    monkeypatch.setattr(functions, "UNION_BELOW_PERCENT", 101 if path == "union" else 0)


PATHS = ["union", "visible", "rows"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,h_i,d_i,top_k,q_offset,causal,softcap,dense_below,"
                         "chunk", ATTENTION_CASES)
def test_attention_function_matches_op(b, hq, hkv, lq, lk, d, h_i, d_i, top_k, q_offset,
                                       causal, softcap, dense_below, chunk, path, monkeypatch):
    _force_path(monkeypatch, path)
    q, k, v = _attn_inputs(b, hq, hkv, lq, lk, d)
    q_idx, k_idx, w = _indexer_inputs(b, lq, lk, h_i, d_i)
    scale = d ** -0.5
    model = functions.op_model("Attention", top_k=top_k, scale=scale, causal=int(causal),
                               q_offset=q_offset, softcap=softcap, dense_below=dense_below,
                               query_chunk=chunk)
    (got,) = _session(model).run(None, dict(zip(["q", "k", "v", "q_idx", "k_idx", "w"],
                                                _np(q, k, v, q_idx, k_idx, w))))
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset,
                                   None, softcap, dense_below)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_attention_function_with_tied_index_scores(path, monkeypatch):
    """Integer index inputs tie many scores (zeros too) at the k-th place: the newest-first
    TopK must fall back to the oldest-first one, ties going to the smaller key."""
    _force_path(monkeypatch, path)
    b, hq, hkv, length, d, top_k = 2, 4, 2, 90, 32, 12
    q, k, v = _attn_inputs(b, hq, hkv, length, length, d)
    q_idx, k_idx, w = _indexer_inputs(b, length, length, 2, 8)
    q_idx, k_idx = q_idx.round(), k_idx.round()
    model = functions.op_model("Attention", top_k=top_k, scale=d ** -0.5, query_chunk=16)
    (got,) = _session(model).run(None, dict(zip(["q", "k", "v", "q_idx", "k_idx", "w"],
                                                _np(q, k, v, q_idx, k_idx, w))))
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, True, 0)
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


def _key_mask(b, lk, seed=3):
    """bool [B, Lk]: row 0 has random holes, the last row is left-padded by a third of Lk
    (its first queries see no key at all)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, lk, generator=g) > 0.2
    mask[-1] = True
    mask[-1, : lk // 3] = False
    return mask


KEY_MASK_CASES = [
    # b, hq, hkv, lq, lk, d, h_i, d_i, top_k, q_offset, causal, dense_below, chunk
    pytest.param(2, 4, 2, 70, 70, 64, 2, 16, 8, 0, True, 0, 16, id="sparse-left-pad"),
    pytest.param(2, 6, 3, 45, 45, 32, 3, 16, 20, 0, True, 0, 8, id="topk>chunk-keys"),
    pytest.param(2, 4, 2, 63, 63, 64, 2, 16, 8, 0, True, 24, 16, id="dense_below24"),
    pytest.param(2, 4, 1, 30, 70, 64, 2, 16, 10, 40, True, 45, 8, id="offset40-mixed"),
    pytest.param(2, 4, 2, 33, 50, 64, 2, 16, 12, 0, False, 0, 16, id="noncausal"),
    pytest.param(2, 4, 2, 50, 50, 64, 2, 16, 8, 0, True, 100, 16, id="all-dense"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,h_i,d_i,top_k,q_offset,causal,dense_below,chunk",
                         KEY_MASK_CASES)
def test_attention_function_with_key_mask_matches_op(b, hq, hkv, lq, lk, d, h_i, d_i, top_k,
                                                     q_offset, causal, dense_below, chunk,
                                                     path, monkeypatch):
    _force_path(monkeypatch, path)
    q, k, v = _attn_inputs(b, hq, hkv, lq, lk, d)
    q_idx, k_idx, w = _indexer_inputs(b, lq, lk, h_i, d_i)
    key_mask = _key_mask(b, lk)
    scale = d ** -0.5
    model = functions.op_model("Attention", key_mask=True, top_k=top_k, scale=scale,
                               causal=int(causal), q_offset=q_offset, dense_below=dense_below,
                               query_chunk=chunk)
    assert model.graph.node[0].overload == functions.KEY_MASK_OVERLOAD
    (got,) = _session(model).run(None, dict(zip(
        ["q", "k", "v", "q_idx", "k_idx", "w", "key_mask"],
        _np(q, k, v, q_idx, k_idx, w, key_mask))))
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset,
                                   key_mask, 0.0, dense_below)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
    if causal and q_offset == 0:  # the left-padded row's first queries see no key: out 0
        assert np.all(got[-1, :, : lk // 3] == 0)


@pytest.mark.parametrize("ties", [False, True], ids=["tie-free", "tied-scores"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_indexer_topk_function_with_key_mask_selects_same_keys(ties, causal):
    b, length, top_k = 2, 90, 12
    q_idx, k_idx, w = _indexer_inputs(b, length, length, 2, 8)
    if ties:  # integer-valued inputs: many equal (and zero) scores, ties go to the smaller key
        q_idx, k_idx = q_idx.round(), k_idx.round()
    key_mask = _key_mask(b, length)
    model = functions.op_model("IndexerTopK", key_mask=True, top_k=top_k, causal=int(causal),
                               query_chunk=16)
    (got,) = _session(model).run(None, dict(zip(["q_idx", "k_idx", "w", "key_mask"],
                                                _np(q_idx, k_idx, w, key_mask))))
    want = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, top_k, 0, causal, key_mask)
    np.testing.assert_array_equal(got, want.numpy())
    selected = got[got >= 0]
    assert selected.size and key_mask.numpy()[np.nonzero(got >= 0)[0], selected].all()


def test_schemas_give_full_check_and_shapes():
    register_schemas()
    model = functions.op_model("IndexerTopK", top_k=7)
    shapes = {"q_idx": [2, "L", 3, 16], "k_idx": [2, "S", 16], "w": [2, "L", 3]}
    del model.graph.input[:], model.graph.output[:]
    model.graph.input.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)
                             for n, s in shapes.items())
    model.graph.node[0].output[0] = "raw"
    model.graph.node.append(onnx.helper.make_node("Identity", ["raw"], ["indices"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "indices", onnx.TensorProto.INT32, ["o0", "o1", "o2"]))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (raw,) = [v for v in inferred.graph.value_info if v.name == "raw"]
    out = raw.type.tensor_type
    assert out.elem_type == onnx.TensorProto.INT32
    assert [d.dim_value or d.dim_param for d in out.shape.dim] == [2, "L", 7]


def test_schema_shapes_of_attention_ops():
    register_schemas()
    f = onnx.TensorProto.FLOAT

    def types(**shapes):
        return {n: onnx.helper.make_tensor_type_proto(f if n != "indices" else
                                                      onnx.TensorProto.INT64, s)
                for n, s in shapes.items()}

    node = onnx.helper.make_node("Attention", ["q", "k", "v", "q_idx", "k_idx", "w"], ["out"],
                                 domain="dsa", top_k=4, scale=0.5)
    got = onnx.shape_inference.infer_node_outputs(
        onnx.defs.get_schema("Attention", 1, "dsa"), node,
        types(q=[1, 8, "L", 64], k=[1, 2, "S", 64], v=[1, 2, "S", 32], q_idx=[1, "L", 2, 16],
              k_idx=[1, "S", 16], w=[1, "L", 2]))
    assert [d.dim_value or d.dim_param for d in got["out"].tensor_type.shape.dim] == [1, 8, "L", 32]
    node = onnx.helper.make_node("SparseAttention", ["q", "k", "v", "indices"], ["out", "lse"],
                                 domain="dsa", scale=0.5)
    got = onnx.shape_inference.infer_node_outputs(
        onnx.defs.get_schema("SparseAttention", 1, "dsa"), node,
        types(q=[1, 8, "L", 64], k=[1, 2, "S", 64], v=[1, 2, "S", 32], indices=[1, 1, "L", 4]))
    assert [d.dim_value or d.dim_param for d in got["lse"].tensor_type.shape.dim] == [1, 8, "L"]
    assert got["lse"].tensor_type.elem_type == f


# --------------------------------------------------------------------------------------
# Export of modules that call the dsa ops
# --------------------------------------------------------------------------------------


class AttentionSite(torch.nn.Module):
    """A GQA attention block whose core is torch.ops.dsa.attention, fed by an Indexer."""

    def __init__(self, width=32, hq=4, hkv=2, d=64, top_k=8, dense_below=0):
        super().__init__()
        self.hq, self.hkv, self.d, self.top_k, self.dense_below = hq, hkv, d, top_k, dense_below
        self.q_proj = torch.nn.Linear(width, hq * d)
        self.k_proj = torch.nn.Linear(width, hkv * d)
        self.v_proj = torch.nn.Linear(width, hkv * d)
        self.o_proj = torch.nn.Linear(hq * d, width)
        self.indexer = Indexer(hq, hkv, d)
        with torch.no_grad():  # tie-free, informative indexer weights
            self.indexer.ww.normal_(0, 0.05)

    def forward(self, x, key_mask=None):
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.hq, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.hkv, self.d).transpose(1, 2)
        q_idx, k_idx, w = self.indexer(q, k)
        out = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, self.top_k, self.d ** -0.5,
                                      True, 0, key_mask, 0.0, self.dense_below)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class SplitSite(torch.nn.Module):
    """indexer_topk + sparse_attention as separate ops; returns the selection too."""

    def __init__(self, top_k=12):
        super().__init__()
        self.top_k = top_k

    def forward(self, q, k, v, q_idx, k_idx, w):
        indices = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, self.top_k, 0, True)
        out, lse = torch.ops.dsa.sparse_attention(q, k, v, indices.unsqueeze(1),
                                                  q.shape[-1] ** -0.5, 0.0)
        return out, lse, indices


@pytest.fixture(scope="module")
def site_file(tmp_path_factory):
    torch.manual_seed(0)
    model = AttentionSite(dense_below=20).eval()
    with torch.no_grad():  # the indexer fits itself on its first long eager call
        model(torch.randn(1, 300, 32))
    assert model.indexer.fitted
    path = tmp_path_factory.mktemp("onnx") / "site.onnx"
    dsa_onnx.export(model, (torch.randn(1, 64, 32),), path, config=DSAConfig(top_k=8),
                    query_chunk=16)
    return model, path


@pytest.mark.parametrize("length", [64, 111, 257, 4096])
def test_exported_site_matches_pytorch_at_any_length(site_file, length):
    model, path = site_file
    session = dsa_onnx.load_session(path)
    x = torch.randn(1, length, 32, generator=torch.Generator().manual_seed(length))
    (got,) = dsa_onnx.run(session, x)
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


def test_exported_site_with_key_mask_matches_pytorch(site_file, tmp_path):
    model, _ = site_file
    x, key_mask = torch.randn(2, 64, 32), _key_mask(2, 64)
    path = tmp_path / "site_mask.onnx"
    dsa_onnx.export(model, (x, key_mask), path, config=DSAConfig(top_k=8), query_chunk=16)
    report = dsa_onnx.verify(path)
    assert report["dsa_nodes"] == {"Attention": 1}
    assert report["functions"] == ["Attention:key_mask"]
    session = dsa_onnx.load_session(path)
    for length in (64, 111, 257):
        x = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
        key_mask = _key_mask(2, length, seed=length)
        (got,) = dsa_onnx.run(session, x, key_mask)
        with torch.no_grad():
            want = model(x, key_mask)
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


def test_verify_reports_dsa_content(site_file):
    _, path = site_file
    report = dsa_onnx.verify(path)
    assert report["dsa_nodes"] == {"Attention": 1}
    assert report["functions"] == ["Attention"]
    assert report["ir_version"] == 10 and report["opsets"] == {"": 23, "dsa": 1}
    assert report["config"]["top_k"] == 8


def test_exported_split_ops_select_same_keys(tmp_path):
    b, hq, hkv, length, d = 1, 6, 3, 70, 64
    args = (*_attn_inputs(b, hq, hkv, length, length, d),
            *_indexer_inputs(b, length, length, 2, 16))
    path = tmp_path / "split.onnx"
    dsa_onnx.export(SplitSite(), args, path, query_chunk=16)
    assert dsa_onnx.verify(path)["dsa_nodes"] == {"IndexerTopK": 1, "SparseAttention": 1}
    for length in (70, 95):
        args = (*_attn_inputs(b, hq, hkv, length, length, d, seed=length),
                *_indexer_inputs(b, length, length, 2, 16, seed=length))
        out, lse, indices = dsa_onnx.run(dsa_onnx.load_session(path), *args)
        want_out, want_lse, want_idx = SplitSite()(*args)
        np.testing.assert_array_equal(indices, want_idx.numpy())
        np.testing.assert_allclose(out, want_out.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(lse, want_lse.numpy(), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------
# Failure modes
# --------------------------------------------------------------------------------------


class DenseScores(torch.nn.Module):
    """Calls torch.ops.dsa.indexer_scores, which has no ONNX form."""

    def forward(self, q_idx, k_idx, w):
        return torch.ops.dsa.indexer_scores(q_idx, k_idx, w, 0, True)


def test_failed_export_names_node_and_keeps_old_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous contents")
    with pytest.raises(dsa_onnx.ExportError, match=r"node 'indexer_scores'.*no ONNX form"):
        dsa_onnx.export(DenseScores(), _indexer_inputs(1, 16, 16, 2, 8), path)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_export_without_dsa_ops_fails_cleanly(tmp_path):
    """No attention at all: apply converts nothing, the SDPA override swaps nothing."""
    path = tmp_path / "dense.onnx"
    with pytest.raises(dsa_onnx.ExportError, match="could be swapped for DSA"):
        dsa_onnx.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),), path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_verify_and_load_refuse_foreign_files(tmp_path):
    plain = tmp_path / "plain.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    onnx.save(onnx.helper.make_model(graph), plain)
    with pytest.raises(ValueError, match="not written by dsa_compile"):
        dsa_onnx.verify(plain)
    with pytest.raises(ValueError, match="not written by dsa_compile"):
        dsa_onnx.load_session(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx at all")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        dsa_onnx.verify(junk)
    with pytest.raises(ValueError, match="does not exist"):
        dsa_onnx.verify(tmp_path / "missing.onnx")


def test_cli_verify(site_file, tmp_path, capsys):
    from dsa_compile.onnx.cli import main

    _, path = site_file
    assert main(["verify", str(path)]) == 0
    assert "Attention" in capsys.readouterr().out
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    assert main(["verify", str(junk)]) != 0


# --------------------------------------------------------------------------------------
# Hugging Face model through dsa_compile.apply
# --------------------------------------------------------------------------------------

def _pytorch_dsa(model, example_args, config, rewrite):
    """The PyTorch DSA model an export used (its "rewrite" in verify's report)."""
    if rewrite == "apply":
        import dsa_compile

        return dsa_compile.apply(model, example_args, config)
    wrapper = dsa_onnx.SDPAOverrideDSA(model, config)
    wrapper.prepare(example_args)
    return wrapper


def test_tiny_llama_through_onnxruntime_matches_pytorch_dsa(tmp_path):
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    model = dsa_onnx.CausalLMLogits(
        transformers.LlamaForCausalLM(cfg).eval()).eval()
    config = DSAConfig(top_k=16, dense_below=0)
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(0))
    # The first eager DSA call on 300 tokens fits the indexers (kept in the registry).
    dsa_onnx.SDPAOverrideDSA(model, config).prepare((ids,))
    path = tmp_path / "llama.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # indexers apply creates afresh never saw data
        dsa_onnx.export(model, (ids[:, :48],), path, config=config, query_chunk=16)
    report = dsa_onnx.verify(path)
    assert report["dsa_nodes"] == {"Attention": 2} and report["rewrite"] == "apply"
    reference = _pytorch_dsa(model, (ids[:, :48],), config, report["rewrite"])
    session = dsa_onnx.load_session(path)
    for length in (48, 77, 130):
        ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
        (got,) = dsa_onnx.run(session, ids)
        with torch.no_grad():
            want = reference(ids)
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)


def test_tiny_llama_with_attention_mask_exports_through_apply(tmp_path):
    pytest.importorskip("transformers")
    import dsa_compile

    torch.manual_seed(0)
    model = dsa_onnx.CausalLMLogits(models.llama(layers=1)).eval()
    config = DSAConfig(top_k=8, dense_below=0)
    fit = models.token_inputs(batch=2, length=128, pad=5)
    args = (fit["input_ids"], fit["attention_mask"])
    reference = dsa_compile.apply(model, args, config)
    with torch.no_grad():  # 2 x 128 tokens: the indexers fit themselves (registry)
        reference(*args)
    inputs = models.token_inputs(batch=2, length=40, pad=5)
    path = tmp_path / "llama_mask.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the SDPA override
        dsa_onnx.export(model, (inputs["input_ids"], inputs["attention_mask"]), path,
                        config=config, query_chunk=16)
    report = dsa_onnx.verify(path)
    assert report["rewrite"] == "apply"
    assert report["dsa_nodes"] == {"Attention": 1}
    assert report["functions"] == ["Attention:key_mask"]
    session = dsa_onnx.load_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for length, pad in ((40, 5), (77, 30), (100, 0)):
        torch.manual_seed(length)
        inputs = models.token_inputs(batch=2, length=length, pad=pad)
        (got,) = dsa_onnx.run(session, inputs["input_ids"], inputs["attention_mask"])
        with torch.no_grad():
            want = reference(inputs["input_ids"], inputs["attention_mask"]).numpy()
        tokens = inputs["attention_mask"].bool().numpy()
        np.testing.assert_allclose(got[tokens], want[tokens], atol=ATOL, rtol=0)


def test_cli_exports_a_saved_hf_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from dsa_compile.onnx.cli import main

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=1, max_position_embeddings=512)
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    out = tmp_path / "tiny.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(folder), "--out", str(out), "--top-k", "8", "--seq-len",
                     "64", "--query-chunk", "16"]) == 0
    assert not [w for w in caught if "SDPA override" in str(w.message)]
    printed = capsys.readouterr().out
    assert '"Attention": 1' in printed and '"rewrite": "apply"' in printed
    (logits,) = dsa_onnx.run(dsa_onnx.load_session(out), torch.randint(0, 97, (1, 90)))
    assert logits.shape == (1, 90, 97) and np.isfinite(logits).all()
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx")]) == 1
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------------------
# Optional com.microsoft target (schema-checked only: no CPU kernel exists)
# --------------------------------------------------------------------------------------


def test_microsoft_target_passes_contrib_schema_checks():
    from dsa_compile.onnx.microsoft import to_microsoft

    model = to_microsoft(functions.op_model("Attention", top_k=8, scale=0.125),
                         num_heads=4, kv_num_heads=2)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("dsa", "IndexerTopK") in ops and ("com.microsoft", "DynamicSparseAttention") in ops
    # Graph resolution and contrib type inference pass; only the CPU kernel is missing.
    with pytest.raises(Exception, match="Could not find an implementation for "
                                        "DynamicSparseAttention"):
        _session(model)
    for node in model.graph.node:  # the same check does reject a wrong input type
        if node.op_type == "Cast" and node.output[0].endswith("valid_i"):
            node.attribute[0].i = onnx.TensorProto.INT64
    with pytest.raises(Exception, match="Type Error"):
        _session(model)


def test_microsoft_target_refuses_what_it_cannot_express():
    from dsa_compile.onnx.microsoft import to_microsoft

    model = functions.op_model("Attention", top_k=8, scale=0.125, dense_below=64)
    with pytest.raises(ValueError, match="dense_below"):
        to_microsoft(model, num_heads=4, kv_num_heads=2)
    model = functions.op_model("Attention", key_mask=True, top_k=8, scale=0.125)
    with pytest.raises(ValueError, match="key_mask"):
        to_microsoft(model, num_heads=4, kv_num_heads=2)
