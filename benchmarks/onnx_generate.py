"""Generation speed on onnxruntime CPU, SmolLM2-135M-Instruct: DSA decoder vs dense decoder
(both from ``dsa_compile.onnx.export(..., past=True)``, each with the concat state layout
and with ``shared_buffer=True``) vs onnxruntime-genai.

    .venv/bin/python benchmarks/onnx_generate.py [--contexts 2048 4096 8192 16384]

Engines: ``dsa`` / ``dense`` (concat: present = Concat(past, new), the Hugging Face /
Optimum interface), ``dsa_buf`` / ``dense_buf`` (fixed-capacity buffers written in place
through IOBinding), ``genai`` (onnxruntime-genai's own fp32 CPU model, if installed).

- decode ms/token at each context: the decoders get a past state of that length (random
  K/V/index keys: a step's work does not depend on their values) and run ``--new`` steps;
  onnxruntime-genai prefills random token ids (it stops at 8192) and then decodes
  ``--new`` tokens. The ``--floor`` context (64 tokens) is the step without attention
  work worth the name: weights, MLP, vocabulary projection. Each (engine, context) runs in
  its own process, which reports its peak resident memory (VmHWM);
- prefill seconds at ``--prefill`` tokens for every engine (own process, peak memory);
- one layer's decode step at ``--layer-context`` keys: opset-23 ``Attention`` with past vs
  ``dsa.Attention`` with the runtime q_offset input, SmolLM2's shapes.

Correctness is the test suite's job (tests/test_onnx_generate.py); this script first
checks that every decoder gives the PyTorch logits on a short prompt (top_k covering it).
Writes a CSV with every number it prints.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort

# The workers measure peak memory: they load the deploy module alone (numpy and
# onnxruntime, as a deployment would), not torch and dsa_compile.
_GENERATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                           "dsa_compile", "onnx", "generation.py")
_spec = importlib.util.spec_from_file_location("dsa_onnx_generation", _GENERATION)
_generation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generation)
Decoder = _generation.Decoder


def _session(path: str, threads: int):
    # The project's session options (denormals flushed to zero) for dense and DSA alike.
    return ort.InferenceSession(path, _generation.session_options(threads),
                                providers=["CPUExecutionProvider"])


def decode_ms(session, context: int, steps: int, seed: int = 0) -> float:
    """Median ms per decode step after a random past state of ``context`` tokens."""
    dec = Decoder(session)
    rng = np.random.default_rng(seed)
    rows = context + steps + 1 if dec.shared_buffer else context
    state = {}
    for name in dec.past_names:
        dims = dec.inputs[name].shape
        shape = [1] + [d if isinstance(d, int) else rows for d in dims[1:]]
        state[name] = rng.standard_normal(shape, dtype=np.float32)
    if dec.shared_buffer:  # as Decoder._bind_buffers, with random rows
        dec.capacity, dec.binding = rows, session.io_binding()
        for name, arr in state.items():
            state[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            dec.binding.bind_ortvalue_input(name, state[name])
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
    dec.prefill(ids, np.ones_like(ids), capacity=length + 1)
    return time.perf_counter() - start


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's
    high-water mark across fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One (what, engine, context) in this process: prints a JSON line."""
    if args.engine == "genai":
        prefill, decode = genai_run(args.path, args.context, args.new, args.vocab)
        value = prefill if args.worker == "prefill" else decode
    else:
        session = _session(args.path, args.threads)
        value = (prefill_s(session, args.context, args.vocab) if args.worker == "prefill"
                 else decode_ms(session, args.context, args.new))
    print(json.dumps({"value": value, "peak_mb": peak_mb()}), flush=True)


def in_process(what: str, engine: str, path: str, context: int, args, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--engine", engine, "--path", path,
           "--context", str(context), "--new", str(args.new), "--threads", str(args.threads),
           "--vocab", str(vocab)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def layer_step_ms(context: int, top_k: int, index_dim: int, threads: int, reps: int = 20):
    """(dense ms, dsa ms) of one SmolLM2 layer's attention for one new token."""
    from onnx import TensorProto, helper

    from dsa_compile.onnx import functions

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
        s = ort.InferenceSession(model.SerializeToString(), _generation.session_options(threads),
                                 providers=["CPUExecutionProvider"])
        s.run(None, feed)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            s.run(None, feed)
            times.append(time.perf_counter() - start)
        out.append(1e3 * float(np.median(times)))
    return out


def genai_build(model, tokenizer, folder: str) -> str | None:
    """onnxruntime-genai's fp32 CPU model of ``model`` (its own builder), or None."""
    try:
        import onnxruntime_genai  # noqa: F401
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
    return out_dir


def genai_run(out_dir: str, context: int, new: int, vocab: int) -> tuple[float, float]:
    """(prefill s, decode ms/token) of onnxruntime-genai on random ids."""
    import onnxruntime_genai as og

    og_model = og.Model(out_dir)
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
    return prefill, 1e3 * float(np.median(times[1:]))


ENGINES = {"dsa": {}, "dense": {"dense": True}, "dsa_buf": {"shared_buffer": True},
           "dense_buf": {"dense": True, "shared_buffer": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--floor", type=int, default=64,
                        help="a context this short measures the step without attention")
    parser.add_argument("--new", type=int, default=16, help="decode steps timed per context")
    parser.add_argument("--top-k", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--layer-context", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=[*ENGINES, "genai"])
    parser.add_argument("--csv", default="benchmarks/onnx_generate.csv")
    # one measurement in a fresh process (used by main)
    parser.add_argument("--worker", choices=["decode", "prefill"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    import dsa_compile.onnx as dsa_onnx
    from dsa_compile.config import DSAConfig
    from dsa_compile.evaluation import load_causal_lm, token_blocks

    torch.set_num_threads(args.threads)
    rows = []

    def record(what, context, engine, value, unit, peak=None):
        rows.append({"what": what, "context": context, "engine": engine,
                     "value": round(value, 3), "unit": unit,
                     "peak_mb": None if peak is None else round(peak)})
        mem = "" if peak is None else f"  peak {peak:7.0f} MB"
        print(f"{what:>14} {context:>6} {engine:>9} {value:10.1f} {unit}{mem}", flush=True)

    model, tokenizer = load_causal_lm()
    model = model.eval()  # the GGUF loads de-quantized to float32
    vocab = model.config.vocab_size
    config = DSAConfig(top_k=args.top_k, dense_below=0)
    example = token_blocks(tokenizer, 1024, 1)  # real text: the indexers fit on it
    folder = tempfile.mkdtemp(prefix="onnx_generate_")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for engine in [e for e in args.engines if e in ENGINES]:
            paths[engine] = os.path.join(folder, f"{engine}.onnx")
            start = time.perf_counter()
            dsa_onnx.export(model, (example,), paths[engine], config=config, past=True,
                            logits="last", **ENGINES[engine])
            print(f"exported {engine} in {time.perf_counter() - start:.1f} s", flush=True)

    check = example[:, :256] if args.top_k >= 256 else example[:, :args.top_k]
    with torch.no_grad():
        want = model(check).logits[0, -1].numpy()
    for engine, path in paths.items():  # 256 tokens <= top_k: DSA is exact here
        got = Decoder(_session(path, args.threads)).prefill(
            check.numpy(), np.ones_like(check.numpy()))[0]
        err = float(np.abs(got - want).max())
        print(f"check {engine}: max |logit - PyTorch dense| at 256 tokens = {err:.2e}")
        if err > 1e-2:
            raise SystemExit(f"{engine} decoder does not match PyTorch; not benchmarking")
    if "genai" in args.engines:
        out_dir = genai_build(model, tokenizer, os.path.join(folder, "genai_build"))
        if out_dir is None:
            print("onnxruntime-genai is not installed: no genai numbers")
        else:
            paths["genai"] = out_dir
    del model

    for context in [args.floor, *args.contexts]:
        for engine, path in paths.items():
            if engine == "genai" and context > 8192:
                continue  # its context_length 8192 bounds prompt + new tokens
            n = min(context, 8000) if engine == "genai" else context
            got = in_process("decode", engine, path, n, args, vocab)
            record("decode", context, engine, got["value"], "ms/token", got["peak_mb"])
    for engine, path in paths.items():
        got = in_process("prefill", engine, path, args.prefill, args, vocab)
        record("prefill", args.prefill, engine, got["value"], "s", got["peak_mb"])
    dense_ms, dsa_ms = layer_step_ms(args.layer_context, args.top_k, 48, args.threads)
    record("layer_decode", args.layer_context, "dense", dense_ms, "ms")
    record("layer_decode", args.layer_context, "dsa", dsa_ms, "ms")
    _write(args.csv, rows)


def _write(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
