"""ONNX export of DSA models and onnxruntime helpers.

    import dsa_compile.onnx as dsa_onnx
    dsa_onnx.export(model, (input_ids,), "model.onnx", config=DSAConfig(top_k=512))
    session = dsa_onnx.load_session("model.onnx")
    (logits,) = dsa_onnx.run(session, input_ids)

Export with ``(input_ids, attention_mask)`` (e.g. ``CausalLMLogits(hf_model)``) for a file
that takes padded batches: the padding reaches the dsa nodes as their ``key_mask``.

The file holds the DSA ops as domain-``dsa`` nodes (schemas: :mod:`.schemas`) plus
model-local functions in standard ONNX ops (:mod:`.functions`), so a stock onnxruntime
runs it; everything else is standard opset 23.

- :func:`export`        model -> one .onnx file (atomic write; errors name the node)
- :func:`verify`        check a file is a dsa_compile export and passes the full checker
- :func:`load_session`  onnxruntime InferenceSession of a verified file (with
  :func:`session_options`: denormals flushed to zero, as every session here)
- :func:`run`           run a session (or path) on torch / numpy inputs
- :func:`generate`      greedy / sampled generation with a decoder file (``export(...,
  past=True)``) on onnxruntime, numpy only (:mod:`.generation`; :mod:`.decoder` writes it)
- :func:`dsa_compile.onnx.microsoft.to_microsoft`  optional onnxruntime-gpu target
  (com.microsoft DynamicSparseAttention; schema-checked only, no CPU kernel exists)
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from dsa_compile.onnx import functions, schemas
from dsa_compile.onnx import generation as _generation
from dsa_compile.onnx.export import (
    CausalLMLogits,
    ExportError,
    SDPAOverrideDSA,
    export,
    translation_table,
)
from dsa_compile.onnx.generation import generate, session_options
from dsa_compile.onnx.markers import (
    META_CONFIG,
    META_FUNCTIONS,
    META_REWRITE,
    META_VERSION,
    PRODUCER,
    functions_digest,
)
from dsa_compile.onnx.schemas import register_schemas

__all__ = ["CausalLMLogits", "ExportError", "SDPAOverrideDSA", "export", "generate",
           "load_session", "register_schemas", "run", "session_options", "translation_table",
           "verify"]

def _load(path_or_model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = os.fspath(path_or_model)
    if not os.path.isfile(path):
        raise ValueError(f"verify: {path!r} does not exist or is not a file")
    try:
        return onnx.load(path)
    except Exception as err:
        raise ValueError(f"verify: {path!r} is not a readable ONNX file ({err})") from err


def _function_name(name: str, overload: str) -> str:
    return f"{name}:{overload}" if overload else name


# What each dsa attribute may hold (the schemas give names, types and which are required).
_ATTRIBUTE_RULES = {
    "top_k": (lambda v: v >= 1, ">= 1"),
    "scale": (math.isfinite, "finite"),
    "causal": (lambda v: v in (0, 1), "0 or 1"),
    "q_offset": (lambda v: v >= 0, ">= 0"),
    "softcap": (lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
    "dense_below": (lambda v: v >= 0, ">= 0"),
    "query_chunk": (lambda v: v >= 1, ">= 1"),
}
_ATTRIBUTE_TYPES = {onnx.defs.OpSchema.AttrType.INT: onnx.AttributeProto.INT,
                    onnx.defs.OpSchema.AttrType.FLOAT: onnx.AttributeProto.FLOAT}


def _all_nodes(model: onnx.ModelProto):
    """Every node of the graph, of its subgraphs and of the non-dsa local functions."""
    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    yield from walk(graph.node)

    yield from walk(model.graph.node)
    for f in model.functions:
        if f.domain != functions.DOMAIN:
            yield from walk(f.node)


def _check_dsa_node(node: onnx.NodeProto, where: str) -> None:
    """A dsa node is one of our ops, with the schema's inputs, outputs and attributes and
    attribute values the op accepts (a node edited to top_k = 0 would run wrongly)."""
    what = f"verify: {where!r}: node {node.name!r} (dsa.{node.op_type})"
    redo = "the file was altered or not written by dsa_compile.onnx.export; re-export the model"
    if not onnx.defs.has(node.op_type, functions.VERSION, functions.DOMAIN):
        raise ValueError(f"{what} is not a dsa op (the ops are "
                         f"{sorted(s.name for s in schemas.schemas())}); {redo}")
    schema = onnx.defs.get_schema(node.op_type, functions.VERSION, functions.DOMAIN)
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    required = sum(p.option != optional for p in schema.inputs)
    given = len(node.input)
    if not required <= given <= len(schema.inputs) or not all(node.input[:required]):
        raise ValueError(f"{what} has {given} inputs; dsa.{node.op_type} takes {required}"
                         f"{f' to {len(schema.inputs)}' if len(schema.inputs) > required else ''}"
                         f"; {redo}")
    if len(node.output) != len(schema.outputs):
        raise ValueError(f"{what} has {len(node.output)} outputs, dsa.{node.op_type} gives "
                         f"{len(schema.outputs)}; {redo}")
    if node.overload != functions.overload_of(node):
        raise ValueError(f"{what} has function overload {node.overload!r} but its inputs need "
                         f"{functions.overload_of(node)!r}; {redo}")
    attrs = {a.name: a for a in node.attribute}
    unknown = sorted(attrs.keys() - schema.attributes.keys())
    if unknown:
        raise ValueError(f"{what} has unknown attributes {unknown}; {redo}")
    for name, spec in schema.attributes.items():
        if name not in attrs:
            if spec.required:
                raise ValueError(f"{what} lacks the required attribute {name!r}; {redo}")
            continue
        attr = attrs[name]
        if attr.type != _ATTRIBUTE_TYPES[spec.type]:
            raise ValueError(f"{what} has attribute {name!r} of type "
                             f"{onnx.AttributeProto.AttributeType.Name(attr.type)}; {redo}")
        value = onnx.helper.get_attribute_value(attr)
        ok, rule = _ATTRIBUTE_RULES[name]
        if not ok(value):
            raise ValueError(f"{what} has {name} = {value}, which must be {rule}; {redo}")
    if functions.optional_inputs(node)[1] and "q_offset" in attrs and \
            onnx.helper.get_attribute_value(attrs["q_offset"]) != 0:
        raise ValueError(f"{what} has both a q_offset input and a non-zero q_offset "
                         f"attribute (the input replaces the attribute); {redo}")


def _digest(f: onnx.FunctionProto) -> str:
    return hashlib.sha256(f.SerializeToString(deterministic=True)).hexdigest()


def _check_dsa_functions(model: onnx.ModelProto, meta: dict[str, str], where: str) -> None:
    """The dsa function bodies are exactly this dsa_compile's (or an earlier release's,
    functions.RETIRED_BODIES), and the hash recorded at
    export matches them (a file edited after export, or forged, fails here)."""
    ours = {key: {_digest(f), *functions.RETIRED_BODIES.get(key, ())}
            for key, f in functions.all_functions().items()}
    for f in model.functions:
        if f.domain != functions.DOMAIN:
            continue
        name = _function_name(f.name, f.overload)
        if _digest(f) not in ours.get((f.name, f.overload), ()):
            raise ValueError(f"verify: {where!r}: its function dsa.{name} is not the body this "
                             f"dsa_compile writes (edited, forged or from another version); "
                             f"re-export the model")
    recorded = meta.get(META_FUNCTIONS)
    if recorded is None:
        raise ValueError(f"verify: {where!r} carries no {META_FUNCTIONS!r} content check "
                         f"(written by an older dsa_compile, or not by dsa_compile); "
                         f"re-export the model")
    if recorded != functions_digest(model):
        raise ValueError(f"verify: {where!r}: its dsa function bodies do not match the hash "
                         f"recorded at export ({META_FUNCTIONS}); the file was altered, "
                         f"re-export the model")


def verify(path: str | os.PathLike | onnx.ModelProto) -> dict[str, Any]:
    """Check that a file is a dsa_compile export and that it is well formed.

    Runs ``onnx.checker.check_model(full_check=True)`` (types and shapes of the dsa
    nodes through the registered schemas) and checks the file structurally: at least one
    dsa node; every dsa node (subgraphs included) is one of our ops with the schema's
    input, output and attribute counts and types, attribute values in range (top_k >= 1,
    ...) and its function (same name and overload); every dsa function body is exactly
    the one this dsa_compile writes, and the hash of those bodies recorded at export
    (``dsa_compile.functions_sha256``) matches.

    Returns:
        {"dsa_nodes": {op: count}, "functions": [names, "Attention:key_mask" for an
         overload], "ir_version": int,
         "opsets": {domain: version}, "config": dict | None, "version": str,
         "rewrite": "model" | "apply" | "sdpa_override"}

    Raises:
        ValueError: not an ONNX file, or an ONNX file not written by
            :func:`dsa_compile.onnx.export` (no dsa marker, opset, node or function, a
            node or function body that is not ours, a content hash that does not match),
            or one that fails the checker. The message names the file and the node.
    """
    model = _load(path)
    where = os.fspath(path) if not isinstance(path, onnx.ModelProto) else "model"
    meta = {p.key: p.value for p in model.metadata_props}
    opsets = {o.domain: o.version for o in model.opset_import}
    if META_VERSION not in meta or model.producer_name != PRODUCER:
        raise ValueError(
            f"verify: {where!r} was not written by dsa_compile.onnx.export (producer "
            f"{model.producer_name!r}, no {META_VERSION!r} metadata); export the model with "
            f"dsa_compile.onnx.export first")
    if opsets.get(functions.DOMAIN) != functions.VERSION:
        raise ValueError(f"verify: {where!r} does not import opset "
                         f"{functions.DOMAIN!r} v{functions.VERSION}")
    register_schemas()
    nodes = [n for n in _all_nodes(model) if n.domain == functions.DOMAIN]
    if not nodes:
        raise ValueError(f"verify: {where!r} has no dsa node, so it is no DSA export; export "
                         f"the model with dsa_compile.onnx.export")
    for node in nodes:
        _check_dsa_node(node, where)
    _check_dsa_functions(model, meta, where)
    counts = collections.Counter(n.op_type for n in nodes)
    local = {(f.domain, f.name, f.overload) for f in model.functions}
    missing = sorted({_function_name(n.op_type, n.overload) for n in nodes
                      if (functions.DOMAIN, n.op_type, n.overload) not in local})
    if missing:
        raise ValueError(f"verify: {where!r} uses dsa ops {missing} without their model-local "
                         f"functions; onnxruntime could not run it")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"verify: {where!r} fails the ONNX checker: {err}") from err
    config = meta.get(META_CONFIG)
    return {"dsa_nodes": dict(counts),
            "functions": sorted(_function_name(f.name, f.overload) for f in model.functions),
            "ir_version": model.ir_version, "opsets": opsets,
            "config": json.loads(config) if config else None, "version": meta[META_VERSION],
            "rewrite": meta.get(META_REWRITE)}


def load_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None, check: bool = True, **session_options):
    """An onnxruntime InferenceSession of a dsa_compile export.

    Args:
        path: the .onnx file.
        providers: onnxruntime execution providers (default CPU).
        threads: intra-op threads (default: onnxruntime's choice).
        check: run :func:`verify` first (raises ValueError for files that are not ours).
        session_options: extra ``onnxruntime.SessionOptions`` attributes to set.
    """
    import onnxruntime as ort

    if check:
        verify(path)
    options = _generation.session_options(threads)  # the argument shadows the function
    for key, value in session_options.items():
        setattr(options, key, value)
    return ort.InferenceSession(os.fspath(path), options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run(session, *args, **named) -> list[np.ndarray]:
    """Run ``session`` (an InferenceSession or a path) on inputs given by position or name.

    Torch tensors and numpy arrays are accepted; returns the outputs as numpy arrays.
    """
    if isinstance(session, (str, os.PathLike)):
        session = load_session(session)
    names = [i.name for i in session.get_inputs()]
    if len(args) == 1 and isinstance(args[0], Mapping):
        named = {**args[0], **named}
        args = ()
    if len(args) > len(names):
        raise ValueError(f"run: got {len(args)} positional inputs, the model takes {names}")
    feed = dict(zip(names, args))
    feed.update(named)
    unknown = sorted(set(feed) - set(names))
    if unknown:
        raise ValueError(f"run: unknown inputs {unknown}; the model takes {names}")
    return session.run(None, {k: _numpy(v) for k, v in feed.items()})
