"""The passes as a library: :func:`apply` and :func:`explain`.

Both capture the model with ``torch._dynamo.export`` (the same torch-IR graph the
``dsa`` backend sees, so one set of passes serves both; ``torch.export`` graphs are
ATen-level and build masks through ``aten.index``, which the mask prover does not
cover). The result is an ordinary ``fx.GraphModule`` holding the model's own
parameter tensors (indexers anchor on them by identity, with FQNs relative to the
user's model), that runs eagerly and that ``torch.export`` /
``torch.onnx.export(dynamo=True)`` can trace again, the DSA ops showing as
``torch.ops.dsa.attention`` nodes.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from dsa_compile.config import DSAConfig
from dsa_compile.ops.dispatch import fp8_indexer
from dsa_compile.passes import Report, run_passes
from dsa_compile.passes.fit import fit_new_indexers
from dsa_compile.passes.masks import StateGuard
from dsa_compile.passes.normalize import val


def _split_args(example_args):
    if isinstance(example_args, dict):
        return (), dict(example_args)
    if isinstance(example_args, tuple) and len(example_args) == 2 and \
            isinstance(example_args[1], dict) and isinstance(example_args[0], tuple):
        return example_args
    if not isinstance(example_args, (tuple, list)):
        return (example_args,), {}
    return tuple(example_args), {}


def _uses_cache(model) -> bool:
    """A Hugging Face model whose config turns the KV cache on by default."""
    return bool(getattr(getattr(model, "config", None), "use_cache", False))


_NO_CACHE_NOTE = ("captured without a KV cache (use_cache=False): an fx graph returns "
                  "tensors, not cache objects; to generate with a cache, compile "
                  "model.forward with backend='dsa' (README: Generation)")


def _capture(model, example_args) -> tuple[fx.GraphModule, tuple, dict, list[str]]:
    """(graph, args, kwargs, notes): one dynamo graph of ``model`` on the example inputs.

    A Hugging Face model with its default ``use_cache=True`` would return a cache object,
    which an fx graph cannot: it is captured with ``use_cache=False`` and a note (the
    attention, and so the rewrite, is the same). A forward that raises on the example
    inputs raises that error, not dynamo's.
    """
    args, kwargs = _split_args(example_args)
    if isinstance(model, torch.export.ExportedProgram):
        return model.module(), args, kwargs, []
    if isinstance(model, fx.GraphModule) and any(
            "example_value" in n.meta or "val" in n.meta for n in model.graph.nodes):
        return model, args, kwargs, []
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or ExportedProgram, got {type(model)}")
    notes = []
    if _uses_cache(model) and "use_cache" not in kwargs:
        if kwargs.get("past_key_values") is not None:
            raise ValueError("apply/explain capture one forward without a KV cache; pass no "
                             "past_key_values (to generate with a cache, compile "
                             "model.forward with backend='dsa')")
        kwargs = {**kwargs, "use_cache": False}
        notes.append(_NO_CACHE_NOTE)
    # nn.MultiheadAttention / nn.TransformerEncoder warn about a bool key_padding_mask
    # next to a float attn_mask; let the warning move out of the graph instead of
    # breaking it (export needs one graph).
    logging = torch._dynamo.config.reorderable_logging_functions | {warnings.warn}
    try:
        with torch.no_grad(), torch._dynamo.config.patch(reorderable_logging_functions=logging):
            gm, _ = torch._dynamo.export(model)(*args, **kwargs)
    except Exception as e:
        with torch.no_grad():
            model(*args, **kwargs)  # the model's own error, if its forward fails eagerly
        raise RuntimeError(f"dsa: could not capture {type(model).__name__} as one graph "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                           "torch.compile(model, backend='dsa') handles graph breaks") from e
    _guard_static_shapes(gm, args, kwargs)
    if notes:  # the graph takes use_cache=False; calls without it get it
        gm.register_forward_pre_hook(
            lambda module, a, kw: (a, {"use_cache": False, **kw}), with_kwargs=True)
    return gm, args, kwargs, notes


def _guard_static_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Make ``gm`` say which input size the capture specialised (e.g. batch 1) when it is
    called with another, instead of failing later in a reshape."""
    leaves = [x for x in torch.utils._pytree.tree_leaves((args, kwargs))
              if isinstance(x, torch.Tensor)]
    values = [val(n) for n in gm.graph.nodes if n.op == "placeholder"]
    values = [v for v in values if v is not None]
    if len(values) != len(leaves):
        return
    fixed = [(i, tuple(x.shape), [d for d, s in enumerate(v.shape) if isinstance(s, int)])
             for i, (x, v) in enumerate(zip(leaves, values))]

    def check(module, call_args, call_kwargs):
        now = [x for x in torch.utils._pytree.tree_leaves((call_args, call_kwargs))
               if isinstance(x, torch.Tensor)]
        if len(now) != len(leaves):
            return
        for i, shape, dims in fixed:
            for d in dims:
                if now[i].dim() != len(shape) or now[i].shape[d] != shape[d]:
                    raise ValueError(
                        f"dsa.apply captured input {i} with shape {list(shape)} and "
                        f"specialised dim {d} to {shape[d]}; it was called with "
                        f"{list(now[i].shape)}. Capture with example inputs of the size you "
                        "run (a batch of 2 or more keeps the batch dynamic), or use "
                        "torch.compile(model, backend='dsa', dynamic=True)")

    gm.register_forward_pre_hook(check, with_kwargs=True)


def _params(gm: fx.GraphModule, model) -> dict:
    """{FQN in the user's model: parameter} for the parameters the graph holds."""
    names = {}
    if isinstance(model, nn.Module):
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {names.get(id(p), n): p for n, p in gm.named_parameters(remove_duplicate=False)}


def _lookup(gm: fx.GraphModule):
    def lookup(node):
        if node.op != "get_attr":
            return None
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return lookup


def apply(model_or_graph_module, example_args, config: DSAConfig | None = None) -> nn.Module:
    """Rewrite every provably-safe dense attention of a model into DSA.

    Args:
        model_or_graph_module: an ``nn.Module``, an ``fx.GraphModule`` carrying fake
            values (node.meta 'val'), or a ``torch.export.ExportedProgram``.
        example_args: a tuple of positional inputs, a dict of keyword inputs, or
            ``(args, kwargs)``; shapes only matter for capture (lengths stay free at run
            time only if the capture made them dynamic).
        config: :class:`DSAConfig` (default: ``DSAConfig()``).

    Returns:
        An ``fx.GraphModule`` computing the model with ``torch.ops.dsa.attention`` in
        place of each rewritten site; ``.dsa_report`` holds the :class:`Report`. With
        ``config.index_fp8`` its forward runs inside :func:`fp8_indexer` (CUDA). New
        indexers are fitted, training-free, on ``example_args`` (at least 256 tokens;
        shorter inputs leave them data-free, with a warning).

    Raises:
        TypeError: the model is not a module or exported program.
    """
    config = DSAConfig.from_options(config)
    gm, args, kwargs, notes = _capture(model_or_graph_module, example_args)
    params = _params(gm, model_or_graph_module)
    guard = StateGuard(_lookup(gm))
    records = run_passes(gm, config, params, lookup=guard)
    gm.dsa_report = Report(records, notes)
    if guard.watching:  # a causal-mask buffer was trusted by its value: watch it
        gm.register_forward_pre_hook(lambda module, args: _check_state(guard))
    if config.index_fp8:  # the option means what it means under torch.compile
        generated = gm.forward

        def forward(*a, **kw):
            with fp8_indexer(True):
                return generated(*a, **kw)

        gm.forward = forward
    if any(r.rewritten for r in records):
        flat = torch.utils._pytree.tree_leaves((args, kwargs))

        def run(sub):
            a, kw = torch.utils._pytree.tree_map(sub, (args, kwargs))
            return gm(*a, **kw)

        fit_new_indexers(gm, run, flat, aligned=False)
    return gm


def _check_state(guard: StateGuard) -> None:
    if guard.changed():
        raise ValueError("a buffer that dsa.apply proved to be a causal mask was changed in "
                         "place since; run dsa_compile.apply again on the changed model")


def explain(model, example_args, config: DSAConfig | None = None) -> Report:
    """Which attention sites the passes find, and why each one is or is not rewritten.

    Same arguments as :func:`apply`; the model is not changed.
    """
    config = DSAConfig.from_options(config)
    gm, _, _, notes = _capture(model, example_args)
    params = _params(gm, model)
    return Report(run_passes(gm, config, params, lookup=_lookup(gm), rewrite=False), notes)
