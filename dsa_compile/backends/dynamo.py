"""The torch.compile backend ``dsa``: rewrite attention, then hand off to Inductor.

    torch.compile(model, backend="dsa", options={"top_k": 2048, "dense_below": 0})
    torch.compile(model, backend="dsa", mode="reduce-overhead")  # CUDA graphs, as Inductor
    torch.compile(model, backend="dsa", options={"top_k": 2048, "mode": "reduce-overhead"})

(torch.compile takes ``mode`` or ``options``, not both: with options, ``mode`` goes in them.)


What the passes did to each graph is a :class:`~dsa_compile.passes.Report`: a
:class:`DSABackend` keeps the reports of the graphs it compiled (``backend.reports``;
``dsa_compile.last_report()`` for the one behind the name "dsa")::

    backend = dsa_compile.DSABackend({"top_k": 2048})
    compiled = torch.compile(model, backend=backend)
    compiled(x); print(backend.last)

Registered only through the ``torch_dynamo_backends`` entry point (pyproject): calling
``register_backend(name="dsa")`` here as well would make lookup fail with "duplicate
name". The DSA ops are opaque custom ops, so Inductor keeps them intact as extern
calls and compiles everything around them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import fx

from dsa_compile.backends.index_cache import call_with_mirrors, index_key_cache
from dsa_compile.config import DSAConfig
from dsa_compile.ops.dispatch import fp8_indexer
from dsa_compile.passes import Report, run_passes
from dsa_compile.passes.detect import normalize_path
from dsa_compile.passes.fit import fit_new_indexers, hint
from dsa_compile.passes.index_cache import thread_index_cache
from dsa_compile.passes.masks import StateGuard


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


class DSABackend:
    """A ``torch.compile`` backend that rewrites attention to DSA and keeps its reports.

    Args:
        options: :class:`DSAConfig` fields (unknown keys raise) and optionally
            ``"mode"`` (Inductor's: ``"reduce-overhead"`` = CUDA graphs); options passed
            by ``torch.compile(..., options=...)`` override them. Checked here: a bad
            one raises ValueError at once.
        keep: how many graphs' reports to keep (the oldest go first).

    Attributes:
        reports: one :class:`~dsa_compile.passes.Report` per graph compiled, oldest
            first (a recompile adds one).
        compiles: graphs compiled so far (recompiles show up here).
    """

    def __init__(self, options: Mapping | None = None, keep: int = 64):
        self.options = dict(options or {})
        DSAConfig.from_options({k: v for k, v in self.options.items() if k != "mode"})
        inductor_mode(self.options.get("mode"))  # bad options raise here, not mid-compile
        self.keep = keep
        self.reports: list[Report] = []
        self.compiles = 0

    @property
    def last(self) -> Report:
        """The most recent graph's report (empty before the first compile)."""
        return self.reports[-1] if self.reports else Report([])

    def __call__(self, gm: fx.GraphModule, example_inputs, options=None, mode=None, **kwargs):
        options = {**self.options, **dict(options or {})}
        mode = options.pop("mode", mode)
        config, patches = DSAConfig.from_options(options), inductor_mode(mode)
        self.compiles += 1
        report = Report([])
        self.reports = [*self.reports, report][-self.keep:]
        return _compile(gm, example_inputs, config, patches, report)


def dsa_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None, **kwargs):
    """Backend entry point of the name "dsa": ``options`` map onto :class:`DSAConfig`
    (unknown keys raise), except ``"mode"``; ``mode`` is Inductor's (``"reduce-overhead"``:
    CUDA graphs). Its reports: :data:`DEFAULT` (``dsa_compile.last_report()``)."""
    return DEFAULT(gm, example_inputs, options, mode, **kwargs)


def last_report() -> Report:
    """The report of the most recent graph compiled by ``backend="dsa"``: which attention
    sites were rewritten to DSA, and why the others were not."""
    return DEFAULT.last


def _compile(gm: fx.GraphModule, example_inputs, config: DSAConfig, patches: dict,
             report: Report):
    """Rewrite ``gm`` (its site records go into ``report``) and compile it with Inductor."""
    dense = _copy(gm)
    guard = plan = None
    try:
        params, real = graph_params(gm, example_inputs)
        guard = StateGuard(real.get)
        report.sites[:] = run_passes(gm, config, params, lookup=guard)
        if report.rewritten:
            _name_indexer_params(gm)
            # With dynamic shapes sizes arrive as SymInts; their hints are the real sizes
            # (reading a hint adds no guard, so the compile stays dynamic).
            inputs = [hint(x) for x in example_inputs]
            before = [(x, x._version) for x in inputs
                      if isinstance(x, torch.Tensor) and not x.is_inference()]
            fit_new_indexers(gm, lambda sub: gm(*map(sub, inputs)), inputs)
            # The fit run wrote in place only what the real call rewrites (a KV cache's
            # new rows): index keys mirrored before it still hold.
            for x, version in before:
                if x._version != version:
                    index_key_cache().carry_over(x, version)
            plan = _plan_index_cache(gm, config, report)
    except Exception as e:  # never break the user's model: fall back to the dense graph
        _warn_dense(e)
        gm, guard, plan = dense, None, None
    from torch._inductor.compile_fx import compile_fx

    compiled = None
    if plan is not None:
        try:
            compiled = compile_fx(plan.graph, [*example_inputs, *plan.examples],
                                  config_patches=patches)
        except Exception as e:
            if isinstance(e, torch._dynamo.exc.RestartAnalysis):
                raise
            warnings.warn(f"dsa: index-key cache off for this graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''})", stacklevel=2)
            plan = None
    if compiled is None:
        try:
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        except Exception as e:
            if gm is dense or isinstance(e, torch._dynamo.exc.RestartAnalysis):
                raise  # dynamo's own control flow (it recompiles), not a failure of ours
            _warn_dense(e)
            return compile_fx(dense, example_inputs, config_patches=patches)
    guard = guard if guard is not None and guard.watching else None
    if not config.index_fp8 and guard is None and plan is None:
        return compiled
    boxed = getattr(compiled, "_boxed_call", False)
    fallback = []

    def run(*args):
        if guard is not None and (fallback or guard.changed()):
            if not fallback:
                warnings.warn("dsa: a buffer the rewrite proved to be a causal mask was "
                              "changed in place; this graph now runs its dense original "
                              "(recompile to rewrite it again)", stacklevel=2)
                fallback.append(dense)
            # The dense fx graph takes its inputs positionally; a boxed call passes a list.
            boxed_call = len(args) == 1 and isinstance(args[0], list)
            return dense(*args[0]) if boxed_call else dense(*args)
        with fp8_indexer(config.index_fp8):
            if plan is not None:
                # Called with one list (boxed), or positionally; the mirrors go last.
                boxed_call = len(args) == 1 and isinstance(args[0], list)
                return call_with_mirrors(compiled, plan, list(args[0] if boxed_call else args),
                                         boxed_call)
            return compiled(*args)

    run._boxed_call = boxed  # same calling convention as the compiled graph
    return run


def inductor_mode(mode: str | None) -> dict:
    """Inductor config patches of a ``torch.compile`` mode (None: the defaults)."""
    if mode is None:
        return {}
    from torch._inductor import list_mode_options

    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"dsa backend: unknown mode {mode!r}; pass one of {modes}")
    return dict(list_mode_options(mode))


def _name_indexer_params(gm: fx.GraphModule) -> None:
    """Give the parameters of the inserted indexers a source in dynamo's map.

    AOTAutograd lifts a dynamo graph's module parameters as static inputs (fixed
    addresses: what CUDA graphs need) only when each has an entry in
    ``_param_name_to_source``; dynamo never saw the indexers, so they get a synthetic
    one. (Without the map it would treat the graph as exported and drop dynamo's
    static-input marks of the weights and of a StaticCache's buffers.)
    """
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in [*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)]:
        if name not in sources:
            sources[name] = ConstantSource(f"__dsa_{name}")


def _plan_index_cache(gm: fx.GraphModule, config: DSAConfig, report: Report):
    """The index-key cache plan of a copy of ``gm`` (None when no site reads a cache, the
    option is off, or autograd records: mirrors are inference state)."""
    if not config.index_cache or torch.is_grad_enabled():
        return None
    work = _copy(gm)
    plan = thread_index_cache(work, fp8=config.index_cache_fp8)
    if not plan.sites:
        return None
    for r in report.sites:
        kind_rows = plan.sites.get(r.name)
        if kind_rows is not None:
            r.index_cache, r.key_rows = kind_rows
    plan.graph = work
    return plan


def _warn_dense(e: Exception) -> None:
    warnings.warn(f"dsa: attention rewrite failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else ''}); compiling the dense graph",
                  stacklevel=3)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    # What AOTAutograd reads to know a dynamo graph and its static inputs (weights, a
    # StaticCache's buffers): without it every input would be copied per CUDA-graph replay.
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    for old_node, new_node in zip(gm.graph.find_nodes(op="placeholder"),
                                  new.graph.find_nodes(op="placeholder")):
        if hasattr(old_node, "_dynamo_source"):
            new_node._dynamo_source = old_node._dynamo_source
    return new


DEFAULT = DSABackend()
"""The instance behind ``backend="dsa"``."""
