"""Stage 3 (torch.compile only): thread an index-key cache through each rewritten site.

A rewritten site projects index keys from the whole K it attends to, so a decode step
would re-project every cached token (at 128K that alone costs 3x a dense decode step).
An index key is a per-token function of its K row (:meth:`Indexer.project_keys`), so
when the site's K comes from a KV-cache write the graph can project only the new rows
and keep a mirror of the cache in index-key space, [B, L, d_I]:

    static cache (HF StaticCache):  buf.index_copy_(2, pos, k_new)   K = buf[:, :, :n]?
        ->  mirror.index_copy_(1, pos, project_keys(k_new));  k_idx = mirror[:, :n]?
    dynamic cache (HF DynamicCache): K = cat([past, k_new], 2)
        ->  k_idx = cat([past_mirror, project_keys(k_new)], 1)

Where a mirror lives: a cache tensor that enters the graph as an input (the static
buffer, the dynamic ``past``) gets its mirror through a new trailing graph input; one
the graph creates and returns (the prefill's lazily built buffer, the dynamic ``cat``)
gets its mirror as a new trailing output. The backend's wrapper feeds and collects them
through :data:`dsa_compile.backends.index_cache.STORE`, keyed by the K tensor itself and
checked against its version counter, so the compiled graph never recompiles for it and
a cache changed outside the graph (reset, beam reorder, crop) is re-projected, never
read stale. A site whose K is not a cache write this pass can prove stays as it was
(every key projected each call: exact, only slower).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx
from torch.fx import Node

from dsa_compile.indexer import Indexer
from dsa_compile.ops.spec import get_arg, set_args
from dsa_compile.passes.normalize import mutates, val
from dsa_compile.reference.index_keys import SCALE_BYTES, packed_width


@dataclasses.dataclass
class MirrorInput:
    """A trailing graph input: the index keys of the K tensor at input ``source``."""

    source: int
    indexer: Indexer
    dtype: torch.dtype


@dataclasses.dataclass
class CachePlan:
    """What the wrapper around the compiled graph must feed and collect.

    inputs: one per new trailing placeholder, in order.
    outputs: for each new trailing output, (index of the original output it mirrors,
        the indexer that projected it).
    sites: {site name: (cache kind 'static' | 'dynamic', key rows projected per call)}.
    """

    inputs: list[MirrorInput] = dataclasses.field(default_factory=list)
    outputs: list[tuple[int, Indexer]] = dataclasses.field(default_factory=list)
    sites: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    examples: list = dataclasses.field(default_factory=list)
    graph: fx.GraphModule | None = None  # the rewritten copy to compile


_FULL = slice(None)
_NOT = object()


def _prefix_stop(index):
    """``stop`` of an index that only keeps a prefix of dim 2 ([:, :, :stop]), else
    the sentinel ``_NOT``; ``stop`` may be an int, a Node or None."""
    if not isinstance(index, tuple) or len(index) < 3:
        return _NOT
    a, b, c, *rest = index
    if a != _FULL or b != _FULL or not isinstance(c, slice):
        return _NOT
    if c.start not in (None, 0) or c.step not in (None, 1):
        return _NOT
    if any(r != _FULL and r is not Ellipsis for r in rest):
        return _NOT
    return c.stop


def _is_index_copy(n: Node) -> bool:
    return (n.op == "call_method" and n.target == "index_copy_") or (
        n.op == "call_function" and getattr(n.target, "__name__", "") == "index_copy_")


def _dim2(dim, x: Node) -> bool:
    t = val(x)
    return t is not None and t.dim() == 4 and dim in (2, -2)


def _cache_write(k: Node, order: dict[Node, int], attention: Node):
    """(kind, write node, prefix stops) when ``k`` is a KV-cache write, else None.

    kind 'static': ``write`` is ``buf.index_copy_(2, pos, k_new)`` and no other node
    writes ``buf``; 'dynamic': ``write`` is ``cat([past, k_new], 2)``.
    """
    stops = []
    while True:
        if k.op == "call_method" and k.target == "contiguous" and len(k.args) == 1:
            k = k.args[0]
        elif k.op == "call_function" and k.target is operator.getitem and isinstance(
                k.args[0], Node):
            stop = _prefix_stop(k.args[1])
            if stop is _NOT:
                return None
            stops.append(stop)
            k = k.args[0]
        else:
            break
    if k.op == "call_function" and k.target is torch.cat and not k.kwargs.get("out"):
        parts = k.args[0]
        dim = k.args[1] if len(k.args) > 1 else k.kwargs.get("dim", 0)
        if (isinstance(parts, (list, tuple)) and len(parts) == 2
                and all(isinstance(p, Node) for p in parts) and _dim2(dim, k)):
            return "dynamic", k, stops
        return None
    buf = k.args[0] if _is_index_copy(k) else k
    if not isinstance(buf, Node):
        return None
    writes = [u for u in buf.users if mutates(u)]
    if len(writes) != 1 or not _is_index_copy(writes[0]) or writes[0].args[0] is not buf:
        return None
    write = writes[0]
    if len(write.args) != 4 or write.kwargs or not _dim2(write.args[1], buf):
        return None
    if order[write] > order[attention]:
        return None
    return "static", write, stops


def _fresh_zeros(n: Node) -> bool:
    """A buffer the graph allocates as zeros (HF StaticCache's lazy initialisation)."""
    return n.op == "call_function" and n.target in (torch.zeros, torch.ops.aten.zeros.default)


def _new_rows_ok(k_new: Node, whole: Node) -> bool:
    a, b = val(k_new), val(whole)
    return (a is not None and b is not None and a.dim() == 4
            and (a.shape[0], a.shape[1], a.shape[3]) == (b.shape[0], b.shape[1], b.shape[3]))


def _fake_mirror(like: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A fake [B, L, d_I] example sized from the cache tensor's fake value (symbolic
    lengths stay symbolic, so the graph does not specialise on the cache length)."""
    with like.fake_mode:
        return torch.empty(like.size(0), like.size(2), width, dtype=dtype, device=like.device)


def thread_index_cache(gm: fx.GraphModule, fp8: bool = False) -> CachePlan:
    """Rewrite every ``dsa.attention`` whose K is a cache write (see the module doc);
    returns the plan the backend's wrapper follows. ``gm`` must be a copy the caller owns
    (new placeholders would confuse dynamo's own graph). ``fp8``: mirrors hold packed
    FP8 keys, uint8 [B, L, d_I + 4] (reference/index_keys.py), where d_I % 4 == 0."""
    g = gm.graph
    plan = CachePlan()
    order = {n: i for i, n in enumerate(g.nodes)}
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    output = next(n for n in g.nodes if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else None
    if outs is None:
        return plan
    new_placeholders: list[tuple[Node, torch.Tensor]] = []
    extra_outs: list[Node] = []
    attentions = [n for n in g.nodes if n.op == "call_function"
                  and n.target is torch.ops.dsa.attention.default]
    for att in attentions:
        k_idx = get_arg(att, "k_idx")
        if not (isinstance(k_idx, Node) and k_idx.target is operator.getitem
                and k_idx.args[1] == 1 and k_idx.args[0].op == "call_module"):
            continue
        call = k_idx.args[0]
        indexer = gm.get_submodule(call.target)
        if not isinstance(indexer, Indexer) or len(call.args) != 2 or call.kwargs:
            continue
        q, k = call.args
        found = _cache_write(k, order, att)
        if found is None or val(q) is None:
            continue
        kind, write, stops = found
        dtype, width = val(q).dtype, indexer.index_dim
        packed = fp8 and width % SCALE_BYTES == 0  # else this site keeps a bf16 mirror
        if packed:
            dtype, width = torch.uint8, packed_width(width)
        if kind == "static":
            buf, _, pos, k_new = write.args
            source = buf
        else:
            (source, k_new) = write.args[0]
        if not _new_rows_ok(k_new, write if kind == "dynamic" else buf):
            continue
        src_val = val(source)
        if kind == "dynamic" and src_val is not None and src_val.numel() == 0 and (
                source.op != "placeholder"):
            source = None  # the lazily initialised empty cache of a prefill
        elif source.op != "placeholder" and not (kind == "static" and _fresh_zeros(source)):
            continue
        with g.inserting_before(att):
            call.args = (q, k_new)  # the indexer now projects the new rows only
            new_idx = k_idx
            if packed:
                new_idx = g.call_function(torch.ops.dsa.pack_index_keys.default, (k_idx,))
            mirror = None
            if source is not None and source.op == "placeholder":
                mirror = g.placeholder(f"dsa_index_keys_{len(new_placeholders)}")
                example = _fake_mirror(src_val, width, dtype)
                mirror.meta["example_value"] = mirror.meta["val"] = example
                mirror._dynamo_source = None
                # A fixed address, like a StaticCache's buffers: CUDA graphs neither copy
                # it in each replay nor refuse the graph for writing it in place.
                mirror.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
                new_placeholders.append((mirror, example))
                plan.inputs.append(MirrorInput(placeholders.index(source), indexer, dtype))
            if kind == "dynamic":
                whole = new_idx if mirror is None else g.call_function(
                    torch.cat, ([mirror, new_idx], 1))
            elif mirror is not None:
                whole = g.call_method("index_copy_", (mirror, 1, pos, new_idx))
            else:
                # A static buffer the graph allocates (the prefill): the site's indexer
                # call, which follows the buffer's write, projects all of it once (its
                # unwritten rows are zeros, projected too).
                call.args = (q, source)
                whole = mirror = new_idx
            cached = whole
            for stop in reversed(stops):
                cached = g.call_function(operator.getitem, (cached, (_FULL, slice(None, stop))))
            set_args(att, k_idx=cached)
        tied = write.args[0] if kind == "static" else write
        if tied in outs:
            extra_outs.append(whole if kind == "dynamic" else mirror)
            plan.outputs.append((outs.index(tied), indexer))
        rows = val(source if kind == "static" and source.op != "placeholder" else k_new).shape[2]
        plan.sites[getattr(indexer, "site_name", call.target)] = (
            f"{kind} fp8" if packed else kind, str(rows))
    # Placeholders must precede every other node, in the order the wrapper feeds them.
    last = placeholders[-1] if placeholders else None
    for node, example in new_placeholders:
        if last is not None:
            last.append(node)
        last = node
        plan.examples.append(example)
    if extra_outs:
        output.args = (type(output.args[0])([*outs, *extra_outs]),)
    g.lint()
    gm.recompile()
    return plan
