"""Generation speed on onnxruntime CPU, SmolLM2-135M-Instruct: DSA decoder vs dense decoder
(both from ``dsa_compile.onnx.export(..., past=True)``) vs onnxruntime-genai.

    .venv/bin/python benchmarks/onnx_generate.py [--contexts 2048 4096 8192 16384]

- decode ms/token at each context: the decoders get a past state of that length (random
  K/V/index keys: a step's work does not depend on their values) and run ``--new`` steps;
  onnxruntime-genai (if installed) prefills random token ids (it stops at 8192) and then
  decodes ``--new`` tokens;
- prefill seconds at ``--prefill`` tokens for all three;
- one layer's decode step at ``--layer-context`` keys: opset-23 ``Attention`` with past vs
  ``dsa.Attention`` with the runtime q_offset input, SmolLM2's shapes.

Correctness is the test suite's job (tests/test_onnx_generate.py); this script first
checks that both decoders give the PyTorch logits on a short prompt (top_k covering it).
Writes a CSV with every number it prints.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

import dsa_compile.onnx as dsa_onnx
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import load_causal_lm, token_blocks
from dsa_compile.onnx import functions
from dsa_compile.onnx.generation import Decoder


def _session(path: str, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def decode_ms(session, context: int, steps: int, seed: int = 0) -> float:
    """Median ms per decode step after a random past state of ``context`` tokens."""
    dec = Decoder(session)
    rng = np.random.default_rng(seed)
    state = {}
    for name in dec.past_names:
        dims = dec.inputs[name].shape
        shape = [1] + [d if isinstance(d, int) else context for d in dims[1:]]
        state[name] = rng.standard_normal(shape, dtype=np.float32)
    dec.state, dec.mask = state, np.ones((1, context), np.int64)
    dec.positions = np.array([[context - 1]])
    times, token = [], np.array([17])
    for _ in range(steps):
        start = time.perf_counter()
        logits = dec.step(token)
        times.append(time.perf_counter() - start)
        token = logits.argmax(-1)
    return 1e3 * float(np.median(times[1:] if len(times) > 2 else times))


def prefill_s(session, length: int, vocab: int) -> float:
    dec = Decoder(session)
    ids = np.random.default_rng(1).integers(0, vocab, (1, length))
    start = time.perf_counter()
    dec.prefill(ids, np.ones_like(ids))
    return time.perf_counter() - start


def layer_step_ms(context: int, top_k: int, index_dim: int, threads: int, reps: int = 20):
    """(dense ms, dsa ms) of one SmolLM2 layer's attention for one new token."""
    from onnx import TensorProto, helper

    hq, hkv, d, hi = 9, 3, 64, 3
    f = TensorProto.FLOAT
    dense = helper.make_model(helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "ok", "ov"],
                          scale=d ** -0.5)], "dense",
        [helper.make_tensor_value_info(n, f, None) for n in ["q", "k", "v", "pk", "pv"]],
        [helper.make_tensor_value_info(n, f, None) for n in ["y", "ok", "ov"]]),
        opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    sparse = functions.op_model("Attention", key_mask=True, q_offset_input=True, top_k=top_k,
                                scale=d ** -0.5)
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)
    pk, pv = r(1, hkv, context - 1, d), r(1, hkv, context - 1, d)
    dense_feed = {"q": r(1, hq, 1, d), "k": r(1, hkv, 1, d), "v": r(1, hkv, 1, d),
                  "pk": pk, "pv": pv}
    sparse_feed = {"q": dense_feed["q"], "k": r(1, hkv, context, d), "v": r(1, hkv, context, d),
                   "q_idx": r(1, 1, hi, index_dim), "k_idx": r(1, context, index_dim),
                   "w": np.abs(r(1, 1, hi)), "key_mask": np.ones((1, context), bool),
                   "q_offset": np.array(context - 1, np.int64)}
    out = []
    for model, feed in ((dense, dense_feed), (sparse, sparse_feed)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        s = ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        s.run(None, feed)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - start)
        out.append(1e3 * float(np.median(times)))
    return out


def genai_numbers(model, tokenizer, contexts, new: int, folder: str, vocab: int):
    """{context: (prefill s, decode ms/token)} with onnxruntime-genai, or None."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    hf_dir, out_dir = os.path.join(folder, "hf_fp32"), os.path.join(folder, "genai")
    import transformers

    config = transformers.AutoConfig.for_model(**{
        k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    fp32 = transformers.AutoModelForCausalLM.from_config(config)  # a GGUF model won't save
    fp32.load_state_dict(model.state_dict())
    fp32.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir,
                    "-o", out_dir, "-p", "fp32", "-e", "cpu"], check=True,
                   capture_output=True)
    og_model = og.Model(out_dir)
    results = {}
    for context in contexts:
        if context > 8192:
            continue
        context = min(context, 8000)  # genai's context_length 8192 bounds prompt + new tokens
        ids = np.random.default_rng(2).integers(0, vocab, context).tolist()
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=context + new, do_sample=False)
        gen = og.Generator(og_model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - start
        times = []
        for _ in range(new):
            if gen.is_done():
                break
            start = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - start)
        results[context] = (prefill, 1e3 * float(np.median(times[1:])))
        del gen
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--new", type=int, default=16, help="decode steps timed per context")
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--layer-context", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-genai", action="store_true")
    parser.add_argument("--genai-only", action="store_true",
                        help="skip the dsa_compile decoders (onnxruntime-genai numbers only)")
    parser.add_argument("--csv", default="benchmarks/onnx_generate.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    def record(what, context, engine, value, unit):
        rows.append({"what": what, "context": context, "engine": engine,
                     "value": round(value, 3), "unit": unit})
        print(f"{what:>14} {context:>6} {engine:>6} {value:10.1f} {unit}", flush=True)

    model, tokenizer = load_causal_lm()
    model = model.eval()  # the GGUF loads de-quantized to float32
    if args.genai_only:
        args.contexts, sessions = [c for c in args.contexts if c <= 8192], {}
        return _genai_rows(args, model, tokenizer, record, rows)
    config = DSAConfig(top_k=args.top_k, dense_below=0)
    example = token_blocks(tokenizer, 1024, 1)  # real text: the indexers fit on it
    folder = tempfile.mkdtemp(prefix="onnx_generate_")
    paths = {"dsa": os.path.join(folder, "dsa.onnx"), "dense": os.path.join(folder, "dense.onnx")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for engine, path in paths.items():
            start = time.perf_counter()
            dsa_onnx.export(model, (example,), path, config=config, past=True,
                            dense=engine == "dense", logits="last")
            print(f"exported {engine} in {time.perf_counter() - start:.1f} s", flush=True)
    sessions = {e: _session(p, args.threads) for e, p in paths.items()}

    check = example[:, :256] if args.top_k >= 256 else example[:, :args.top_k]
    with torch.no_grad():
        want = model(check).logits[0, -1].numpy()
    for engine, session in sessions.items():  # 256 tokens <= top_k: DSA is exact here
        got = Decoder(session).prefill(check.numpy(), np.ones_like(check.numpy()))[0]
        err = float(np.abs(got - want).max())
        print(f"check {engine}: max |logit - PyTorch dense| at 256 tokens = {err:.2e}")
        if err > 1e-2:
            raise SystemExit(f"{engine} decoder does not match PyTorch; not benchmarking")

    for context in args.contexts:
        for engine, session in sessions.items():
            record("decode", context, engine, decode_ms(session, context, args.new), "ms/token")
    for engine, session in sessions.items():
        record("prefill", args.prefill, engine, prefill_s(session, args.prefill,
                                                          model.config.vocab_size), "s")
    dense_ms, dsa_ms = layer_step_ms(args.layer_context, args.top_k, 48, args.threads)
    record("layer_decode", args.layer_context, "dense", dense_ms, "ms")
    record("layer_decode", args.layer_context, "dsa", dsa_ms, "ms")
    if not args.no_genai:
        sessions.clear()
        return _genai_rows(args, model, tokenizer, record, rows)
    _write(args.csv, rows)


def _genai_rows(args, model, tokenizer, record, rows) -> None:
    folder = tempfile.mkdtemp(prefix="onnx_generate_genai_")
    genai = genai_numbers(model, tokenizer, sorted(set(args.contexts) | {args.prefill}),
                          args.new, folder, model.config.vocab_size)
    if genai is None:
        print("onnxruntime-genai is not installed: no genai numbers")
    for context, (pre, dec) in sorted((genai or {}).items()):
        record("prefill", context, "genai", pre, "s")
        record("decode", context, "genai", dec, "ms/token")
    _write(args.csv, rows)


def _write(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
