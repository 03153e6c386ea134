"""Training-free fit of the indexers a rewrite created, on the rewrite's example inputs.

Inside a compiled or exported graph an indexer only ever sees traced tensors, so without
this a plain ``torch.compile(model, backend="dsa")`` or ``dsa_compile.apply`` would select
with data-free random projections (SmolLM2: 1.88x perplexity instead of 1.02x). The
rewritten graph runs once, eagerly, with every DSA site temporarily dense (so the
indexers see the dense model's activations, which is what they approximate, at the
cost of one dense forward), and each unfitted indexer fits itself on its site's q, k.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from dsa_compile.indexer import FIT_MIN_TOKENS, Indexer, ensure_fitted
from dsa_compile.ops.spec import set_args
from dsa_compile.passes.normalize import mutates, op_of


def hint(x):
    """A SymInt/SymFloat/SymBool's concrete value (None if it has none); others as is."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint
    return x


def fit_new_indexers(gm: fx.GraphModule, run: Callable[[Callable], Any],
                     inputs: Sequence[Any] = (), aligned: bool = True) -> None:
    """Fit every not-yet-fitted indexer of ``gm`` by calling ``run(sub)`` once, which runs
    ``gm`` on the real inputs with each input tensor ``x`` replaced by ``sub(x)``.

    ``inputs`` are the real inputs; ``aligned``: they are ``gm``'s placeholders in order
    (the backend), else user inputs of unknown order (``apply``). The fit run must not
    repeat the graph's side effects: every tensor the graph writes in place (a KV cache,
    a counter buffer) is replaced by a copy for that run -- the mutated placeholders when
    aligned, every input tensor otherwise -- and mutated ``get_attr`` buffers are swapped
    for copies. Skipped, with a warning (the indexers stay data-free), when ``inputs``
    hold fake or hint-less values, when a parameter is written, when the run fails, or
    when the inputs are too short to fit on.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    todo = [m for m in gm.modules() if isinstance(m, Indexer) and not m.fitted]
    if not todo:
        return
    if any(isinstance(x, FakeTensor) or x is None for x in inputs):
        _warn_unfitted("cannot run the graph on the example inputs")
        return
    placeholders, attrs = _mutated_roots(gm)
    if aligned:
        written = {id(x) for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                         inputs) if n in placeholders}
    else:
        written = {id(x) for x in inputs if isinstance(x, torch.Tensor)}
    if any(isinstance(x, nn.Parameter) and id(x) in written for x in inputs):
        _warn_unfitted("the graph writes a parameter in place")
        return
    # A root written once by a pure overwrite (a KV cache's index_copy_ of this step's
    # keys) and read only after that write ends up the same whether the graph runs once
    # or twice on it: it needs no copy (at 128K a copy would double the KV cache).
    again = _rerun_safe(gm)
    if aligned:
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        written -= {id(x) for n, x in zip(nodes, inputs) if n in again}
    attrs = {t for t in attrs if t not in again}

    def fit_hook(indexer: Indexer, args):
        q, k = args
        ensure_fitted(indexer, q, k, real=True)  # this run is eager, inside the compiler

    handles = [m.register_forward_pre_hook(fit_hook) for m in todo]
    try:
        copies = {id(x): x.clone() for x in inputs
                  if isinstance(x, torch.Tensor) and id(x) in written}
        with torch.no_grad(), _dense_sites(gm), _swapped_attrs(gm, attrs):
            run(lambda x: copies.get(id(x), x) if isinstance(x, torch.Tensor) else x)
    except Exception as e:  # a failed fit must not cost the user the rewrite
        _warn_unfitted(f"running the graph to fit the indexers failed ({type(e).__name__}: "
                       f"{str(e)[:200]})")
        return
    finally:
        for h in handles:
            h.remove()
    if not all(m.fitted for m in todo):
        warnings.warn(f"dsa: inputs shorter than {FIT_MIN_TOKENS} tokens, indexers start from "
                      "data-free projections; a later compile for longer inputs fits them",
                      stacklevel=3)


_VIEWS = ("cast", "identity", "reshape", "getitem", "transpose", "permute", "expand",
          "unsqueeze", "squeeze", "select", "narrow", "slice", "as_strided", "t", "view_as")


def _mutated_roots(gm: fx.GraphModule) -> tuple[set, set]:
    """(placeholders, get_attr targets) that some in-place node of ``gm`` writes, found by
    walking each written value back through views (in-graph allocations need no copy)."""
    placeholders, attrs = set(), set()
    for n in gm.graph.nodes:
        if not mutates(n) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        x = n.args[0]
        while x.op in ("call_function", "call_method") and op_of(x) in _VIEWS and \
                x.args and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        if x.op == "placeholder":
            placeholders.add(x)
        elif x.op == "get_attr":
            attrs.add(x.target)
    return placeholders, attrs


# In-place overwrites and the position of the argument holding the written values.
_VALUE_ARG = {"index_copy_": 3, "copy_": 1, "setitem": 2, "fill_": 1, "zero_": None,
              "index_put_": 2}


def _rerun_safe(gm: fx.GraphModule) -> set:
    """Roots (placeholder nodes and get_attr targets) that running ``gm`` twice leaves as
    one run would: each is written by exactly one in-place overwrite (``index_copy_``,
    ``copy_``, setitem, ``fill_``, ``zero_``, ``index_put_`` without accumulate) whose
    other arguments do not depend on the root, whose positions (index, views) do not
    depend on any attention output, and nothing reads the root before that write. A
    second run then rewrites the same elements (the first run's values, computed with
    dense attention, are all overwritten) and reads nothing the first run left."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    attention = set(gm.graph.find_nodes(op="call_function",
                                        target=torch.ops.dsa.attention.default))

    def is_view(n: fx.Node) -> bool:
        return n.op in ("call_function", "call_method") and op_of(n) in _VIEWS and \
            bool(n.args) and isinstance(n.args[0], fx.Node)

    attr_nodes: dict = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_nodes[n.target] = attr_nodes.get(n.target, 0) + 1
    safe = set()
    for root in gm.graph.nodes:
        if root.op not in ("placeholder", "get_attr") or \
                root.op == "get_attr" and attr_nodes[root.target] > 1:
            continue
        aliases, stack = {root}, [root]
        while stack:  # the root and every view of it
            for u in stack.pop().users:
                if is_view(u) and u.args[0] in aliases and u not in aliases:
                    aliases.add(u)
                    stack.append(u)
        writes = [u for a in aliases for u in a.users
                  if mutates(u) and u.args and u.args[0] is a]
        if not writes:
            continue
        if len(writes) != 1 or _name(writes[0]) not in _VALUE_ARG or \
                (_name(writes[0]) == "index_put_" and _accumulates(writes[0])):
            continue
        w = writes[0]
        reads = [u for a in aliases for u in a.users if u is not w and not is_view(u)]
        if any(order[r] < order[w] for r in reads):
            continue
        if any(_depends_on(x, aliases) for x in [*w.args[1:], *w.kwargs.values()]):
            continue
        # Where it writes must not hang on the attention (dense in the fit run, sparse
        # in the real one): only what it writes may differ between the two runs.
        value = _VALUE_ARG[_name(w)]
        where = [x for i, x in enumerate(w.args[1:], 1) if i != value]
        views = [list(a.args[1:]) for a in aliases if a is not root]
        if _depends_on([*where, *w.kwargs.values(), *views], attention):
            continue
        safe.add(root if root.op == "placeholder" else root.target)
    return safe


def _name(n: fx.Node) -> str:
    if n.op == "call_method":
        return n.target
    if n.target is operator.setitem:
        return "setitem"
    if isinstance(n.target, torch._ops.OpOverload):
        return n.target._opname
    return getattr(n.target, "__name__", "")


def _accumulates(n: fx.Node) -> bool:
    acc = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
    return acc is not False


def _depends_on(x, nodes: set) -> bool:
    """True if an argument ``x`` (a node, or a structure holding nodes) has an
    ancestor in ``nodes``."""
    stack, seen = [], set()
    fx.node.map_arg(x, stack.append)
    while stack:
        y = stack.pop()
        if y in nodes:
            return True
        if y not in seen:
            seen.add(y)
            stack.extend(y.all_input_nodes)
    return False


@contextlib.contextmanager
def _swapped_attrs(gm: fx.GraphModule, targets: set):
    """Each ``get_attr`` tensor in ``targets`` replaced by a copy for the block."""
    saved = []
    for target in targets:
        owner, _, name = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        t = getattr(mod, name)
        if isinstance(t, torch.Tensor):
            saved.append((mod, name, t))
            if name in mod._buffers:
                mod._buffers[name] = t.clone()
            else:
                object.__setattr__(mod, name, t.clone())
    try:
        yield
    finally:
        for mod, name, t in saved:
            if name in mod._buffers:
                mod._buffers[name] = t
            else:
                object.__setattr__(mod, name, t)


@contextlib.contextmanager
def _dense_sites(gm: fx.GraphModule):
    """Every dsa.attention node of ``gm`` with dense_below = all keys, for the block."""
    saved = {}
    for n in gm.graph.nodes:
        if n.target is torch.ops.dsa.attention.default:
            saved[n] = (n.args, n.kwargs)
            set_args(n, dense_below=2**62)
    gm.recompile()
    try:
        yield
    finally:
        for n, (args, kwargs) in saved.items():
            n.args, n.kwargs = args, kwargs
        gm.recompile()


def _warn_unfitted(why: str) -> None:
    warnings.warn(f"dsa: {why}; the new indexers start from data-free projections, which "
                  "select poorly. Run the model once through dsa_compile.apply on real "
                  "inputs, or calibrate / load_indexers before compiling.", stacklevel=4)
