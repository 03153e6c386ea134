"""dsa_compile: turn dense attention in any PyTorch model into DeepSeek Sparse Attention.

    import torch, dsa_compile
    compiled = torch.compile(model, backend="dsa", options={"top_k": 2048})

Public API (everything else is internal):

- :class:`DSAConfig`                      what the rewrite does
- :func:`apply`, :func:`explain`          the FX passes as a library, and their report
- :class:`DSABackend`, :func:`last_report`  the torch.compile backend as an object that
                                          keeps its reports; the report behind "dsa"
- :func:`calibrate`                       dense warm-up distillation of the indexers
- :func:`save_indexers`, :func:`load_indexers`   indexer persistence (safetensors)
- :func:`reset_indexers`                  forget a model's indexers (to change their shape)
- :func:`selection_recall`                how much attention the selection captures
- :func:`fp8_indexer`                     run the CUDA indexer in FP8 inside a block
- :func:`index_key_cache`                 the compiled models' index-key cache (size, hits)
- :mod:`dsa_compile.onnx`                 ONNX export and onnxruntime helpers
- ``torch.ops.dsa.*``                     the DSA operators (registered on import)
"""

from __future__ import annotations

import importlib

from dsa_compile import ops  # noqa: F401  (registers torch.ops.dsa.*)
from dsa_compile.config import DSAConfig
from dsa_compile.ops.dispatch import fp8_indexer
from dsa_compile.version import __version__

# Heavier parts load on first use, so `import dsa_compile` stays cheap.
_LAZY = {
    "apply": "dsa_compile.api",
    "explain": "dsa_compile.api",
    "calibrate": "dsa_compile.calibration",
    "save_indexers": "dsa_compile.calibration",
    "load_indexers": "dsa_compile.calibration",
    "reset_indexers": "dsa_compile.indexer",
    "selection_recall": "dsa_compile.metrics",
    "index_key_cache": "dsa_compile.backends.index_cache",
    "DSABackend": "dsa_compile.backends.dynamo",
    "last_report": "dsa_compile.backends.dynamo",
}

__all__ = ["DSAConfig", "__version__", "fp8_indexer", "ops", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "onnx":
        return importlib.import_module("dsa_compile.onnx")
    raise AttributeError(f"module 'dsa_compile' has no attribute {name!r}")
