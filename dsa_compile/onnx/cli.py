"""``dsa-onnx-export``: export a Hugging Face causal LM with DSA to ONNX, verify a file, or
generate with a decoder file on onnxruntime.

    dsa-onnx-export export MODEL_DIR --out model.onnx --top-k 512 [--gguf-file F.gguf]
    dsa-onnx-export export MODEL_DIR --out decoder.onnx --top-k 512 --past [--dense]
        [--shared-buffer]
    dsa-onnx-export verify model.onnx
    dsa-onnx-export generate decoder.onnx --ids "1 2 3" --max-new-tokens 32
    dsa-onnx-export generate decoder.onnx --tokenizer MODEL_DIR --prompt "Hello"

``export`` loads the model with transformers (``AutoModelForCausalLM.from_pretrained``),
rewrites it with ``dsa_compile.apply`` and writes one ONNX file whose input is
``input_ids`` int64 [B, L] and output ``logits`` [B, L, vocab], with L dynamic. With
``--past`` it writes the stateful decoder of :mod:`dsa_compile.onnx.decoder` (``--dense``:
the dense opset-23 Attention baseline; ``--shared-buffer``: KV and index-key state as
buffers updated in place, the layout ``generate`` runs fastest). ``generate`` runs
:func:`dsa_compile.onnx.generation.generate` and prints the token ids (and the text with
``--tokenizer``) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


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
    exp.add_argument("--past", action="store_true",
                     help="write a decoder with KV and index-key state (prefill + decode)")
    exp.add_argument("--dense", action="store_true",
                     help="with --past: dense opset-23 Attention instead of DSA (baseline)")
    exp.add_argument("--shared-buffer", action="store_true",
                     help="with --past: state as fixed-capacity buffers written in place "
                          "(no copy of the cache per step)")
    exp.add_argument("--logits", choices=["all", "last"], default="all",
                     help="with --past: logits of every position or of the last one")
    ver = sub.add_parser("verify", help="check a file is a valid dsa_compile export")
    ver.add_argument("path")
    gen = sub.add_parser("generate", help="generate with a decoder file on onnxruntime")
    gen.add_argument("path", help="decoder .onnx (export --past)")
    gen.add_argument("--ids", action="append", default=[],
                     help="prompt token ids, space or comma separated (repeat for a batch)")
    gen.add_argument("--prompt", action="append", default=[],
                     help="prompt text (needs --tokenizer; repeat for a batch)")
    gen.add_argument("--tokenizer", default=None, help="tokenizer folder or id (transformers)")
    gen.add_argument("--gguf-file", default=None, help="GGUF file of the tokenizer folder")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None)
    return parser


def _generate(args) -> dict:
    from dsa_compile.onnx.generation import generate

    tokenizer = None
    if args.tokenizer:
        import transformers

        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer, **kwargs)
    prompts = [[int(t) for t in ids.replace(",", " ").split()] for ids in args.ids]
    if args.prompt:
        if tokenizer is None:
            raise ValueError("--prompt needs --tokenizer")
        prompts += [tokenizer(p)["input_ids"] for p in args.prompt]
    if not prompts:
        raise ValueError("give a prompt: --ids or --prompt")
    timings = {}
    out = generate(args.path, prompts, args.max_new_tokens, do_sample=args.sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, threads=args.threads, timings=timings)
    new = out[:, max(map(len, prompts)):].tolist()  # prompts are left-padded to one width
    report = {"new_tokens": new, "sequences": out.tolist(), "timings": timings}
    if tokenizer is not None:
        report["text"] = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return report


def _export(args) -> dict:
    import torch
    import transformers

    from dsa_compile.config import DSAConfig
    from dsa_compile.files import destination
    from dsa_compile.onnx import export
    from dsa_compile.onnx.export import CausalLMLogits

    destination(args.out, "export")  # a bad --out fails before the model loads
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa", **kwargs).eval()
    config = DSAConfig(top_k=args.top_k, dense_below=args.dense_below,
                       index_heads=args.index_heads, index_dim=args.index_dim)
    ids = _example_ids(args.model, kwargs, args.seq_len, model.config.vocab_size)
    if args.past:
        export(model, (ids,), args.out, config=config, query_chunk=args.query_chunk,
               past=True, dense=args.dense, logits=args.logits,
               shared_buffer=args.shared_buffer)
        if args.dense:
            return {"path": args.out, "attention": "dense", "dsa_nodes": {}}
    else:
        if args.dense or args.shared_buffer:
            raise ValueError("--dense and --shared-buffer need --past")
        export(CausalLMLogits(model), (ids,), args.out, config=config,
               dynamic=not args.static, query_chunk=args.query_chunk)
    from dsa_compile.onnx import verify

    return verify(args.out)


def _example_ids(model: str, kwargs: dict, length: int, vocab: int):
    """int64 [1, length]: real text through the model's tokenizer (random ids without one)."""
    import torch
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
        elif args.command == "generate":
            report = _generate(args)
        else:
            report = _export(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"dsa-onnx-export: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
