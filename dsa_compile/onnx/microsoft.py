"""Optional export target: onnxruntime's com.microsoft ``DynamicSparseAttention``.

onnxruntime 1.32 ships DSA-style contrib ops with CUDA and WebGPU kernels only:

- ``SparseAttentionIndexer`` scores *blocks* (policy "qsa": mean-pooled keys of
  ``compress_ratio`` tokens) or *compressed entries* (policy "csa": softmax-gated pooling
  over 2 * compress_ratio tokens), both with RMSNorm and RoPE inside. Neither is the
  token-level lightning indexer I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s]), so
  the selection stays ``dsa.IndexerTopK`` (our function; runs on every provider).
- ``DynamicSparseAttention`` (attention_mode "selected_only", selected_kv_source "main")
  attends each query to ``selected_indices[b * S + t, :selected_counts[...]]``: exactly
  the contract of ``dsa.IndexerTopK``'s output (valid entries first, -1 after).

:func:`to_microsoft` rewrites every ``dsa.Attention`` node of an exported model into

    dsa.IndexerTopK -> com.microsoft.DynamicSparseAttention

for onnxruntime-gpu users. Only prefill without a KV cache is expressed (q_offset 0,
causal, dense_below 0, softcap 0, no key_mask, Dv == D); other nodes raise ValueError.
Not run here: this machine has no CUDA, and onnxruntime's CPU provider has no kernel for
the op, so the rewritten graph is only checked against the installed contrib schema (a
CPU session gets past graph resolution and type inference, then finds no kernel).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from dsa_compile.onnx.functions import DOMAIN, indexer_topk_function

MS_DOMAIN = "com.microsoft"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _replacement(node: onnx.NodeProto, num_heads: int, kv_num_heads: int,
                 prefix: str) -> list[onnx.NodeProto]:
    attrs = _attrs(node)
    unsupported = {name: attrs.get(name, default)
                   for name, default in (("q_offset", 0), ("dense_below", 0), ("softcap", 0.0))
                   if attrs.get(name, default) != default}
    if attrs.get("causal", 1) != 1:
        unsupported["causal"] = attrs["causal"]
    if len(node.input) > 6 and node.input[6]:
        unsupported["key_mask"] = node.input[6]
    if unsupported:
        raise ValueError(f"node {node.name or node.output[0]!r}: DynamicSparseAttention cannot "
                         f"express {unsupported}; export with q_offset 0, causal, dense_below 0, "
                         f"softcap 0 and no key_mask (unpadded input) for the com.microsoft "
                         f"target")
    q, k, v, q_idx, k_idx, w = node.input[:6]
    n = lambda s: f"{prefix}_{s}"  # noqa: E731  (value names local to this node)
    top_k = attrs["top_k"]
    nodes = [
        helper.make_node("IndexerTopK", [q_idx, k_idx, w], [n("indices")], domain=DOMAIN,
                         top_k=top_k, q_offset=0, causal=1,
                         query_chunk=attrs.get("query_chunk", 64)),
        # [B, S, K] -> [B * S, K]; counts of valid (>= 0) entries per row.
        helper.make_node("Constant", [], [n("rows_shape")],
                         value=helper.make_tensor("s", TensorProto.INT64, [2], [-1, top_k])),
        helper.make_node("Reshape", [n("indices"), n("rows_shape")], [n("selected")]),
        helper.make_node("Constant", [], [n("zero")],
                         value=helper.make_tensor("z", TensorProto.INT32, [], [0])),
        helper.make_node("GreaterOrEqual", [n("selected"), n("zero")], [n("valid")]),
        helper.make_node("Cast", [n("valid")], [n("valid_i")], to=TensorProto.INT32),
        helper.make_node("Constant", [], [n("last")],
                         value=helper.make_tensor("l", TensorProto.INT64, [1], [-1])),
        helper.make_node("ReduceSum", [n("valid_i"), n("last")], [n("counts")], keepdims=0),
        # BNSH [B, H, S, D] -> [B, S, H * D]
        *[helper.make_node("Transpose", [x], [n(f"{x}_bsnh")], perm=[0, 2, 1, 3])
          for x in (q, k, v)],
        helper.make_node("Constant", [], [n("packed")],
                         value=helper.make_tensor("p", TensorProto.INT64, [3], [0, 0, -1])),
        *[helper.make_node("Reshape", [n(f"{x}_bsnh"), n("packed")], [n(f"{x}_bsh")])
          for x in (q, k, v)],
        # seqlens_k = S - 1 per batch entry, total_sequence_length = S (no cache).
        helper.make_node("Shape", [n(f"{q}_bsh")], [n("bs")], start=0, end=2),
        helper.make_node("Cast", [n("bs")], [n("bs32")], to=TensorProto.INT32),
        helper.make_node("Split", [n("bs32")], [n("batch"), n("seq")], num_outputs=2),
        helper.make_node("Constant", [], [n("one")],
                         value=helper.make_tensor("o", TensorProto.INT32, [1], [1])),
        helper.make_node("Sub", [n("seq"), n("one")], [n("seq_m1")]),
        helper.make_node("Cast", [n("batch")], [n("batch64")], to=TensorProto.INT64),
        helper.make_node("Expand", [n("seq_m1"), n("batch64")], [n("seqlens_k")]),
        helper.make_node(
            "DynamicSparseAttention",
            [n(f"{q}_bsh"), n(f"{k}_bsh"), n(f"{v}_bsh"), "", "", "", "", n("selected"),
             n("counts"), n("seqlens_k"), n("seq")],
            [n("out_bsh")], domain=MS_DOMAIN, num_heads=num_heads, kv_num_heads=kv_num_heads,
            scale=float(attrs["scale"]), is_causal=1, attention_mode="selected_only",
            selected_kv_source="main"),
        # [B, S, Hq * D] -> [B, Hq, S, D]
        helper.make_node("Constant", [], [n("heads")], value=helper.make_tensor(
            "h", TensorProto.INT64, [4], [0, 0, num_heads, -1])),
        helper.make_node("Reshape", [n("out_bsh"), n("heads")], [n("out_bsnh")]),
        helper.make_node("Transpose", [n("out_bsnh")], [node.output[0]], perm=[0, 2, 1, 3]),
    ]
    return nodes


def to_microsoft(model: onnx.ModelProto, heads: dict[str, tuple[int, int]] | None = None,
                 num_heads: int | None = None, kv_num_heads: int | None = None,
                 ) -> onnx.ModelProto:
    """A copy of ``model`` with each ``dsa.Attention`` as IndexerTopK + DynamicSparseAttention.

    Args:
        model: a :func:`dsa_compile.onnx.export` result.
        heads: {node output name: (num_heads, kv_num_heads)}; or give ``num_heads`` and
            ``kv_num_heads`` for every node (the contrib op needs them as attributes).

    Raises:
        ValueError: a node the contrib op cannot express, or unknown head counts.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    new_nodes = []
    for i, node in enumerate(out.graph.node):
        if node.domain != DOMAIN or node.op_type != "Attention":
            new_nodes.append(node)
            continue
        hq, hkv = (heads or {}).get(node.output[0], (num_heads, kv_num_heads))
        if hq is None or hkv is None:
            raise ValueError(f"node {node.output[0]!r}: give num_heads and kv_num_heads")
        new_nodes.extend(_replacement(node, hq, hkv, f"ms{i}"))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    kept = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend([*kept, indexer_topk_function()])
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out
