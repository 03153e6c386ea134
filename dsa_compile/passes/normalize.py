"""Stage 0: one name per operation, whatever spelling the graph uses.

Dynamo graphs mix ``call_function`` (``torch.matmul``, ``operator.mul``) and
``call_method`` (``x.softmax(-1)``) nodes, and exported graphs use aten overloads.
:func:`op_of` maps all of them to one canonical name, and :func:`arg` reads an
argument by position or keyword, so the detector matches each form once.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

_FUNCTIONS = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    torch.einsum: "einsum",
    F.softmax: "softmax", torch.softmax: "softmax", torch.special.softmax: "softmax",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    torch.where: "where", torch.masked_fill: "masked_fill",
    torch.transpose: "transpose", torch.swapaxes: "transpose", torch.permute: "permute",
    F.dropout: "dropout", torch.dropout: "dropout",
    torch.tanh: "tanh", torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem", torch.unsqueeze: "unsqueeze", torch.reshape: "reshape",
    F.scaled_dot_product_attention: "sdpa",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.or_: "or", torch.logical_or: "or", torch.bitwise_or: "or",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
    operator.le: "le", torch.le: "le", operator.lt: "lt", torch.lt: "lt",
    operator.ge: "ge", torch.ge: "ge", operator.gt: "gt", torch.gt: "gt",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    torch.arange: "arange", torch.ones: "ones", torch.ones_like: "ones",
    torch.zeros: "zeros", torch.zeros_like: "zeros", torch.full: "full",
    torch.topk: "topk", torch.scatter: "scatter", F.relu: "relu", torch.relu: "relu",
    torch.sum: "sum", operator.neg: "neg", torch.neg: "neg", torch.diff: "diff",
    torch.cumsum: "cumsum", torch.tril: "tril", torch.triu: "triu",
    F.multi_head_attention_forward: "mha",
    torch._native_multi_head_attention: "mha",
    torch._transformer_encoder_layer_fwd: "encoder_layer",
}

_METHODS = {
    "float": "cast", "half": "cast", "bfloat16": "cast", "double": "cast", "to": "cast",
    "type_as": "cast", "type": "cast", "contiguous": "identity", "clone": "identity",
    "swapaxes": "transpose", "logical_and": "and", "bitwise_and": "and", "__and__": "and",
    "logical_or": "or", "bitwise_or": "or", "logical_not": "not", "bitwise_not": "not",
    "new_ones": "ones", "expand_as": "expand", "view": "reshape",
    # F._canonical_mask's zeros_like(m).masked_fill_(m, -inf): same value as out of place.
    "masked_fill_": "masked_fill",
}

_ATEN = {
    "_softmax": "softmax", "scaled_dot_product_attention": "sdpa", "bitwise_and": "and",
    "logical_and": "and", "bitwise_not": "not", "logical_not": "not", "_to_copy": "cast",
    "bitwise_or": "or", "logical_or": "or", "view": "reshape", "bmm": "matmul",
    "_native_multi_head_attention": "mha", "_transformer_encoder_layer_fwd": "encoder_layer",
}


def op_of(node: Node) -> str | None:
    """Canonical op name of a node ('matmul', 'softmax', 'cast', ...), or None."""
    if node.op == "call_method":
        return _METHODS.get(node.target, node.target)
    if node.op != "call_function":
        return None
    name = _FUNCTIONS.get(node.target)
    if name is not None:
        return name
    if isinstance(node.target, torch._ops.OpOverload):
        base = node.target._opname
        return _ATEN.get(base, base)
    return None


def arg(node: Node, index: int, name: str, default=None):
    """Argument ``index`` (positional, self included) or keyword ``name`` of a node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node) -> torch.Tensor | None:
    """The fake value a node carries (dynamo: example_value, export: val)."""
    if not isinstance(node, Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def very_negative(x) -> bool:
    """A fill value that makes a softmax weight exactly zero (-inf or below -1e4)."""
    return is_number(x) and x <= -1e4


def is_zero_tensor(x) -> bool:
    """0, 0.0 or a node made by zeros/zeros_like/new_zeros."""
    if is_number(x):
        return x == 0
    return isinstance(x, Node) and (op_of(x) in ("zeros", "new_zeros"))


def mutates(node: Node) -> bool:
    """True if ``node`` writes in place: an in-place method (``index_copy_``, ``add_``),
    an in-place function, a mutable aten overload, ``operator.setitem``, or any node FX
    itself calls impure. Such nodes have side effects even when their value is unused
    (cache and buffer writes), so no pass may drop them."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target is operator.setitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def eliminate_dead_code(graph) -> None:
    """``graph.eliminate_dead_code()`` that keeps every node that :func:`mutates` (FX's
    own version drops in-place method calls such as ``index_copy_`` into a KV cache)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
