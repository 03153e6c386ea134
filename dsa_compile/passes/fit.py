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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from dsa_compile.indexer import FIT_MIN_TOKENS, Indexer


def hint(x):
    """A SymInt/SymFloat/SymBool's concrete value (None if it has none); others as is."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint
    return x


def fit_new_indexers(gm: fx.GraphModule, run: Callable[[], Any],
                     inputs: Sequence[Any] = ()) -> None:
    """Fit every not-yet-fitted indexer of ``gm`` by calling ``run()`` (which runs ``gm``
    on real inputs) once.

    Skipped, with a warning (the indexers stay data-free), when ``inputs`` hold fake or
    hint-less values, when the graph mutates state (running it once more would repeat the
    mutation), when the run fails, or when the inputs are too short to fit on.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    todo = [m for m in gm.modules() if isinstance(m, Indexer) and not m.fitted]
    if not todo:
        return
    if any(isinstance(x, FakeTensor) or x is None for x in inputs) or _mutates(gm):
        _warn_unfitted("cannot run the graph on the example inputs")
        return

    def fit_hook(indexer: Indexer, args):
        q, k = args
        if not indexer.fitted and k.shape[0] * k.shape[2] >= FIT_MIN_TOKENS:
            indexer.fit(q, k)

    handles = [m.register_forward_pre_hook(fit_hook) for m in todo]
    try:
        with torch.no_grad(), _dense_sites(gm):
            run()
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


@contextlib.contextmanager
def _dense_sites(gm: fx.GraphModule):
    """Every dsa.attention node of ``gm`` with dense_below = all keys, for the block."""
    saved = {}
    for n in gm.graph.nodes:
        if n.target is torch.ops.dsa.attention.default and len(n.args) == 13:
            saved[n] = n.args
            n.args = (*n.args[:12], 2**62)
    gm.recompile()
    try:
        yield
    finally:
        for n, args in saved.items():
            n.args = args
        gm.recompile()


def _warn_unfitted(why: str) -> None:
    warnings.warn(f"dsa: {why}; the new indexers start from data-free projections, which "
                  "select poorly. Run the model once through dsa_compile.apply on real "
                  "inputs, or calibrate / load_indexers before compiling.", stacklevel=4)


def _mutates(gm: fx.GraphModule) -> bool:
    """True if some node writes in place (an in-place method or a mutable op)."""
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
            return True
        if n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return True
            name = getattr(n.target, "__name__", "")
            if name.endswith("_") and not name.endswith("__"):
                return True
    return False
