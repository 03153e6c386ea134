"""ONNX operator schemas of domain ``dsa`` version 1, registered with ``onnx.defs``.

With these registered, ``onnx.checker.check_model(full_check=True)`` and
``onnx.shape_inference`` understand ``dsa.*`` nodes (types and shapes of every output).
onnxruntime does not need them: it runs the model-local functions of
:mod:`dsa_compile.onnx.functions`.

    dsa.Attention(q, k, v, q_idx, k_idx, w[, key_mask][, q_position]) -> out
        q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv],
        q_idx [B, Lq, H_I, d_I], k_idx [B, Lk, d_I], w [B, Lq, H_I],
        key_mask bool [B, Lk] (optional, True = the key exists),
        q_position int64 [] or [1] (optional, runtime position of query 0; replaces the
        q_offset attribute, named apart from it so exporters can bind both)
        -> out [B, Hq, Lq, Dv]
    dsa.IndexerTopK(q_idx, k_idx, w[, key_mask][, q_position]) -> indices int32 [B, Lq, top_k]
    dsa.SparseAttention(q, k, v, indices [B, G, Lq, K]) -> out [B, Hq, Lq, Dv],
                                                           lse float [B, Hq, Lq]

A node given a key_mask and/or a q_position input runs the function overload that takes
them (``key_mask``, ``q_offset``, ``key_mask+q_offset``; see
:mod:`dsa_compile.onnx.functions`); the schema is the same. Files written before the
q_position input existed validate unchanged (it is a trailing optional input).

Registration is explicit (:func:`register_schemas`, idempotent) so importing the
package changes no global onnx state.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, defs, helper

from dsa_compile.onnx.functions import DEFAULT_QUERY_CHUNK, DOMAIN, VERSION

# The function bodies compute in float32 (their constants are float32): export fp32 models.
_FLOATS = ["tensor(float)"]
_Attr = defs.OpSchema.Attribute
_AttrType = defs.OpSchema.AttrType
_Param = defs.OpSchema.FormalParameter


def _key_mask_param() -> defs.OpSchema.FormalParameter:
    return _Param("key_mask", "tensor(bool)",
                  "[B, Lk], True where the key exists (padding = False); hidden keys are "
                  "never selected nor attended, a query without any key outputs 0",
                  param_option=defs.OpSchema.FormalParameterOption.Optional)


def _q_offset_param() -> defs.OpSchema.FormalParameter:
    return _Param("q_position", "tensor(int64)",
                  "[] or [1], absolute position of query 0 at run time (a decoder's past "
                  "length); replaces the q_offset attribute, which must then be 0",
                  param_option=defs.OpSchema.FormalParameterOption.Optional)


def _dims(ctx, index: int) -> list[onnx.TensorShapeProto.Dimension] | None:
    t = ctx.get_input_type(index)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return list(t.tensor_type.shape.dim)


def _elem(ctx, index: int) -> int:
    return ctx.get_input_type(index).tensor_type.elem_type


def _set(ctx, index: int, elem_type: int, dims) -> None:
    out = helper.make_tensor_type_proto(elem_type, None)
    if dims is not None:
        shape = out.tensor_type.shape
        for d in dims:
            new = shape.dim.add()
            if isinstance(d, int):
                new.dim_value = d
            else:
                new.CopyFrom(d)
    ctx.set_output_type(index, out)


def _attention_out_dims(ctx, q_index: int, v_index: int):
    q, v = _dims(ctx, q_index), _dims(ctx, v_index)
    if q is None or v is None or len(q) != 4 or len(v) != 4:
        return None, None
    return q[:3] + v[3:], q[:3]


def _infer_attention(ctx) -> None:
    out, _ = _attention_out_dims(ctx, 0, 2)
    _set(ctx, 0, _elem(ctx, 0), out)


def _infer_sparse_attention(ctx) -> None:
    out, lse = _attention_out_dims(ctx, 0, 2)
    _set(ctx, 0, _elem(ctx, 0), out)
    _set(ctx, 1, TensorProto.FLOAT, lse)


def _infer_indexer_topk(ctx) -> None:
    q_idx = _dims(ctx, 0)
    top_k = ctx.get_attribute("top_k")
    dims = None
    if q_idx is not None and len(q_idx) == 4 and top_k is not None:
        dims = [*q_idx[:2], top_k.i]
    _set(ctx, 0, TensorProto.INT32, dims)


def _chunk_attr() -> _Attr:
    return _Attr("query_chunk", helper.make_attribute("query_chunk", DEFAULT_QUERY_CHUNK),
                 "Query rows per Loop iteration of the function body (memory/speed knob).")


def _attention_schema() -> defs.OpSchema:
    schema = defs.OpSchema(
        "Attention", DOMAIN, VERSION,
        "DSA attention of one site: lightning indexer -> top-k -> sparse attention. Queries "
        "with at most max(top_k, dense_below) visible keys (dense_below > 0) take exact "
        "attention. Semantics of torch.ops.dsa.attention.",
        inputs=[_Param("q", "T", "[B, Hq, Lq, D]"), _Param("k", "T", "[B, Hkv, Lk, D]"),
                _Param("v", "T", "[B, Hkv, Lk, Dv]"), _Param("q_idx", "T", "[B, Lq, H_I, d_I]"),
                _Param("k_idx", "T", "[B, Lk, d_I]"), _Param("w", "T", "[B, Lq, H_I]"),
                _key_mask_param(), _q_offset_param()],
        outputs=[_Param("out", "T", "[B, Hq, Lq, Dv]")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[
            _Attr("top_k", _AttrType.INT, "keys kept per query", required=True),
            _Attr("scale", _AttrType.FLOAT, "multiplier of q . k", required=True),
            _Attr("causal", helper.make_attribute("causal", 1),
                  "1: query t sees keys <= q_offset + t"),
            _Attr("q_offset", helper.make_attribute("q_offset", 0), "absolute position of query 0"),
            _Attr("softcap", helper.make_attribute("softcap", 0.0), "logit soft-cap, 0 = off"),
            _Attr("dense_below", helper.make_attribute("dense_below", 0),
                  "dense-attention threshold (0 = sparse everywhere)"),
            _chunk_attr(),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_attention)
    return schema


def _indexer_topk_schema() -> defs.OpSchema:
    schema = defs.OpSchema(
        "IndexerTopK", DOMAIN, VERSION,
        "Each query's top_k keys by lightning-indexer score I[t, s] = sum_j w[t, j] * "
        "ReLU(q_idx[t, j] . k_idx[s]); ascending key order, -1 in unused slots, ties to the "
        "smaller key index; keys hidden by key_mask are never selected.",
        inputs=[_Param("q_idx", "T", "[B, Lq, H_I, d_I]"), _Param("k_idx", "T", "[B, Lk, d_I]"),
                _Param("w", "T", "[B, Lq, H_I]"), _key_mask_param(), _q_offset_param()],
        outputs=[_Param("indices", "tensor(int32)", "[B, Lq, top_k]")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[
            _Attr("top_k", _AttrType.INT, "slots per query", required=True),
            _Attr("q_offset", helper.make_attribute("q_offset", 0), "absolute position of query 0"),
            _Attr("causal", helper.make_attribute("causal", 1), "apply the causal mask"),
            _chunk_attr(),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_indexer_topk)
    return schema


def _sparse_attention_schema() -> defs.OpSchema:
    schema = defs.OpSchema(
        "SparseAttention", DOMAIN, VERSION,
        "Attention of query t over keys indices[b, g, t, :] (-1 slots ignored; G = 1 or Hkv). "
        "A query with no valid key gets out 0 and lse -inf.",
        inputs=[_Param("q", "T", "[B, Hq, Lq, D]"), _Param("k", "T", "[B, Hkv, Lk, D]"),
                _Param("v", "T", "[B, Hkv, Lk, Dv]"), _Param("indices", "I", "[B, G, Lq, K]")],
        outputs=[_Param("out", "T", "[B, Hq, Lq, Dv]"),
                 _Param("lse", "tensor(float)", "[B, Hq, Lq]")],
        type_constraints=[("T", _FLOATS, "float tensors"),
                          ("I", ["tensor(int32)", "tensor(int64)"], "index tensors")],
        attributes=[
            _Attr("scale", _AttrType.FLOAT, "multiplier of q . k", required=True),
            _Attr("softcap", helper.make_attribute("softcap", 0.0), "logit soft-cap, 0 = off"),
            _chunk_attr(),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_sparse_attention)
    return schema


def schemas() -> list[defs.OpSchema]:
    """Fresh OpSchema objects of every ``dsa`` op."""
    return [_attention_schema(), _indexer_topk_schema(), _sparse_attention_schema()]


def register_schemas() -> None:
    """Register the ``dsa`` schemas with onnx.defs (once per process)."""
    for schema in schemas():
        if not defs.has(schema.name, schema.since_version, schema.domain):
            defs.register_schema(schema)
