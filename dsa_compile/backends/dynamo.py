"""The torch.compile backend ``dsa``: rewrite attention, then hand off to Inductor.

    torch.compile(model, backend="dsa", options={"top_k": 2048, "dense_below": 0})

Registered only through the ``torch_dynamo_backends`` entry point (pyproject): calling
``register_backend(name="dsa")`` here as well would make lookup fail with "duplicate
name". The DSA ops are opaque custom ops, so Inductor keeps them intact as extern
calls and compiles everything around them.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

from dsa_compile.config import DSAConfig
from dsa_compile.passes import run_passes
from dsa_compile.passes.detect import normalize_path

LAST_RECORDS: list = []
"""Site records of the most recent graph this backend compiled (for tests and demos)."""

CALLS = {"count": 0}
"""How many graphs the backend has compiled (recompiles show up here)."""


def graph_params(gm: fx.GraphModule, example_inputs) -> tuple[dict, dict]:
    """({FQN: real parameter}, {placeholder node: real input}) of a dynamo graph.

    Dynamo (torch >= 2.5, inlined nn modules) passes parameters as placeholders whose
    source names read like ``L['self']._modules['q_proj']._parameters['weight']``.
    """
    params, real = {}, {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        real[node] = value
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", None)
        if source is not None and isinstance(value, torch.nn.Parameter):
            params[normalize_path(source() if callable(source) else source)] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                real[node] = obj
                if isinstance(obj, torch.nn.Parameter):
                    params[node.target] = obj
    return params, real


def dsa_backend(gm: fx.GraphModule, example_inputs, options=None, **kwargs):
    """Backend entry point: ``options`` map onto :class:`DSAConfig` (unknown keys raise)."""
    config = DSAConfig.from_options(options)
    CALLS["count"] += 1
    dense = _copy(gm)
    try:
        params, real = graph_params(gm, example_inputs)
        LAST_RECORDS[:] = run_passes(gm, config, params, lookup=real.get)
        if any(r.rewritten for r in LAST_RECORDS):
            if hasattr(gm, "_param_name_to_source"):
                # The inserted indexers own parameters dynamo never saw; without this map
                # AOTAutograd lifts every module parameter like export does.
                del gm._param_name_to_source
            fit_new_indexers(gm, example_inputs)
    except Exception as e:  # never break the user's model: fall back to the dense graph
        warnings.warn(f"dsa: attention rewrite failed ({type(e).__name__}: {e}); "
                      "compiling the dense graph", stacklevel=2)
        gm = dense
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def fit_new_indexers(gm: fx.GraphModule, example_inputs) -> None:
    """Fit every not-yet-fitted indexer of ``gm`` on the real example inputs.

    Inside a compiled graph an indexer only ever sees traced tensors, so without this a
    plain ``torch.compile(model, backend="dsa")`` would select with data-free random
    projections (SmolLM2: 1.88x perplexity instead of 1.02x). The graph runs once,
    eagerly, and each unfitted indexer fits itself on its site's q and k. Skipped (the
    indexers stay data-free, with a warning) when the inputs are not real tensors, are
    too short to fit on, or the graph mutates its inputs (running it twice would too).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    from dsa_compile.indexer import FIT_MIN_TOKENS, Indexer

    todo = [m for m in gm.modules() if isinstance(m, Indexer) and not m.fitted]
    if not todo:
        return
    # With dynamic shapes the sizes arrive as SymInts; their hints are the real sizes
    # (reading a hint adds no guard, so the compile stays dynamic).
    inputs = [_hint(x) for x in example_inputs]
    if any(isinstance(x, FakeTensor) or x is None for x in inputs) or _mutates(gm):
        _warn_unfitted("cannot run the graph on the example inputs")
        return

    def fit_hook(indexer: Indexer, args):
        q, k = args
        if not indexer.fitted and k.shape[0] * k.shape[2] >= FIT_MIN_TOKENS:
            indexer.fit(q, k)

    handles = [m.register_forward_pre_hook(fit_hook) for m in todo]
    try:
        with torch.no_grad():
            _DenseInterpreter(gm).run(*inputs)
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


class _DenseInterpreter(fx.Interpreter):
    """Runs the rewritten graph with every DSA site dense (dense_below = every key):
    indexers fit on the dense model's activations, which is what they approximate,
    and the run costs no more than the dense model."""

    def call_function(self, target, args, kwargs):
        if target is torch.ops.dsa.attention.default and len(args) == 13:
            args = (*args[:12], 2**62)
        return super().call_function(target, args, kwargs)


def _hint(x):
    """A SymInt/SymFloat/SymBool's concrete value (None if it has none); others as is."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint
    return x


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


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new
