"""Model-local ONNX function bodies of the ``dsa`` ops, in standard ONNX ops only.

A stock onnxruntime runs a ``dsa.*`` node by inlining the FunctionProto of the same
(domain, name, overload) that the exported model carries, so the file needs nothing
installed besides onnxruntime. Each body walks the queries in chunks of ``query_chunk``
inside a ``Loop``, so memory stays O(chunk * Lk) for the indexer and O(chunk * top_k * D)
for the gathered keys: neither [Lq, Lk] scores nor [Lq, top_k, H, D] gathers exist at once.

Per query chunk (rows t = s .. s + C, absolute position q_offset + t):

    scores  = w . ReLU(q_idx @ k_idx^T)          [B, C, Lk_vis]  (causal: keys <= last row)
    sel     = TopK(scores, min(top_k, Lk_vis))  (-inf scores are hidden keys)
    out     = softmax(scale * q . k[sel]) @ v[sel]

``dsa.Attention`` computes the last line in one of three ways, all exact; the choice is
only speed (onnxruntime CPU runs many tiny GEMMs and row gathers slowly):

- the chunk's rows see at most top_k keys, so each selects every key it can see: no
  indexer or TopK, masked dense attention over the visible keys (one GEMM per KV head
  for the logits, one with V). DSA's dense rows (``dense_below``) take the same path,
  chunk by chunk, so no [Lq, Lk] mask or score matrix exists for them either;
- the chunk as one query tile: the union of its rows' selections (neighbouring queries
  of a real model share most of their keys) is gathered once, or the visible keys are
  read in place where the union is most of them, and [C * R, N] GEMMs per KV head run
  with each row masked to its own selection; used while N is at most GATHER_ABOVE_KEYS;
- beyond that (wide unions: random-like selections over long rows), the selected K and V
  rows are gathered per query ([B, Hkv, C, top_k, D] per chunk).

Key padding: ``key_mask`` (bool [B, Lk], True = the key exists) hides keys from the
indexer and from attention, and a query that sees no key outputs 0, as
``torch.ops.dsa.attention``. onnxruntime cannot run a function body whose optional
input is absent (the body cannot branch on it), so ``dsa.Attention`` and
``dsa.IndexerTopK`` each have two bodies, told apart by the ONNX IR 10 function
``overload``: "" without the input, KEY_MASK_OVERLOAD with it. The exporter sets the
node's overload to match (:func:`overload_of`).

Decoders need the query offset (the past length) at run time, not as the static
``q_offset`` attribute: both ops take an optional last input ``q_position`` (int64 [] or
[1], the attribute must then be 0), which gives two more overloads, Q_OFFSET_OVERLOAD and
KEY_MASK_Q_OFFSET_OVERLOAD. Their bodies also size the query chunk to the rows (a decode
step is one row, not a padded chunk) and let short chunks gather the selected rows
(MASKED_DENSE_MIN_ROWS). A file carries its own bodies and their sha256, so files written
by earlier versions keep running and verifying when the bodies here change.

Attributes are read through top-level ``Constant`` nodes that reference the function's
attributes, and the Loop bodies use those outer-scope values, so no attribute
reference sits inside a subgraph.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "dsa"
VERSION = 1
ONNX_OPSET = 23
# Function overloads of the bodies that take the optional inputs: key_mask, the runtime
# q_offset (int64 [] or [1]; a decoder's past length), or both.
KEY_MASK_OVERLOAD = "key_mask"
Q_OFFSET_OVERLOAD = "q_offset"
KEY_MASK_Q_OFFSET_OVERLOAD = "key_mask+q_offset"

# With a runtime q_offset (decoders), chunks of fewer rows than this always gather the
# selected K/V rows instead of taking the masked-dense path: a decode step (one row)
# then reads top_k rows per KV head, not the whole cache.
MASKED_DENSE_MIN_ROWS = 16

# Query rows per Loop iteration unless the node says otherwise (attribute query_chunk).
# Measured on onnxruntime CPU at L = 8192, top_k = 512: 32 -> 1.52 s, 64 -> 1.36 s,
# 128 -> 1.63 s (larger chunks amortise per-iteration cost, smaller ones stay in cache);
# 96 and 128 were again slower than 64 after the 2026-11-28 changes.
DEFAULT_QUERY_CHUNK = 64

# A sparse query chunk attends as one tile (GEMMs of [C * R, N] per KV head over N keys,
# each row masked to its own selection) where N = min(union of its rows' selections,
# visible keys) is at most GATHER_ABOVE_KEYS; wider ones gather K/V rows per query
# (C x top_k rows, [R, top_k] GEMMs). The tile gathers the union's rows when the union is
# below UNION_BELOW_PERCENT of the visible keys, else it reads the visible keys in place.
# Tuned on onnxruntime CPU, SmolLM2 layer shape (benchmarks/onnx_layer.py).
GATHER_ABOVE_KEYS = 4096
UNION_BELOW_PERCENT = 50

_NEG_INF = float("-inf")

# sha256 of the function bodies earlier releases wrote (keyed by (op, overload)): their
# files run on their own bodies, and verify accepts them beside the bodies written now.
RETIRED_BODIES: dict[tuple[str, str], tuple[str, ...]] = {
    # before 2026-12-07's query tiles and newest-first TopK
    ("Attention", ""): ("5941137f222accb498286fb89105a1c57714598322304d288ecadffc9d4806b3",),
    ("Attention", "key_mask"):
        ("bca2cb15a7382b9ed19f08f643d3d74659e9fee19c94d38df720a3b085ab0a33",),
    ("Attention", "q_offset"):
        ("3b4ecc3430aac451302fc6fd8998af37939b995bb0c6d8dcec5dc8b03e41226a",),
    ("Attention", "key_mask+q_offset"):
        ("6bbdd19387239920231aec8ee84d499610c80d4b4db131e06404bf3cff503012",),
    ("IndexerTopK", ""): ("b7fd69fb92af07c5d5623927a26b1d52cb44df3d496850fd8b947e41ecf38c43",),
    ("IndexerTopK", "key_mask"):
        ("8c06d80346cc52e6eac62d56d08ffcdfaec4724381e4d24fff2505aefc8feaf2",),
    ("IndexerTopK", "q_offset"):
        ("dd226d1257972081cfaeafc6a5817a632d8b340b03eff2334499a707380bbc0e",),
    ("IndexerTopK", "key_mask+q_offset"):
        ("d34635c7f0652e9adb8713daeac075f0cd3a77ec310079f8d627c3b5a50ff008",),
}


class _Body:
    """Tiny builder of a node list with unique value names."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._ids = itertools.count()
        self._prefix = prefix

    def name(self, hint: str) -> str:
        return f"{self._prefix}_{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None,
           **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", hint=hint, value=helper.make_tensor(
            self.name(hint), helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape,
            arr.flatten().tolist()))

    def attr_const(self, attr: str, kind: str) -> str:
        """A Constant whose value is the function attribute ``attr`` (kind int/float)."""
        out = self.name(attr)
        node = helper.make_node("Constant", [], [out])
        field = {"int": ("value_int", AttributeProto.INT),
                 "float": ("value_float", AttributeProto.FLOAT)}[kind]
        node.attribute.append(helper.make_attribute_ref(field[0], field[1], ref_attr_name=attr))
        self.nodes.append(node)
        return out

    def dim(self, x: str, axis: int) -> str:
        """Dimension ``axis`` of x as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1, hint="dim")

    def scalar(self, x: str) -> str:
        return self.op("Squeeze", x, hint="scalar")

    def slice(self, x: str, start: str, end: str, axis: int) -> str:
        return self.op("Slice", x, start, end, self.const([axis]))

    def cat(self, *xs: str) -> str:
        return self.op("Concat", *xs, axis=0)


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


def _attributes(b: _Body, names: dict[str, str]) -> dict[str, str]:
    """int64 [1] / float [] constants for each (attribute, kind)."""
    out = {}
    for attr, kind in names.items():
        c = b.attr_const(attr, kind)
        out[attr] = b.op("Reshape", c, b.const([1])) if kind == "int" else c
    return out


def _chunk_count(b: _Body, rows: str, chunk: str) -> tuple[str, str]:
    """(number of chunks, padded row count), both int64 [1]."""
    one = b.const([1])
    n = b.op("Div", b.op("Sub", b.op("Add", rows, chunk), one), chunk)
    return n, b.op("Mul", n, chunk)


def _pad_rows(b: _Body, x: str, axis: int, rank: int, extra: str, value=None) -> str:
    """Pad ``x`` at the end of ``axis`` by ``extra`` rows (int64 [1]) with ``value`` (0)."""
    zero = b.const([0])
    ends = [zero] * rank
    ends[axis] = extra
    pads = b.op("Concat", *([zero] * rank), *ends, axis=0)
    if value is None:
        return b.op("Pad", x, pads)
    return b.op("Pad", x, pads, value)


def _hidden_keys(b: _Body, kp: str, qpos: str, causal: str, keep: str | None) -> str:
    """bool [1 or B, C, N]: True where a chunk row must not see the key.

    kp: int64 [N] the positions of the keys (ascending, or newest first); qpos: int64
    [C, 1] absolute query positions; causal: bool [1]; keep: bool [B, 1, N] (key_mask, in
    the order of kp) or None.
    """
    hide = b.op("And", b.op("Greater", kp, qpos), causal)               # [C, N]
    if keep is None:
        return b.op("Unsqueeze", hide, b.const([0]))
    return b.op("Or", hide, b.op("Not", keep))                          # [B, C, N]


class _NewestFirst:
    """The index keys and key mask with the key axis reversed (made once, outside the
    query loop), so each chunk scores its visible keys newest first (what
    :func:`_top_k` wants) without reversing its [C, Lk_vis] scores. The visible keys
    0..Lk_vis-1 are the last Lk_vis entries, key Lk_vis-1 first."""

    def __init__(self, b: _Body, k_idx_t: str, keep: str | None, lk: str):
        self.k_idx_t = _reverse(b, k_idx_t, 2)
        # A Gather of Lk-1-j: onnxruntime's optimizer warns on a negative-step Slice inside
        # the loop's branches, and turns a Gather of a Range into a Slice that drops the
        # reversal (a Range with a negative step came out empty).
        if keep is not None:
            ascending = b.op("Range", b.const(0), b.scalar(lk), b.const(1))
            newest = b.op("Sub", b.op("Sub", lk, b.const([1])), ascending)
            keep = b.op("Gather", keep, newest, axis=2)
        self.keep = keep
        self.lk = lk

    def visible(self, b: _Body, lk_vis: str) -> tuple[str, str, str | None]:
        """(k_idx^T [B, d_I, Lk_vis], positions [Lk_vis], keep [B, 1, Lk_vis] or None)."""
        first = b.op("Sub", self.lk, lk_vis)
        keep = None if self.keep is None else b.slice(self.keep, first, self.lk, 2)
        positions = b.op("Range", b.scalar(b.op("Sub", lk_vis, b.const([1]))), b.const(-1),
                         b.const(-1))
        return b.slice(self.k_idx_t, first, self.lk, 2), positions, keep


def _reverse(b: _Body, x: str, axis: int) -> str:
    return b.op("Slice", x, b.const([-1]), b.const([-(2**63)]), b.const([axis]), b.const([-1]))


def _index_scores(b: _Body, qi: str, kt: str, wc: str, lk_vis: str, hidden: str) -> str:
    """Indexer scores of one chunk over Lk_vis keys (in the order kt holds them).

    qi: [B, C, H_I, d_I], kt: [B, d_I, Lk_vis], wc: [B, C, 1, H_I], hidden: bool
    [1 or B, C, Lk_vis]; returns float32 [B, C, Lk_vis], -inf where hidden.
    """
    zero = b.const([0])
    shp = b.op("Shape", qi)
    bc = b.op("Slice", shp, zero, b.const([2]), zero)            # [B, C]
    qf = b.op("Reshape", qi, b.cat(b.op("Slice", shp, zero, b.const([1]), zero),
                                   b.const([-1]), b.op("Slice", shp, b.const([3]), b.const([4]),
                                                       zero)))
    dots = b.op("Relu", b.op("MatMul", qf, kt))                  # [B, C*H_I, Lk_vis]
    dots = b.op("Reshape", dots, b.cat(bc, b.const([-1]), lk_vis))  # [B, C, H_I, Lk_vis]
    sc = b.op("MatMul", wc, dots)                                # [B, C, 1, Lk_vis]
    sc = b.op("Squeeze", sc, b.const([2]))
    return b.op("Where", hidden, b.const(_NEG_INF, np.float32), sc)


def _index_scores_keys_first(b: _Body, qi: str, k_idx: str, wc: str, lk_vis: str,
                             hidden: str) -> str:
    """The same scores as :func:`_index_scores` from k_idx [B, Lk, d_I] as it is stored:
    k_idx @ q^T is [B, Lk, C*H_I], narrow for a few rows, so neither the index-key cache
    nor its transpose is copied (for a decode step they were most of the indexer's bytes).
    """
    zero = b.const([0])
    shp = b.op("Shape", qi)
    bc = b.op("Slice", shp, zero, b.const([2]), zero)                # [B, C]
    batch = b.op("Slice", shp, zero, b.const([1]), zero)
    di = b.op("Slice", shp, b.const([3]), b.const([4]), zero)
    qt = b.op("Transpose", b.op("Reshape", qi, b.cat(batch, b.const([-1]), di)),
              perm=[0, 2, 1])                                         # [B, d_I, C*H_I]
    dots = b.slice(b.op("MatMul", k_idx, qt), zero, lk_vis, 1)       # [B, Lk_vis, C*H_I]
    dots = b.op("Relu", b.op("Reshape", dots, b.cat(batch, lk_vis, b.op(
        "Slice", shp, b.const([1]), b.const([2]), zero), b.const([-1]))))  # [B, Lk_vis, C, H_I]
    w = b.op("Reshape", wc, b.cat(batch, b.const([1]), b.op(
        "Slice", bc, b.const([1]), b.const([2]), zero), b.const([-1])))   # [B, 1, C, H_I]
    sc = b.op("ReduceSum", b.op("Mul", dots, w), b.const([-1]), keepdims=0)  # [B, Lk_vis, C]
    sc = b.op("Transpose", sc, perm=[0, 2, 1])
    return b.op("Where", hidden, b.const(_NEG_INF, np.float32), sc)


def _gather_rows(b: _Body, rows: str, row_base: str, idx: str) -> str:
    """rows: [B*Hkv*Lk, D]; row_base: [B, Hkv, 1, 1]; idx: [B, G, C, K] -> [B, Hkv, C, K, D]."""
    return b.op("Gather", rows, b.op("Add", row_base, idx), axis=0)


def _sparse_chunk(b: _Body, qc: str, k_rows: str, v_rows: str, row_base: str, idx: str,
                  valid: str, softcap: str, with_lse: bool):
    """Attention of one query chunk over its selected keys.

    qc: [B, Hkv, C, R, D] pre-scaled queries; idx: [B, G, C, K] int64 (clamped, >= 0);
    valid: bool [B, G, C, K]. Returns out [B, Hkv, C, R, Dv] (and lse [B, Hkv, C, R]);
    without lse, a row with no valid key is NaN (see :func:`_zero_unseen`).
    """
    kg = _gather_rows(b, k_rows, row_base, idx)                 # [B, Hkv, C, K, D]
    logits = b.op("MatMul", qc, b.op("Transpose", kg, perm=[0, 1, 2, 4, 3]))  # [.., R, K]
    logits = _softcap(b, logits, softcap)
    vmask = b.op("Unsqueeze", valid, b.const([3]))               # [B, G, C, 1, K]
    logits = b.op("Where", vmask, logits, b.const(_NEG_INF, np.float32))
    vg = _gather_rows(b, v_rows, row_base, idx)                 # [B, Hkv, C, K, Dv]
    if not with_lse:
        return b.op("MatMul", b.op("Softmax", logits, axis=-1), vg), None
    m = b.op("ReduceMax", logits, b.const([-1]), keepdims=1)
    finite = b.op("Not", b.op("IsInf", m))
    m = b.op("Where", finite, m, b.const(0.0, np.float32))
    p = b.op("Exp", b.op("Sub", logits, m))
    total = b.op("ReduceSum", p, b.const([-1]), keepdims=1)
    # A query without a valid key has total 0: output 0 and lse -inf, as the reference.
    safe = b.op("Max", total, b.const(np.finfo(np.float32).tiny, np.float32))
    out = b.op("MatMul", b.op("Div", p, safe), vg)
    lse = b.op("Squeeze", b.op("Add", b.op("Log", total), m), b.const([-1]))
    return out, lse


def _selection_bias(b: _Body, idx: str, valid: str, lk_vis: str) -> str:
    """Each chunk row's selection as an additive logit bias: float32 [B, C, Lk_vis], 0.0 at
    the valid slots of idx [B, C, K] (TopK's indices are distinct within a row), else -inf.
    (An Add of a bias shared by the heads is far cheaper on onnxruntime than a Where over
    the [C * R, N] logits.)"""
    ninf = helper.make_tensor("ninf", TensorProto.FLOAT, [1], [_NEG_INF])
    hidden = b.op("ConstantOfShape", b.cat(b.op("Shape", idx, start=0, end=2), lk_vis),
                  value=ninf)
    slot = b.op("Where", valid, b.const(0.0, np.float32), b.const(_NEG_INF, np.float32))
    return b.op("ScatterElements", hidden, idx, slot, axis=2)


def _member_attention(b: _Body, qc: str, keys: str, vals: str, bias: str,
                      softcap: str) -> str:
    """Attention of a chunk over a key set, each row restricted to its own keys.

    qc: [B, Hkv, C, R, D] pre-scaled; keys / vals: [B, Hkv, N, D] / [B, Hkv, N, Dv] (the
    visible keys or the union of the chunk's selections); bias: float32 [1 or B, C, N], 0
    where the row attends to the key, -inf where not. One GEMM per KV head for the logits
    and one with V, [C * R, N] each: what the query-tile kernels do on the GPU. Returns
    [B, Hkv, C, R, Dv] (NaN rows where every key is -inf, see :func:`_zero_unseen`).
    """
    zero = b.const([0])
    shp = b.op("Shape", qc)
    lead = b.op("Slice", shp, zero, b.const([4]), zero)                    # [B, Hkv, C, R]
    two = b.op("Slice", shp, zero, b.const([2]), zero)                     # [B, Hkv]
    n = b.dim(keys, 2)
    qd = b.op("Reshape", qc, b.cat(two, b.const([-1]), b.op("Slice", shp, b.const([4]),
                                                            b.const([5]), zero)))
    logits = b.op("MatMul", qd, b.op("Transpose", keys, perm=[0, 1, 3, 2]))  # [B, Hkv, C*R, N]
    logits = _softcap(b, b.op("Reshape", logits, b.cat(lead, n)), softcap)
    logits = b.op("Add", logits, b.op("Unsqueeze", bias, b.const([1, 3])))
    p = b.op("Reshape", b.op("Softmax", logits, axis=-1), b.cat(two, b.const([-1]), n))
    out = b.op("MatMul", p, vals)                                          # [B, Hkv, C*R, Dv]
    return b.op("Reshape", out, b.cat(lead, b.dim(vals, 3)))


def _tile_chunk(b: _Body, qc: str, k: str, v: str, lk_vis: str, softcap: str, union: str,
                keys: str, bias: str) -> str:
    """A query chunk's attention over the keys its rows selected, as one tile.

    union: bool [1], gather the union ``keys`` (int64 [U], the keys any row selected) and
    attend over them; else attend over every visible key. Either way each row sees only
    its own selection (``bias``, [B, C, Lk_vis]), so both equal the gather path.
    qc: [B, Hkv, C, R, D] pre-scaled.
    """
    def over_union(s: _Body) -> str:
        return _member_attention(s, qc, s.op("Gather", k, keys, axis=2),
                                 s.op("Gather", v, keys, axis=2),
                                 s.op("Gather", bias, keys, axis=2), softcap)

    def over_visible(s: _Body) -> str:
        zero = s.const([0])
        return _member_attention(s, qc, s.slice(k, zero, lk_vis, 2), s.slice(v, zero, lk_vis, 2),
                                 bias, softcap)

    return _if(b, union, over_union, over_visible)


def _visible_chunk(b: _Body, qc: str, k: str, v: str, lk_vis: str, hidden: str,
                   softcap: str) -> str:
    """Attention of a chunk over every key it can see: what DSA computes when no row sees
    more than top_k keys (each selects all of them), without indexer or TopK.

    qc: [B, Hkv, C, R, D] pre-scaled; hidden: bool [1 or B, C, Lk_vis]; returns
    [B, Hkv, C, R, Dv] (NaN rows where every key is hidden, see :func:`_zero_unseen`).
    """
    zero = b.const([0])
    bias = b.op("Where", hidden, b.const(_NEG_INF, np.float32), b.const(0.0, np.float32))
    return _member_attention(b, qc, b.slice(k, zero, lk_vis, 2), b.slice(v, zero, lk_vis, 2),
                             bias, softcap)


def _zero_unseen(b: _Body, out: str, seen: str) -> str:
    """out [B, Hkv, C, R, Dv] with 0 in the rows where seen (bool [B, C]) is False."""
    return b.op("Where", b.op("Unsqueeze", seen, b.const([1, 3, 4])), out,
                b.const(0.0, np.float32))


def _softcap(b: _Body, logits: str, softcap: str) -> str:
    """cap * tanh(logits / cap) when cap > 0, else logits (an If on the scalar attribute)."""
    then_b = _Body(b.name("capped"))
    capped = then_b.op("Mul", then_b.op("Tanh", then_b.op("Div", logits, softcap)), softcap)
    else_b = _Body(b.name("plain"))
    plain = else_b.op("Identity", logits)
    return b.op("If", b.op("Greater", softcap, b.const(0.0, np.float32)),
                then_branch=_graph(then_b, [], [capped]), else_branch=_graph(else_b, [], [plain]))


def _graph(b: _Body, inputs: list[onnx.ValueInfoProto], outputs: list[str]) -> onnx.GraphProto:
    return helper.make_graph(b.nodes, b.name("graph"), inputs,
                             [helper.make_empty_tensor_value_info(o) for o in outputs])


def _branch(b: _Body, build) -> tuple[onnx.GraphProto, int]:
    sub = _Body(b.name("branch"))
    out = build(sub)
    outs = [out] if isinstance(out, str) else list(out)
    return _graph(sub, [], outs), len(outs)


def _if(b: _Body, cond: str, then_build, else_build):
    """If on a bool [1] ``cond`` whose branches ``build(sub_body)`` return a value (or a
    list of values: the If then returns a list)."""
    (then_graph, n), (else_graph, _) = _branch(b, then_build), _branch(b, else_build)
    return b.op("If", b.scalar(cond), outputs=n, then_branch=then_graph,
                else_branch=else_graph)


# ---------------------------------------------------------------------------------------
# Query-chunk loops
# ---------------------------------------------------------------------------------------


class _Dims:
    """Dynamic sizes of the attention inputs, each int64 [1]."""

    def __init__(self, b: _Body, q: str, k: str, v: str) -> None:
        sq = b.op("Shape", q)
        self.batch = b.op("Slice", sq, b.const([0]), b.const([1]))
        self.hq = b.op("Slice", sq, b.const([1]), b.const([2]))
        self.lq = b.op("Slice", sq, b.const([2]), b.const([3]))
        self.d = b.op("Slice", sq, b.const([3]), b.const([4]))
        self.hkv = b.dim(k, 1)
        self.lk = b.dim(k, 2)
        self.dv = b.dim(v, 3)
        self.r = b.op("Div", self.hq, self.hkv)


def _kv_rows(b: _Body, dims: _Dims, k: str, v: str) -> tuple[str, str, str]:
    """K/V as row tables [B*Hkv*Lk, D] and each (batch, head)'s first row [B, Hkv, 1, 1]."""
    k_rows = b.op("Reshape", k, b.cat(b.const([-1]), dims.d))
    v_rows = b.op("Reshape", v, b.cat(b.const([-1]), dims.dv))
    n = b.scalar(b.op("Mul", dims.batch, dims.hkv))
    base = b.op("Mul", b.op("Range", b.const(0), n, b.const(1)), dims.lk)
    row_base = b.op("Reshape", base, b.cat(dims.batch, dims.hkv, b.const([1, 1])))
    return k_rows, v_rows, row_base


def _grouped_queries(b: _Body, dims: _Dims, q: str, scale: str, padded: str) -> str:
    """q [B, Hq, P, D] -> scale * q as [B, Hkv, P, R, D] (query heads grouped per KV head)."""
    q = b.op("Mul", q, scale)
    q = b.op("Reshape", q, b.cat(dims.batch, dims.hkv, dims.r, padded, dims.d))
    return b.op("Transpose", q, perm=[0, 1, 3, 2, 4])


def _ungroup(b: _Body, dims: _Dims, scanned: str, padded: str, rows: str, width: str | None) -> str:
    """Loop scan output [N, B, Hkv, C, R(, W)] -> [B, Hq, rows(, W)]."""
    if width is None:
        x = b.op("Transpose", scanned, perm=[1, 2, 4, 0, 3])
        x = b.op("Reshape", x, b.cat(dims.batch, dims.hq, padded))
    else:
        x = b.op("Transpose", scanned, perm=[1, 2, 4, 0, 3, 5])
        x = b.op("Reshape", x, b.cat(dims.batch, dims.hq, padded, width))
    return b.slice(x, b.const([0]), rows, 2)


def _loop(b: _Body, trips: str, body: _Body, outputs: list[str]) -> list[str]:
    """Loop ``trips`` (int64 [1]) times over ``body`` (which reads ``body.iter``)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [body.cond_in], [body.cond_out]), *body.nodes],
        b.name("chunk_loop"),
        [helper.make_tensor_value_info(body.iter, TensorProto.INT64, []),
         helper.make_tensor_value_info(body.cond_in, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(body.cond_out, TensorProto.BOOL, []),
         *[helper.make_empty_tensor_value_info(o) for o in outputs]],
    )
    result = b.op("Loop", b.scalar(trips), "", outputs=len(outputs), hint="scan", body=graph)
    return [result] if len(outputs) == 1 else result


def _loop_body(b: _Body, chunk: str) -> tuple[_Body, str, str]:
    """A Loop body builder with its chunk bounds: (body, start [1], end [1])."""
    body = _Body(b.name("chunk"))
    body.iter, body.cond_in = body.name("i"), body.name("cond")
    body.cond_out = body.name("cond_out")
    start = body.op("Mul", body.op("Unsqueeze", body.iter, body.const([0])), chunk)
    return body, start, body.op("Add", start, chunk)


def _top_k(b: _Body, backwards: str, kk: str) -> tuple[str, str]:
    """TopK over the last axis with ties to the smaller key, as the reference: (values,
    indices int64 into the keys in ascending order), in no particular order.

    backwards: scores [..., N] (no NaN) with the keys newest first (column j is key
    N - 1 - j). onnxruntime's CPU TopK keeps a heap when k is small against N (N / k
    above ~10): a heap insert per key that beats the k-th score seen so far, which is
    nearly every key when scores grow with position, as a real indexer's do towards the
    recent keys (4x slower than on random scores, measured on SmolLM2's). Newest first it
    inserts rarely. That order breaks ties towards the larger key, so where a row's k-th
    score is shared with keys outside the selection (a tie cut at the k-th place) the
    search is repeated oldest key first. Rows whose k-th score is -inf (fewer valid keys
    than k) take hidden keys as invalid slots either way.
    """
    one = b.const([1])
    search = dict(outputs=2, axis=-1, largest=1, sorted=0)
    vals, ridx = b.op("TopK", backwards, kk, **search)
    idx = b.op("Sub", b.op("Sub", b.op("Shape", backwards, start=-1), one), ridx)
    kth = b.op("ReduceMin", vals, b.const([-1]), keepdims=1)
    at_least = b.op("ReduceSum", b.op("Cast", b.op("GreaterOrEqual", backwards, kth),
                                      to=TensorProto.FLOAT), b.const([-1]), keepdims=1)
    cut = b.op("And", b.op("Greater", at_least, b.op("Cast", kk, to=TensorProto.FLOAT)),
               b.op("Not", b.op("IsInf", kth, detect_positive=0)))
    tie = b.op("Reshape", b.op("ReduceMax", b.op("Cast", cut, to=TensorProto.FLOAT),
                                keepdims=0), one)
    return _if(b, b.op("Greater", tie, b.const([0.0], np.float32)),
               lambda s: s.op("TopK", _reverse(s, backwards, -1), kk, **search),
               lambda s: [s.op("Identity", vals), s.op("Identity", idx)])


def _select(b: _Body, scores: str, top_k: str, lk_vis: str, newest_first: bool = False):
    """TopK of each row, in no particular order (ties go to the smaller key, as in the
    reference): (values [B, C, K'], indices int64 [B, C, K'], valid bool [B, C, K'], K').
    scores: [B, C, Lk_vis], keys ascending or (``newest_first``) reversed.
    A NaN score (a NaN indexer) ranks as the lowest finite one, as in the reference; the
    replacement runs only where a chunk has one (their sum is NaN), not on every score."""
    lowest = b.const(np.finfo(np.float32).min, dtype=np.float32, hint="lowest")
    has_nan = b.op("Reshape", b.op("IsNaN", b.op("ReduceSum", scores, keepdims=0)),
                   b.const([1]))
    scores = _if(b, has_nan, lambda s: s.op("Where", s.op("IsNaN", scores), lowest, scores),
                 lambda s: s.op("Identity", scores))
    if not newest_first:
        scores = _reverse(b, scores, -1)
    kk = b.op("Min", top_k, lk_vis)
    vals, idx = _top_k(b, scores, kk)
    valid = b.op("Not", b.op("IsInf", vals, detect_positive=0))
    return vals, idx, valid, kk


def _chunk_positions(b: _Body, lk: str, first_pos: str, start: str, end: str,
                     causal: str) -> tuple[str, str]:
    """Absolute positions of the chunk's rows (int64 [C, 1]) and how many keys any of them
    can see (int64 [1])."""
    qpos = b.op("Add", first_pos, b.op("Range", b.scalar(start), b.scalar(end), b.const(1)))
    last_visible = b.op("Add", first_pos, end)                               # keys < this
    lk_vis = b.op("Where", causal, b.op("Min", lk, last_visible), lk)
    return b.op("Unsqueeze", qpos, b.const([1])), lk_vis


def _indexer_inputs(b: _Body, q_idx: str, k_idx: str, w: str, first: str, rows_end: str,
                    extra: str, transpose: bool = True) -> tuple[str, str, str | None]:
    """Rows first..rows_end of q_idx / w zero-padded by ``extra``, and k_idx^T (None
    without ``transpose``)."""
    qi = _pad_rows(b, b.slice(q_idx, first, rows_end, 1), 1, 4, extra)
    wi = _pad_rows(b, b.slice(w, first, rows_end, 1), 1, 3, extra)
    wi = b.op("Unsqueeze", wi, b.const([2]))                                 # [B, P, 1, H_I]
    if not transpose:
        return qi, wi, None
    k_idx_t = b.op("Transpose", k_idx, perm=[0, 2, 1])                       # [B, d_I, Lk]
    return qi, wi, k_idx_t


def _keep(b: _Body, ins: dict) -> str | None:
    """key_mask [B, Lk] as bool [B, 1, Lk], or None without one."""
    if "key_mask" not in ins:
        return None
    return b.op("Unsqueeze", ins["key_mask"], b.const([1]))


def _chunked_rows(b: _Body, dims: _Dims, ins: dict, a: dict, first: str, end: str,
                  sparse: bool, decode: bool = False) -> str:
    """Attention of query rows first..end, ``query_chunk`` rows per Loop iteration.

    sparse=False: every row attends to all keys it can see (DSA's dense rows). sparse=True:
    DSA (indexer -> TopK -> sparse attention), except in chunks whose rows see at most
    top_k keys, which select all of them. Returns [B, Hq, end - first, Dv].

    decode=True (the runtime-q_offset overloads): a chunk is never longer than the rows
    (a one-token step is one row, not a padded chunk), and chunks of fewer than
    MASKED_DENSE_MIN_ROWS rows gather their selected keys.
    """
    q, k, v = ins["q"], ins["k"], ins["v"]
    rows = b.op("Sub", end, first)
    if decode:
        a = {**a, "query_chunk": b.op("Max", b.op("Min", a["query_chunk"], rows), b.const([1]))}
    trips, padded = _chunk_count(b, rows, a["query_chunk"])
    extra = b.op("Sub", padded, rows)
    qs = _pad_rows(b, b.slice(q, first, end, 2), 2, 4, extra)
    qg = _grouped_queries(b, dims, qs, a["scale"], padded)                  # [B, Hkv, P, R, D]
    first_pos = b.op("Add", a["q_offset"], first)
    causal = b.op("Cast", a["causal"], to=TensorProto.BOOL)
    keep = _keep(b, ins)

    body, start, stop = _loop_body(b, a["query_chunk"])
    qpos, lk_vis = _chunk_positions(body, dims.lk, first_pos, start, stop, causal)
    qc = body.slice(qg, start, stop, 2)                                      # [B, Hkv, C, R, D]

    def hidden_keys(s: _Body) -> str:  # [1 or B, C, Lk_vis], keys ascending
        kp = s.op("Range", s.const(0), s.scalar(lk_vis), s.const(1))
        return _hidden_keys(s, kp, qpos, causal,
                            None if keep is None else s.slice(keep, s.const([0]), lk_vis, 2))

    def every_visible_key(sub: _Body) -> str:
        hidden = hidden_keys(sub)
        out = _visible_chunk(sub, qc, k, v, lk_vis, hidden, a["softcap"])
        if keep is None:
            return out
        seen = sub.op("ReduceMax", sub.op("Cast", sub.op("Not", hidden), to=TensorProto.FLOAT),
                      sub.const([-1]), keepdims=0)                           # [B, C]
        return _zero_unseen(sub, out, sub.op("Cast", seen, to=TensorProto.BOOL))

    if sparse:
        qi, wi, k_idx_t = _indexer_inputs(b, ins["q_idx"], ins["k_idx"], ins["w"], first, end,
                                          extra, transpose=not decode)
        if decode:  # transposed per chunk, and only where the chunk has many rows
            k_idx_t = lambda s: s.op("Transpose", s.slice(ins["k_idx"], s.const([0]), lk_vis, 1),
                                     perm=[0, 2, 1])
        else:
            newest = _NewestFirst(b, k_idx_t, keep, dims.lk)
        k_rows, v_rows, row_base = _kv_rows(b, dims, k, v)

        def selected_keys(sub: _Body) -> str:
            qi_c, wi_c = sub.slice(qi, start, stop, 1), sub.slice(wi, start, stop, 1)
            if decode:
                hidden = hidden_keys(sub)
                scores = _if(sub, sub.op("Less", a["query_chunk"],
                                         sub.const([MASKED_DENSE_MIN_ROWS])),
                             lambda s: _index_scores_keys_first(s, qi_c, ins["k_idx"], wi_c,
                                                                lk_vis, hidden),
                             lambda s: _index_scores(s, qi_c, k_idx_t(s), wi_c, lk_vis,
                                                     hidden))
            else:
                kt, kp, keep_vis = newest.visible(sub, lk_vis)
                scores = _index_scores(sub, qi_c, kt, wi_c, lk_vis,
                                       _hidden_keys(sub, kp, qpos, causal, keep_vis))
            vals, idx, valid, _ = _select(sub, scores, a["top_k"], lk_vis, newest_first=not decode)
            one = sub.const([1])

            def gathered(s: _Body) -> str:
                return _sparse_chunk(s, qc, k_rows, v_rows, row_base,
                                     s.op("Unsqueeze", idx, one), s.op("Unsqueeze", valid, one),
                                     a["softcap"], with_lse=False)[0]

            # The chunk as one tile over the keys its rows selected: their union, or
            # every visible key where the union is most of them; per-row gathers where
            # even that is wide (random selections over long rows).
            bias = _selection_bias(sub, idx, valid, lk_vis)                 # [B, C, Lk_vis]
            chosen = sub.op("Equal", sub.op("ReduceMax", bias, sub.const([0, 1]), keepdims=0),
                            sub.const(0.0, np.float32))                        # [Lk_vis]
            keys = sub.op("Squeeze", sub.op("NonZero", chosen), sub.const([0]))  # [U]
            width = sub.op("Min", sub.op("Shape", keys), lk_vis)
            union = sub.op("Less", sub.op("Mul", sub.op("Shape", keys), sub.const([100])),
                           sub.op("Mul", lk_vis, sub.const([UNION_BELOW_PERCENT])))

            def tile(s: _Body) -> str:
                return _tile_chunk(s, qc, k, v, lk_vis, a["softcap"], union, keys, bias)

            narrow = sub.op("LessOrEqual", width, sub.const([GATHER_ABOVE_KEYS]))
            if decode:
                tall = sub.op("GreaterOrEqual", a["query_chunk"],
                              sub.const([MASKED_DENSE_MIN_ROWS]))
                narrow = sub.op("And", narrow, tall)
            out = _if(sub, narrow, tile, gathered)
            if keep is None:
                return out
            best = sub.op("ReduceMax", vals, sub.const([-1]), keepdims=0)       # [B, C]
            return _zero_unseen(sub, out, sub.op("Not", sub.op("IsInf", best,
                                                               detect_positive=0)))

        out = _if(body, body.op("LessOrEqual", lk_vis, a["top_k"]), every_visible_key,
                  selected_keys)
    else:
        out = every_visible_key(body)
    (scanned,) = _loop(b, trips, body, [out])
    return _ungroup(b, dims, scanned, padded, rows, dims.dv)


def _decode_row(b: _Body, ins: dict, a: dict) -> str:
    """Attention of a single query row (Lq = 1, a decode step) in straight-line ops: no
    Loop, no chunk padding, no branch on how many keys it sees, shapes from constant
    reshapes where onnxruntime allows (its per-node cost is most of a short step).

    Index scores keys-first (k_idx @ q_idx^T: the index-key cache is read as stored),
    then TopK of min(top_k, Lk): where the row sees at most top_k keys that picks every
    visible one (hidden keys score -inf and are masked), which is what the chunked body's
    "every visible key" path computes. A dense row (DSA's dense_below rule) picks all Lk
    keys the same way. Returns [B, Hq, 1, Dv].
    """
    zero, one = b.const([0]), b.const([1])
    k, v, q_offset = ins["k"], ins["v"], a["q_offset"]
    lk, hkv = b.dim(k, 2), b.dim(k, 1)
    causal = b.op("Cast", a["causal"], to=TensorProto.BOOL)
    key_pos = b.op("Range", b.const(0), b.scalar(lk), b.const(1))                # [Lk]
    hidden = b.op("And", b.op("Greater", key_pos, q_offset), causal)
    hidden = (b.op("Or", hidden, b.op("Not", ins["key_mask"])) if "key_mask" in ins
              else b.op("Unsqueeze", hidden, zero))                              # [B or 1, Lk]
    qt = b.op("Transpose", b.op("Squeeze", ins["q_idx"], one), perm=[0, 2, 1])  # [B, d_I, H_I]
    dots = b.op("Relu", b.op("MatMul", ins["k_idx"], qt))                        # [B, Lk, H_I]
    wt = b.op("Transpose", ins["w"], perm=[0, 2, 1])                             # [B, H_I, 1]
    scores = b.op("Squeeze", b.op("MatMul", dots, wt), b.const([2]))             # [B, Lk]
    lowest = b.const(np.finfo(np.float32).min, dtype=np.float32, hint="lowest")
    scores = b.op("Where", b.op("IsNaN", scores), lowest, scores)  # NaN ranks lowest
    scores = b.op("Where", hidden, b.const(_NEG_INF, np.float32), scores)
    scores = _reverse(b, scores, -1)
    threshold = b.op("Where", b.op("Greater", a["dense_below"], zero),
                     b.op("Max", a["top_k"], a["dense_below"]), zero)
    seen_keys = b.op("Where", causal, b.op("Min", lk, b.op("Add", q_offset, one)), lk)
    dense_row = b.op("And", b.op("Greater", threshold, zero),
                     b.op("LessOrEqual", seen_keys, threshold))
    kk = b.op("Where", dense_row, lk, b.op("Min", a["top_k"], lk))
    vals, idx = _top_k(b, scores, kk)
    valid = b.op("Not", b.op("IsInf", vals, detect_positive=0))                  # [B, K]
    k_rows, v_rows = b.op("Flatten", k, axis=3), b.op("Flatten", v, axis=3)     # [B*Hkv*Lk, D]
    base = b.op("Range", b.const(0), b.scalar(b.dim(k_rows, 0)), b.scalar(lk))   # [B*Hkv]
    base = b.op("Reshape", base, b.cat(b.const([-1]), hkv, one))                 # [B, Hkv, 1]
    rows = b.op("Add", base, b.op("Unsqueeze", idx, one))                        # [B, Hkv, K]
    kg, vg = b.op("Gather", k_rows, rows, axis=0), b.op("Gather", v_rows, rows, axis=0)
    qg = b.op("Reshape", b.op("Mul", ins["q"], a["scale"]),
              b.cat(zero, hkv, b.const([-1]), zero))                              # [B, Hkv, R, D]
    logits = _softcap(b, b.op("MatMul", qg, b.op("Transpose", kg, perm=[0, 1, 3, 2])),
                      a["softcap"])                                              # [B, Hkv, R, K]
    logits = b.op("Where", b.op("Unsqueeze", valid, b.const([1, 2])), logits,
                  b.const(_NEG_INF, np.float32))
    out = b.op("MatMul", b.op("Softmax", logits, axis=-1), vg)                   # [B, Hkv, R, Dv]
    seen = b.op("Not", b.op("IsInf", b.op("ReduceMax", vals, b.const([-1]), keepdims=1),
                            detect_positive=0))                                  # [B, 1]
    out = b.op("Where", b.op("Unsqueeze", seen, b.const([2, 3])), out,
               b.const(0.0, np.float32))  # a row that sees no key: 0, as the reference
    return b.op("Reshape", out, b.const([0, -1, 1, 0]))                          # [B, Hq, 1, Dv]


def _inputs(names: list[str], key_mask: bool, q_offset: bool = False) -> list[str]:
    return [*names, *(["key_mask"] if key_mask else []), *(["q_position"] if q_offset else [])]


def _runtime_offset(b: _Body, a: dict, q_offset: bool) -> dict:
    """With the q_offset input, it replaces the attribute (which must then be 0)."""
    if not q_offset:
        return a
    return {**a, "q_offset": b.op("Reshape", b.op("Cast", "q_position", to=TensorProto.INT64),
                                  b.const([1]))}


_ATTENTION_ATTRS = {"top_k": "int", "scale": "float", "causal": "int", "q_offset": "int",
                    "softcap": "float", "dense_below": "int", "query_chunk": "int"}


def attention_function(key_mask: bool = False, q_offset: bool = False) -> onnx.FunctionProto:
    """``dsa.Attention(q, k, v, q_idx, k_idx, w[, key_mask][, q_offset]) -> out``: one site's
    DSA attention.

    Same semantics as ``torch.ops.dsa.attention``: the leading queries with at most
    max(top_k, dense_below) visible keys (dense_below > 0) take exact attention, the rest
    indexer top-k + sparse attention. With ``key_mask`` the body takes a 7th input and is
    the KEY_MASK_OVERLOAD overload; with ``q_offset`` (int64, query 0's absolute position
    at run time, e.g. a decoder's past length) the Q_OFFSET_OVERLOAD or
    KEY_MASK_Q_OFFSET_OVERLOAD overload.
    """
    b = _Body("attn")
    names = _inputs(["q", "k", "v", "q_idx", "k_idx", "w"], key_mask, q_offset)
    ins = {n: n for n in names}
    a = _runtime_offset(b, _attributes(b, _ATTENTION_ATTRS), q_offset)
    if q_offset:  # a decoder's node: its decode steps take the one-row body
        out = _if(b, b.op("Equal", b.dim("q", 2), b.const([1])),
                  lambda s: _decode_row(s, ins, a),
                  lambda s: _chunked_attention(s, ins, a, q_offset))
    else:
        out = _chunked_attention(b, ins, a, q_offset)
    b.nodes.append(helper.make_node("Identity", [out], ["out"]))
    return _function("Attention", names, ["out"], b, _ATTENTION_ATTRS, key_mask, q_offset)


def _chunked_attention(b: _Body, ins: dict, a: dict, q_offset: bool) -> str:
    """Any number of query rows: the dense_below rows, then the sparse ones, chunk by
    chunk (:func:`_chunked_rows`). Returns [B, Hq, Lq, Dv]."""
    dims = _Dims(b, "q", "k", "v")
    zero = b.const([0])
    threshold = b.op("Where", b.op("Greater", a["dense_below"], zero),
                     b.op("Max", a["top_k"], a["dense_below"]), zero)
    causal = b.op("Cast", a["causal"], to=TensorProto.BOOL)
    n_causal = b.op("Min", b.op("Max", b.op("Sub", threshold, a["q_offset"]), zero), dims.lq)
    n_full = b.op("Where", b.op("LessOrEqual", dims.lk, threshold), dims.lq, zero)
    n_dense = b.op("Where", causal, n_causal, n_full)

    def dense(sub: _Body, end: str) -> str:
        return _chunked_rows(sub, dims, ins, a, zero, end, sparse=False, decode=q_offset)

    def sparse(sub: _Body, first: str) -> str:
        return _chunked_rows(sub, dims, ins, a, first, dims.lq, sparse=True, decode=q_offset)

    def mixed(sub: _Body) -> str:
        return sub.op("Concat", dense(sub, n_dense), sparse(sub, n_dense), axis=2)

    def sparse_or_mixed(sub: _Body) -> str:
        return _if(sub, sub.op("Equal", n_dense, zero), lambda s: sparse(s, zero), mixed)

    return _if(b, b.op("Equal", n_dense, dims.lq), lambda s: dense(s, dims.lq), sparse_or_mixed)


_INDEXER_ATTRS = {"top_k": "int", "q_offset": "int", "causal": "int", "query_chunk": "int"}


def indexer_topk_function(key_mask: bool = False, q_offset: bool = False) -> onnx.FunctionProto:
    """``dsa.IndexerTopK(q_idx, k_idx, w[, key_mask][, q_offset]) -> indices`` int32
    [B, Lq, top_k] (ascending, -1 pad); the overload names which optional inputs it takes
    (as :func:`attention_function`)."""
    b = _Body("topk")
    names = _inputs(["q_idx", "k_idx", "w"], key_mask, q_offset)
    a = _runtime_offset(b, _attributes(b, _INDEXER_ATTRS), q_offset)
    zero = b.const([0])
    lq = b.dim("q_idx", 1)
    lk = b.dim("k_idx", 1)
    trips, padded = _chunk_count(b, lq, a["query_chunk"])
    extra = b.op("Sub", padded, lq)
    qi, wi, k_idx_t = _indexer_inputs(b, "q_idx", "k_idx", "w", zero, lq, extra)
    causal = b.op("Cast", a["causal"], to=TensorProto.BOOL)
    keep = _keep(b, {n: n for n in names})

    newest = _NewestFirst(b, k_idx_t, keep, lk)

    body, start, end = _loop_body(b, a["query_chunk"])
    qpos, lk_vis = _chunk_positions(body, lk, a["q_offset"], start, end, causal)
    kt, kp, keep_vis = newest.visible(body, lk_vis)
    scores = _index_scores(body, body.slice(qi, start, end, 1), kt, body.slice(wi, start, end, 1),
                           lk_vis, _hidden_keys(body, kp, qpos, causal, keep_vis))
    _, idx, valid, kk = _select(body, scores, a["top_k"], lk_vis, newest_first=True)
    # Ascending key order with unused slots last: park invalid slots at Lk, sort, mark -1.
    parked = body.op("Where", valid, idx, lk)
    asc, _ = body.op("TopK", parked, kk, outputs=2, axis=-1, largest=0, sorted=1)
    asc = body.op("Where", body.op("Equal", asc, lk), body.const(-1), asc)
    asc = _pad_rows(body, asc, 2, 3, body.op("Sub", a["top_k"], kk), body.const(-1))
    asc = body.op("Cast", asc, to=TensorProto.INT32)
    (scanned,) = _loop(b, trips, body, [asc])                               # [N, B, C, K]
    x = b.op("Transpose", scanned, perm=[1, 0, 2, 3])
    x = b.op("Reshape", x, b.cat(b.dim("q_idx", 0), padded, a["top_k"]))
    b.nodes.append(helper.make_node("Slice", [x, zero, lq, b.const([1])], ["indices"]))
    return _function("IndexerTopK", names, ["indices"], b, _INDEXER_ATTRS, key_mask, q_offset)


_SPARSE_ATTRS = {"scale": "float", "softcap": "float", "query_chunk": "int"}


def sparse_attention_function() -> onnx.FunctionProto:
    """``dsa.SparseAttention(q, k, v, indices) -> (out, lse)``; indices [B, G, Lq, K], -1 unused."""
    b = _Body("sparse")
    a = _attributes(b, _SPARSE_ATTRS)
    dims = _Dims(b, "q", "k", "v")
    trips, padded = _chunk_count(b, dims.lq, a["query_chunk"])
    extra = b.op("Sub", padded, dims.lq)
    qg = _grouped_queries(b, dims, _pad_rows(b, "q", 2, 4, extra), a["scale"], padded)
    idx_all = _pad_rows(b, b.op("Cast", "indices", to=TensorProto.INT64), 2, 4, extra,
                        b.const(-1))
    k_rows, v_rows, row_base = _kv_rows(b, dims, "k", "v")

    body, start, end = _loop_body(b, a["query_chunk"])
    idx = body.slice(idx_all, start, end, 2)                                 # [B, G, C, K]
    valid = body.op("GreaterOrEqual", idx, body.const(0))
    idx = body.op("Max", idx, body.const(0))
    qc = body.slice(qg, start, end, 2)
    out, lse = _sparse_chunk(body, qc, k_rows, v_rows, row_base, idx, valid, a["softcap"],
                             with_lse=True)
    scanned_out, scanned_lse = _loop(b, trips, body, [out, lse])
    b.nodes.append(helper.make_node(
        "Identity", [_ungroup(b, dims, scanned_out, padded, dims.lq, dims.dv)], ["out"]))
    b.nodes.append(helper.make_node(
        "Identity", [_ungroup(b, dims, scanned_lse, padded, dims.lq, None)], ["lse"]))
    return _function("SparseAttention", ["q", "k", "v", "indices"], ["out", "lse"], b,
                     _SPARSE_ATTRS)


# Defaults of the optional attributes (as in the schemas); top_k and scale are required.
ATTRIBUTE_DEFAULTS = {"causal": 1, "q_offset": 0, "softcap": 0.0, "dense_below": 0,
                      "query_chunk": DEFAULT_QUERY_CHUNK}


def _function(name: str, inputs: list[str], outputs: list[str], b: _Body,
              attrs: dict[str, str], key_mask: bool = False,
              q_offset: bool = False) -> onnx.FunctionProto:
    required = [a for a in attrs if a not in ATTRIBUTE_DEFAULTS]
    defaults = [helper.make_attribute(a, ATTRIBUTE_DEFAULTS[a]) for a in attrs
                if a in ATTRIBUTE_DEFAULTS]
    overload = _OVERLOADS[key_mask, q_offset] or None
    if q_offset and not key_mask:
        # Inputs bind by position: the node passes "" for key_mask, so the body declares
        # that formal too (unused) before q_offset.
        inputs = [*inputs[:-1], "key_mask", inputs[-1]]
    return helper.make_function(DOMAIN, name, inputs, outputs, b.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)], attributes=required,
                                attribute_protos=defaults, overload=overload,
                                doc_string=f"dsa.{name} v{VERSION} in standard ONNX ops "
                                           f"(query-chunked Loop; see dsa_compile.onnx).")


# Inputs and outputs of each op as in the schemas; ops in _KEY_MASK_OPS also take an
# optional key_mask and then an optional q_offset.
_SIGNATURES = {
    "Attention": (["q", "k", "v", "q_idx", "k_idx", "w"], ["out"]),
    "IndexerTopK": (["q_idx", "k_idx", "w"], ["indices"]),
    "SparseAttention": (["q", "k", "v", "indices"], ["out", "lse"]),
}
_KEY_MASK_OPS = {"Attention": attention_function, "IndexerTopK": indexer_topk_function}
# (has key_mask, has q_offset) -> overload name, and back.
_OVERLOADS = {(False, False): "", (True, False): KEY_MASK_OVERLOAD,
              (False, True): Q_OFFSET_OVERLOAD, (True, True): KEY_MASK_Q_OFFSET_OVERLOAD}
_OPTIONAL_OF = {name: flags for flags, name in _OVERLOADS.items()}


def optional_inputs(node: onnx.NodeProto) -> tuple[bool, bool]:
    """(given a key_mask, given a q_offset): the node's optional inputs past the schema's
    required ones (an empty name is an absent input)."""
    required = len(_SIGNATURES[node.op_type][0])
    rest = list(node.input[required:]) + ["", ""]
    if node.op_type not in _KEY_MASK_OPS:
        return False, False
    return bool(rest[0]), bool(rest[1])


def overload_of(node: onnx.NodeProto) -> str:
    """The function overload a ``dsa`` node needs: "" (no optional input),
    KEY_MASK_OVERLOAD, Q_OFFSET_OVERLOAD or KEY_MASK_Q_OFFSET_OVERLOAD."""
    return _OVERLOADS[optional_inputs(node)]


def function(op: str, overload: str = "") -> onnx.FunctionProto:
    """The FunctionProto of ``dsa.<op>`` with the given overload (see :func:`overload_of`).

    Raises:
        ValueError: an unknown op, or an op without that overload.
    """
    if op not in _SIGNATURES:
        raise ValueError(f"no dsa op {op!r}; the ops are {sorted(_SIGNATURES)}")
    if overload == "":
        return {"Attention": attention_function, "IndexerTopK": indexer_topk_function,
                "SparseAttention": sparse_attention_function}[op]()
    if overload in _OPTIONAL_OF and op in _KEY_MASK_OPS:
        key_mask, q_offset = _OPTIONAL_OF[overload]
        return _KEY_MASK_OPS[op](key_mask=key_mask, q_offset=q_offset)
    raise ValueError(f"dsa.{op} has no function overload {overload!r}")


def all_functions() -> dict[tuple[str, str], onnx.FunctionProto]:
    """{(op name, overload): FunctionProto} for every dsa op and overload."""
    pairs = [(op, "") for op in _SIGNATURES] + [(op, overload) for op in _KEY_MASK_OPS
                                                for overload in _OPTIONAL_OF if overload]
    return {(op, overload): function(op, overload) for op, overload in pairs}


def op_model(op: str, key_mask: bool = False, q_offset_input: bool = False,
             **attrs) -> onnx.ModelProto:
    """A model of one ``dsa.<op>`` node with its function: for tests and benchmarks.

    Inputs and outputs are named as in the schema: float32 tensors, ``indices`` int32
    (SparseAttention's input, IndexerTopK's output), ``key_mask`` bool [B, Lk] (an
    extra input with ``key_mask=True``), ``q_offset`` int64 [] (with
    ``q_offset_input=True``); ``lse`` float32; all dims dynamic.
    """
    inputs, outputs = _SIGNATURES[op]
    if (key_mask or q_offset_input) and op not in _KEY_MASK_OPS:
        raise ValueError(f"dsa.{op} takes no key_mask or q_offset input")
    if key_mask or q_offset_input:
        inputs = [*inputs, "key_mask" if key_mask else ""]
    if q_offset_input:
        inputs = [*inputs, "q_offset"]
    attrs.setdefault("query_chunk", DEFAULT_QUERY_CHUNK)
    types = {"indices": TensorProto.INT32, "key_mask": TensorProto.BOOL,
             "q_offset": TensorProto.INT64}

    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None)

    node = helper.make_node(op, inputs, outputs, domain=DOMAIN, **attrs)
    node.overload = overload_of(node)
    graph = helper.make_graph([node], f"dsa_{op}", [info(n) for n in inputs if n],
                              [info(n) for n in outputs])
    return helper.make_model(
        graph, functions=[function(op, node.overload)], ir_version=10,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, VERSION)])
