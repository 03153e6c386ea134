"""What makes a file recognisably a dsa_compile export (torch-free, shared by export and
verify): producer, metadata keys, IR version and the content hash of the dsa bodies."""

from __future__ import annotations

import hashlib

import onnx

from dsa_compile.onnx import functions

PRODUCER = "dsa_compile"
META_VERSION = "dsa_compile.version"
META_CONFIG = "dsa_compile.config"
META_REWRITE = "dsa_compile.rewrite"
META_FUNCTIONS = "dsa_compile.functions_sha256"  # content check of the dsa function bodies
IR_VERSION = 10  # the newest IR onnxruntime 1.2x/1.3x loads


def functions_digest(model: onnx.ModelProto) -> str:
    """sha256 (hex) of the model's ``dsa``-domain FunctionProtos, in (name, overload) order:
    what export.finish_model records as META_FUNCTIONS and verify recomputes."""
    digest = hashlib.sha256()
    for f in sorted((f for f in model.functions if f.domain == functions.DOMAIN),
                    key=lambda f: (f.name, f.overload)):
        digest.update(f.SerializeToString(deterministic=True))
    return digest.hexdigest()
