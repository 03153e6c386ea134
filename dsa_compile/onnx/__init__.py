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
- :func:`load_session`  onnxruntime InferenceSession of a verified file
- :func:`run`           run a session (or path) on torch / numpy inputs
- :func:`dsa_compile.onnx.microsoft.to_microsoft`  optional onnxruntime-gpu target
  (com.microsoft DynamicSparseAttention; schema-checked only, no CPU kernel exists)
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from dsa_compile.onnx import functions
from dsa_compile.onnx.export import (
    META_CONFIG,
    META_REWRITE,
    META_VERSION,
    PRODUCER,
    CausalLMLogits,
    ExportError,
    SDPAOverrideDSA,
    export,
    translation_table,
)
from dsa_compile.onnx.schemas import register_schemas

__all__ = ["CausalLMLogits", "ExportError", "SDPAOverrideDSA", "export", "load_session",
           "register_schemas", "run", "translation_table", "verify"]


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


def verify(path: str | os.PathLike | onnx.ModelProto) -> dict[str, Any]:
    """Check that a file is a dsa_compile export and that it is well formed.

    Runs ``onnx.checker.check_model(full_check=True)`` (types and shapes of the dsa
    nodes through the registered schemas) and checks each dsa node has its function
    (same name and overload).

    Returns:
        {"dsa_nodes": {op: count}, "functions": [names, "Attention:key_mask" for an
         overload], "ir_version": int,
         "opsets": {domain: version}, "config": dict | None, "version": str,
         "rewrite": "model" | "apply" | "sdpa_override"}

    Raises:
        ValueError: not an ONNX file, or an ONNX file not written by
            :func:`dsa_compile.onnx.export` (no dsa marker, opset or function), or one
            that fails the checker.
    """
    model = _load(path)
    where = path if not isinstance(path, onnx.ModelProto) else "model"
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
    nodes = [n for n in model.graph.node if n.domain == functions.DOMAIN]
    counts = collections.Counter(n.op_type for n in nodes)
    local = {(f.domain, f.name, f.overload) for f in model.functions}
    missing = sorted({_function_name(n.op_type, n.overload) for n in nodes
                      if (functions.DOMAIN, n.op_type, n.overload) not in local})
    if missing:
        raise ValueError(f"verify: {where!r} uses dsa ops {missing} without their model-local "
                         f"functions; onnxruntime could not run it")
    register_schemas()
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
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
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
