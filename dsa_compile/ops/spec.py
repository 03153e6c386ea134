"""Named access to the arguments of a DSA op's FX node, from the op's registered schema.

The Python signature of each ``torch.library.custom_op`` in this package is the op's
spec (names, order, defaults). A pass that builds, reads or edits a ``dsa.*`` node goes
through these helpers by argument name, so adding an op argument touches its signature
and the code that uses it, never a positional index spelled elsewhere:

    args = call_args(torch.ops.dsa.attention.default, q=q, k=k, ..., top_k=8)
    k_idx = get_arg(node, "k_idx")
    set_args(node, dense_below=2**62)
"""

from __future__ import annotations

from typing import Any

from torch import fx


def arg_names(op) -> tuple[str, ...]:
    """The op overload's argument names in schema order."""
    return tuple(a.name for a in op._schema.arguments)


def _defaults(op) -> dict[str, Any]:
    return {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}


def call_args(op, **values) -> tuple:
    """The positional args of a call of ``op`` with ``values`` by name, in schema order,
    defaults filled in. Unknown or missing names raise TypeError."""
    names = arg_names(op)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"{op}: unknown arguments {unknown}; the schema has {list(names)}")
    defaults = _defaults(op)
    missing = [n for n in names if n not in values and n not in defaults]
    if missing:
        raise TypeError(f"{op}: missing arguments {missing}")
    return tuple(values[n] if n in values else defaults[n] for n in names)


def get_arg(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of a call node of a dsa op (its default when not given)."""
    names = arg_names(node.target)
    i = names.index(name)
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, _defaults(node.target).get(name))


def set_args(node: fx.Node, **values) -> None:
    """Replace arguments of a call node of a dsa op by name, positional or keyword as
    the node already passes them."""
    names = arg_names(node.target)
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        i = names.index(name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs
