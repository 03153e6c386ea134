"""``dsa-onnx-export``: export a Hugging Face causal LM with DSA to ONNX, or verify a file.

    dsa-onnx-export export MODEL_DIR --out model.onnx --top-k 512 [--gguf-file F.gguf]
    dsa-onnx-export verify model.onnx

``export`` loads the model with transformers (``AutoModelForCausalLM.from_pretrained``),
rewrites it with ``dsa_compile.apply`` and writes one ONNX file whose input is
``input_ids`` int64 [B, L] and output ``logits`` [B, L, vocab], with L dynamic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from dsa_compile.config import DSAConfig
from dsa_compile.onnx.export import CausalLMLogits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa-onnx-export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export a Hugging Face causal LM with DSA attention")
    exp.add_argument("model", help="model folder or Hugging Face id (loaded offline)")
    exp.add_argument("--out", required=True, help="output .onnx path (written atomically)")
    exp.add_argument("--gguf-file", default=None, help="GGUF file name inside the folder")
    exp.add_argument("--top-k", type=int, default=2048)
    exp.add_argument("--dense-below", type=int, default=0,
                     help="dense threshold of DSAConfig (0 = sparse everywhere)")
    exp.add_argument("--index-heads", type=int, default=None)
    exp.add_argument("--index-dim", type=int, default=None)
    exp.add_argument("--seq-len", type=int, default=1024,
                     help="example length: tokens of real text (Python's reference manual) "
                          "that the indexers fit themselves on before tracing")
    exp.add_argument("--static", action="store_true", help="fix every dimension")
    exp.add_argument("--query-chunk", type=int, default=None)
    ver = sub.add_parser("verify", help="check a file is a valid dsa_compile export")
    ver.add_argument("path")
    return parser


def _export(args) -> dict:
    import transformers

    from dsa_compile.files import destination
    from dsa_compile.onnx import export

    destination(args.out, "export")  # a bad --out fails before the model loads
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=torch.float32, attn_implementation="sdpa", **kwargs).eval()
    config = DSAConfig(top_k=args.top_k, dense_below=args.dense_below,
                       index_heads=args.index_heads, index_dim=args.index_dim)
    ids = _example_ids(args.model, kwargs, args.seq_len, model.config.vocab_size)
    export(CausalLMLogits(model), (ids,), args.out, config=config, dynamic=not args.static,
           query_chunk=args.query_chunk)
    from dsa_compile.onnx import verify

    return verify(args.out)


def _example_ids(model: str, kwargs: dict, length: int, vocab: int) -> torch.Tensor:
    """int64 [1, length]: real text through the model's tokenizer (random ids without one)."""
    import transformers

    from dsa_compile.evaluation import token_blocks

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, **kwargs)
    except (OSError, ValueError):
        return torch.randint(0, vocab, (1, length))
    return token_blocks(tokenizer, length, 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsa-onnx-export`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            from dsa_compile.onnx import verify

            report = verify(args.path)
        else:
            report = _export(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"dsa-onnx-export: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
