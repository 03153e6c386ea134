"""Export a DSA model to one self-contained ONNX file.

    torch.export  ->  dsa ops found?  (else dsa_compile.apply first)
                  ->  torch.onnx.export(dynamo=True) with translations to domain ``dsa``
                  ->  attach model-local FunctionProtos, pin ir_version 10, full check
                  ->  write to a temp file beside ``path``, then os.replace

Every ``torch.ops.dsa.*`` node becomes one ``dsa.*`` node; everything else is standard
ONNX (opset 23). The file runs on a stock onnxruntime through the function bodies.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import onnx
import onnxscript.optimizer
import torch
from onnxscript.values import Opset

from dsa_compile.api import apply
from dsa_compile.config import DSAConfig
from dsa_compile.files import destination, write_atomic
from dsa_compile.onnx import functions

# Markers that make a file recognisably ours (see dsa_compile.onnx.verify); re-exported.
from dsa_compile.onnx.markers import (  # noqa: F401
    IR_VERSION,
    META_CONFIG,
    META_FUNCTIONS,
    META_REWRITE,
    META_VERSION,
    PRODUCER,
    functions_digest,
)
from dsa_compile.onnx.schemas import register_schemas
from dsa_compile.version import __version__

_DSA = Opset(functions.DOMAIN, functions.VERSION)


class ExportError(RuntimeError):
    """The model could not be exported; the message names the offending node."""


# ---------------------------------------------------------------------------------------
# Translations: torch.ops.dsa.*  ->  dsa.* nodes (trace-only onnxscript functions)
# ---------------------------------------------------------------------------------------


def _no_general_mask(mask, bias) -> None:
    if mask is not None or bias is not None:
        raise ExportError(
            "a dsa op carries a general attention mask (one the passes could not prove "
            "causal or key padding, e.g. built from cache_position); the ONNX dsa ops take "
            "causal + key_mask only. Export without a static cache, or keep that site "
            "dense with DSAConfig(exclude=[...])")


def translation_table(query_chunk: int = functions.DEFAULT_QUERY_CHUNK) -> dict:
    """{torch op overload: trace-only onnxscript translation} for ``torch.onnx.export``.

    A key_mask becomes the node's optional last input (:func:`finish_model` then sets the
    node's function overload).
    """

    def attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal=True, q_offset=0,
                  key_mask=None, softcap=0.0, dense_below=0, mask=None, bias=None):
        _no_general_mask(mask, bias)
        mask = () if key_mask is None else (key_mask,)
        return _DSA.Attention(q, k, v, q_idx, k_idx, w, *mask, top_k=int(top_k),
                              scale=float(scale), causal=int(bool(causal)),
                              q_offset=int(q_offset), softcap=float(softcap),
                              dense_below=int(dense_below), query_chunk=query_chunk)

    def indexer_topk(q_idx, k_idx, w, top_k, q_offset=0, causal=True, key_mask=None,
                     mask=None):
        _no_general_mask(mask, None)
        mask = () if key_mask is None else (key_mask,)
        return _DSA.IndexerTopK(q_idx, k_idx, w, *mask, top_k=int(top_k),
                                q_offset=int(q_offset), causal=int(bool(causal)),
                                query_chunk=query_chunk)

    def sparse_attention(q, k, v, indices, scale, softcap=0.0, bias=None):
        _no_general_mask(None, bias)
        return _DSA.SparseAttention(q, k, v, indices, scale=float(scale),
                                    softcap=float(softcap), query_chunk=query_chunk,
                                    _outputs=2)

    return {
        torch.ops.dsa.attention.default: attention,
        torch.ops.dsa.indexer_topk.default: indexer_topk,
        torch.ops.dsa.sparse_attention.default: sparse_attention,
    }


# The ONNX op of each torch op.
_FUNCTION_OF = {"attention": "Attention", "indexer_topk": "IndexerTopK",
                "sparse_attention": "SparseAttention"}


# ---------------------------------------------------------------------------------------
# Graph inspection
# ---------------------------------------------------------------------------------------


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else "<root>"
    return f"node {node.name!r} ({node.target}) in module {module!r}"


def dsa_nodes(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The ``torch.ops.dsa.*`` call nodes of an exported program."""
    return [n for n in program.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "dsa"]


def check_exportable(program: torch.export.ExportedProgram) -> list[str]:
    """Raise :class:`ExportError` naming the first dsa node that has no ONNX form.

    Returns the ONNX op names (``Attention``, ...) the graph needs.
    """
    needed = []
    for node in dsa_nodes(program):
        op = node.target._opname if hasattr(node.target, "_opname") else str(node.target)
        if op not in _FUNCTION_OF:
            raise ExportError(
                f"cannot export {_where(node)}: torch.ops.dsa.{op} has no ONNX form (only "
                f"{sorted(_FUNCTION_OF)} do); remove it from the inference graph")
        needed.append(_FUNCTION_OF[op])
    return sorted(set(needed))


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


def _dynamic_shapes(example_args: Sequence[Any], dynamic: bool):
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(a.dim())} if isinstance(a, torch.Tensor) else None
                 for a in example_args)


def _torch_export(model, example_args, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = _dynamic_shapes(example_args, dynamic)
    params = inspect.signature(model.forward).parameters.values()
    if shapes is not None and any(p.kind is p.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*args): the specs of all args form one entry
    return torch.export.export(model, tuple(example_args), dynamic_shapes=shapes, strict=False)


def _warn_unfitted(model: torch.nn.Module) -> None:
    """Tracing never fits an indexer, so an unfitted one would be exported data-free."""
    from dsa_compile.indexer import REGISTRY, Indexer

    found = {id(m): m for m in model.modules() if isinstance(m, Indexer)}
    found.update({id(m): m for m in REGISTRY.indexers_of(model).values()})
    unfitted = sorted(getattr(m, "site_name", type(m).__name__) for m in found.values()
                      if not getattr(m, "fitted", True))
    if unfitted:
        warnings.warn(
            f"exporting {len(unfitted)} indexer(s) that never saw data ({unfitted[:3]}...): "
            f"their data-free init selects poorly; run the model once on >= 256 real tokens "
            f"or calibrate / load_indexers before export", stacklevel=3)


class CausalLMLogits(torch.nn.Module):
    """(input_ids [B, L], optional attention_mask [B, L]) -> logits [B, L, V] of a Hugging
    Face causal LM, without KV cache.

    Wrap a transformers model in this before export so the ONNX file has one output;
    export with ``(input_ids, attention_mask)`` for a file that takes padded batches
    (attention_mask int64 or bool, 1 = token, 0 = padding).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).logits


class _CausalMask(torch.overrides.TorchFunctionMode):
    """Turn an SDPA call with an explicit mask into ``is_causal=True``.

    Under torch.export, transformers always materialises the causal mask (it cannot skip
    it for a dynamic length). For the inputs :class:`SDPAOverrideDSA` supports
    (input_ids only: no padding, full causal attention) that mask is exactly causal;
    eager calls check it, traced ones cannot.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        mask = rest[0] if rest else kwargs.pop("attn_mask", None)
        if mask is None:
            return func(*args, **kwargs)
        if not isinstance(mask, torch._subclasses.fake_tensor.FakeTensor):
            lq, lk = q.shape[2], k.shape[2]
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            if mask.dtype != torch.bool or not torch.equal(mask.expand(-1, -1, lq, lk)[0, 0],
                                                           causal):
                raise ExportError("the model passes a non-causal attention mask (padding or "
                                  "a sliding window); export it through dsa_compile.apply")
        kwargs.pop("is_causal", None)
        return func(q, k, v, is_causal=True, **{k_: v_ for k_, v_ in kwargs.items()
                                                if k_ in ("scale", "enable_gqa")})


class SDPAOverrideDSA(torch.nn.Module):
    """``model`` with every SDPA call swapped for ``torch.ops.dsa.attention`` (sparse path
    forced, each site's registry indexer), through
    :func:`dsa_compile.evaluation.attention_override` -- the same PyTorch DSA model that
    ``evaluation.perplexity(..., mode="dsa")`` measures. The rewrite export falls back
    to when ``dsa_compile.apply`` converts nothing.

    The indexers are registered as submodules so their weights export as initializers;
    call the wrapper once eagerly (``prepare``) so every site's indexer exists (and fits
    itself on >= 256 real tokens) before tracing.
    """

    def __init__(self, model: torch.nn.Module, config: DSAConfig | None) -> None:
        super().__init__()
        hf_config = getattr(getattr(model, "model", model), "config", None)
        if getattr(hf_config, "sliding_window", None):
            raise ExportError("models with sliding-window attention need dsa_compile.apply")
        self.model = model
        self.config = config or DSAConfig()
        self.indexers = torch.nn.ModuleDict()

    def prepare(self, example_args: Sequence[Any]) -> None:
        """One eager run in "dsa" mode: creates (and fits) every site's indexer."""
        from dsa_compile.evaluation import attention_override
        from dsa_compile.indexer import REGISTRY

        with torch.no_grad(), attention_override(self.model, "dsa", self.config) as override:
            self.model(*example_args)
        if override.swapped == 0:
            raise ExportError("no attention call of the model could be swapped for DSA "
                              "(it must call F.scaled_dot_product_attention without a mask)")
        self._sites = REGISTRY.indexers_of(self.model)
        for name, indexer in self._sites.items():
            self.indexers[name.replace(".", "__") or "root"] = indexer

    def _site_attention(self, call) -> torch.Tensor:
        """The DSA attention of one SDPA call (what attention_override's "dsa" mode runs);
        the indexer is found by site name, since tracing replaces the parameters that
        the registry keys on."""
        from dsa_compile.evaluation import site_dsa_attention

        indexer = self._sites.get(call.name)
        if indexer is None:
            raise ExportError(f"attention site {call.name!r} had no indexer after prepare()")
        k, v = call.k, call.v
        if k.shape[1] != indexer.num_kv_heads:
            # Traced transformers may repeat_kv the KV heads (each n_rep times in a row)
            # instead of passing enable_gqa: take one copy of each back.
            rep = k.shape[1] // indexer.num_kv_heads
            k, v = k[:, ::rep], v[:, ::rep]
        return site_dsa_attention(call, indexer, self.config, k, v)

    def forward(self, *args):
        from dsa_compile.evaluation import attention_override

        if not hasattr(self, "_sites"):
            raise ExportError("call SDPAOverrideDSA.prepare(example_args) before running it")
        with attention_override(self.model, "capture", handler=self._site_attention), \
                _CausalMask():
            return self.model(*args)


def _apply_rewrite(model, example_args, config) -> tuple[torch.nn.Module | None, str]:
    """``dsa_compile.apply``'s rewrite when it converts at least one site."""
    try:
        rewritten = apply(model, tuple(example_args), config)
    except Exception as err:  # any capture failure: fall back, but say why
        return None, f"dsa_compile.apply failed: {type(err).__name__}: {err}"
    report = getattr(rewritten, "dsa_report", None)
    if report is not None and not report.rewritten:
        return None, f"dsa_compile.apply converted no site:\n{report}"
    return rewritten, ""


def to_dsa_program(model: torch.nn.Module, example_args: Sequence[Any],
                   config: DSAConfig | None, dynamic: bool,
                   ) -> tuple[torch.export.ExportedProgram, str]:
    """An ExportedProgram with dsa ops, and which rewrite made them.

    The rewrite is "model" (the model already calls the dsa ops), "apply"
    (``dsa_compile.apply(model, example_args, config)``) or, when apply fails or
    converts nothing, "sdpa_override" (:class:`SDPAOverrideDSA`, with a warning).
    """
    program = _torch_export(model, example_args, dynamic)
    if dsa_nodes(program):
        _warn_unfitted(model)
        return program, "model"
    rewritten, why_not = _apply_rewrite(model, example_args, config)
    if rewritten is not None:
        program = _torch_export(rewritten, example_args, dynamic)
        try:
            check_exportable(program)
        except ExportError as err:  # e.g. a dsa op without an ONNX form
            why_not = f"the graph of dsa_compile.apply cannot be exported: {err}"
        else:
            if dsa_nodes(program):
                _warn_unfitted(model)
                return program, "apply"
            why_not = "the graph of dsa_compile.apply has no dsa node after torch.export"
    warnings.warn(f"{why_not}\nexporting through the SDPA override instead "
                  f"(dsa_compile.onnx.SDPAOverrideDSA)", stacklevel=3)
    rewritten = SDPAOverrideDSA(model, config)
    rewritten.prepare(example_args)
    how = "sdpa_override"
    _warn_unfitted(model)
    program = _torch_export(rewritten, example_args, dynamic)
    if not dsa_nodes(program):
        raise ExportError(
            "the DSA rewrite found no attention site to convert; nothing DSA to export "
            "(see dsa_compile.explain(model, example_args))")
    return program, how


def finish_model(model: onnx.ModelProto, config: DSAConfig | None,
                 rewrite: str = "model") -> onnx.ModelProto:
    """Set each dsa node's function overload, attach the function bodies it needs and our
    markers (with the bodies' hash), pin the IR version, full-check."""
    register_schemas()
    needed = set()
    for node in model.graph.node:
        if node.domain == functions.DOMAIN:
            node.overload = functions.overload_of(node)
            needed.add((node.op_type, node.overload))
    kept = [f for f in model.functions if f.domain != functions.DOMAIN]
    del model.functions[:]
    model.functions.extend(kept + [functions.function(op, overload)
                                   for op, overload in sorted(needed)])
    if not any(o.domain == functions.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(functions.DOMAIN, functions.VERSION))
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    model.producer_version = __version__
    meta = {META_VERSION: __version__, META_REWRITE: rewrite,
            META_CONFIG: json.dumps(dataclasses.asdict(config) if config else None),
            META_FUNCTIONS: functions_digest(model)}
    for prop in list(model.metadata_props):
        if prop.key in meta:
            model.metadata_props.remove(prop)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})
    onnx.checker.check_model(model, full_check=True)
    return model


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to a temp file in the folder of path's target (symlinks followed),
    then rename it over the target; ValueError for a directory, device node or FIFO at
    ``path`` or a missing folder (see :mod:`dsa_compile.files`)."""
    write_atomic(path, lambda tmp: onnx.save_model(model, tmp), "export")


def export(model: torch.nn.Module, example_args: Sequence[Any], path: str | os.PathLike,
           config: DSAConfig | dict | None = None, dynamic: bool = True,
           query_chunk: int | None = None, past: bool = False, dense: bool = False,
           logits: str = "all", shared_buffer: bool = False) -> onnx.ModelProto:
    """Export a DSA model to ``path`` as one ONNX file that stock onnxruntime runs.

    Args:
        model: a module whose forward calls ``torch.ops.dsa.*`` (already rewritten), or a
            dense model that ``dsa_compile.apply(model, example_args, config)`` rewrites.
        example_args: positional example inputs (tuple), e.g. ``(input_ids,)`` with
            input_ids int64 [B, L], or ``(input_ids, attention_mask)`` for a file that
            takes padded batches (the padding reaches the dsa nodes as their key_mask).
        path: output file; replaced atomically, never left partial. A symlink is followed
            (its target is replaced); it is checked before the export starts.
        config: DSAConfig (or options dict) for the rewrite; recorded in the file.
        dynamic: export every tensor dimension as dynamic where the model allows (one file
            serves any sequence length the model supports). torch.export fixes a size-1
            example dimension: give a batch of 2 to keep the batch dynamic.
        query_chunk: query rows per Loop iteration in the dsa function bodies (memory/speed
            knob; default functions.DEFAULT_QUERY_CHUNK).
        past: write a decoder with state instead (:mod:`dsa_compile.onnx.decoder`): inputs
            input_ids, attention_mask, position_ids and past_key_values.{i}.key / .value /
            .index_key, outputs logits and present.*; one file for prefill and decode.
            ``model`` is then a Hugging Face Llama-family causal LM and ``example_args``
            its example input_ids (for the indexers); ``dynamic`` is ignored (always).
        dense: with past=True, opset-23 ``Attention`` with past state instead of DSA (the
            dense baseline; no dsa node, so :func:`verify` refuses it).
        logits: with past=True, "all" ([B, L, V]) or "last" ([B, 1, V]).
        shared_buffer: with past=True, the state tensors are fixed-capacity buffers whose
            new rows the graph writes with ScatterND (present.* = past_key_values.* with
            P .. P + L - 1 written), so a runtime that binds each present.* to its past
            buffer (onnxruntime IOBinding, as :func:`dsa_compile.onnx.generate` does)
            updates the cache in place instead of copying it every step. What
            onnxruntime-genai calls past_present_share_buffer.

    Returns:
        The saved ModelProto.

    Raises:
        ExportError: no dsa op after rewriting, or a node that cannot be exported (the
            message names it); ``path`` is untouched.
        ValueError: ``path`` is a directory or special file (device, FIFO), or its folder
            does not exist or is not writable (before any export work).

    Warns when ``dsa_compile.apply`` is missing or converts nothing and the export falls
    back to :class:`SDPAOverrideDSA` (recorded as "rewrite" in :func:`verify`'s report),
    and when an indexer that never saw data is exported.
    """
    target = destination(path, "export")  # a bad path fails now, not after the export
    config = DSAConfig.from_options(config) if config is not None else None
    if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk <= 0):
        raise ValueError(f"query_chunk must be a positive int, got {query_chunk!r}")
    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    if past:
        return _export_decoder(model, example_args, target, config, dense, logits,
                               query_chunk or functions.DEFAULT_QUERY_CHUNK, shared_buffer)
    if dense or shared_buffer:
        raise ValueError("dense=True and shared_buffer=True need past=True (a decoder)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program, rewrite = to_dsa_program(model, example_args, config, dynamic)
        check_exportable(program)
        register_schemas()
        table = translation_table(query_chunk or functions.DEFAULT_QUERY_CHUNK)
        try:
            onnx_program = torch.onnx.export(
                program, opset_version=functions.ONNX_OPSET, dynamo=True,
                custom_translation_table=table, optimize=False, verbose=False)
            # Constant folding and clean-up only: optimize=True would also fuse opset-23
            # RotaryEmbedding nodes whose cos/sin keep the batch-1 shape of Hugging Face
            # position ids, which onnxruntime rejects for any batch > 1.
            onnxscript.optimizer.optimize_ir(onnx_program.model)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed: {err}") from err
        model_proto = finish_model(onnx_program.model_proto, config, rewrite)
    finally:
        model.train(was_training)
    save_atomic(model_proto, target)
    return model_proto


def _export_decoder(model, example_args, target, config, dense, logits, query_chunk,
                    shared_buffer):
    from dsa_compile.onnx.decoder import DecoderExportError, build_decoder

    if isinstance(example_args, dict):
        ids = example_args.get("input_ids")
    else:
        ids = example_args[0] if len(example_args) else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            proto = build_decoder(model, config, dense, ids, query_chunk, logits,
                                  shared_buffer)
        proto = finish_model(proto, None if dense else (config or DSAConfig()),
                             "decoder_dense" if dense else "decoder")
    except DecoderExportError as err:
        raise ExportError(str(err)) from err
    finally:
        model.train(was_training)
    save_atomic(proto, target)
    return proto
