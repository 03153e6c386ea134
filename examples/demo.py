"""`make demo`: DSA on a real pretrained LM, on real English text, on this CPU.

    .venv/bin/python examples/demo.py                 # SmolLM2-135M-Instruct (embedded)
    .venv/bin/python examples/demo.py --calibrate     # + a short dense warm-up
    .venv/bin/python examples/demo.py --model HuggingFaceTB/SmolLM2-360M   # needs a network

Compiles the model with ``torch.compile(..., backend="dsa")`` (its first call, on a text
block disjoint from the evaluation text, fits the indexers training-free), prints the
rewrite report, perplexity of dense / DSA / sliding-window attention at the same key
budget, a passkey retrieval check at about 1.5K and 4K tokens, generation with the KV
cache and the index-key cache (``model.generate`` on the model whose forward is compiled
with ``backend="dsa"``, against the same model dense), and timings. Text:
Python's reference manual (``pydoc_data``), read at run time. Evaluation blocks,
calibration blocks and the passkey haystack are disjoint parts of it.

DSA perplexity runs the compiled model (calibration updates its indexers in place, so
the same compiled graph measures the calibrated model). Passkey prompts have other
lengths; they run the same op with the same indexers through
dsa_compile.evaluation's SDPA override, which needs no recompile per length. The
generation section runs Hugging Face ``generate`` on passkey prompts up to SmolLM2's 8K
context, dense eager with its DynamicCache and DSA compiled with a StaticCache (Hugging
Face's recipe for compiled generation: on this CPU a compiled DynamicCache step spends
more on growing the cache than attention costs): prefill time, decode tokens/s, whether
the answer holds the key, and the index-key cache's counters (a decode step projects
only the new token's index key).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import dsa_compile
from dsa_compile.calibration import calibrate, load_indexers, save_indexers
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import load_causal_lm, passkey, perplexity, token_blocks
from dsa_compile.evaluation.tasks import passkey_prompt
from dsa_compile.metrics import selection_recall

EVAL_OFFSET, FIT_OFFSET, CALIB_OFFSET = 0, 4, 5


class LogitsOnly(torch.nn.Module):
    """The LM as ids -> logits with no KV cache, the graph the compiler captures."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids, use_cache=False).logits


def compile_dsa(model, fit_block, config):
    """torch.compile(backend="dsa") on ids -> logits; the first call compiles and fits the
    indexers on ``fit_block`` [L]. Returns (compiled module, the backend's report)."""
    compiled = torch.compile(LogitsOnly(model), backend="dsa",
                             options={"top_k": config.top_k, "dense_below": config.dense_below})
    with torch.no_grad():
        compiled(fit_block[None])
    return compiled, dsa_compile.last_report()


@torch.no_grad()
def compiled_perplexity(compiled, blocks) -> float:
    total, count = 0.0, 0
    for row in blocks:
        logits = compiled(row[None])[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
    return math.exp(total / count)


class StepClock(StoppingCriteria):
    """Records the time after each generated token (generate calls it once per step)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.no_grad()
def timed_generate(model, prompt, new_tokens: int, cache: str | None = None):
    """Greedy ``model.generate`` of ``new_tokens`` after ``prompt`` [P] (``cache``: a
    ``cache_implementation``, None = DynamicCache): (generated ids [new_tokens], prefill
    + first token seconds, decode tokens/s)."""
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None],
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                         cache_implementation=cache)
    first, last = clock.times[0], clock.times[-1]
    rate = (len(clock.times) - 1) / (last - first) if len(clock.times) > 1 else float("nan")
    return out[0, prompt.numel():], first - start, rate


def generation(model, tok, config, lengths, new_tokens: int, label: str) -> None:
    """Dense vs DSA ``generate`` with caches on the passkey prompts (one needle each, at
    half depth). Dense: eager, DynamicCache. DSA: the model's forward compiled with
    backend "dsa" (dynamic shapes, so prompts of any length and every decode step reuse
    two graphs), StaticCache."""
    prompts = [passkey_prompt(tok, n, 0.5, key)
               for n, key in zip(lengths, ("48213", "70592", "31846", "95127"))]
    warm = passkey_prompt(tok, 512, 0.5, "11111")[0]
    dense_forward = model.forward
    rows = []
    for name in ("dense", label):
        cache = None if name == "dense" else "static"
        if name != "dense":
            model.forward = torch.compile(dense_forward, backend="dsa", dynamic=True,
                                          options={"top_k": config.top_k,
                                                   "dense_below": config.dense_below})
            dsa_compile.index_key_cache().clear()
        t0 = time.perf_counter()
        timed_generate(model, warm, 4, cache)  # compiles (DSA) / warms up (dense)
        warmup = time.perf_counter() - t0
        for prompt, answer in prompts:
            ids, prefill, rate = timed_generate(model, prompt, new_tokens, cache)
            text = tok.decode(ids)
            key = tok.decode(answer).strip()
            rows.append((name, prompt.numel(), prefill, rate, key in text, text))
        stats = dsa_compile.index_key_cache().stats() if name != "dense" else None
        print(f"  {name} ({'StaticCache' if cache else 'DynamicCache'}): warm-up "
              f"(compile for DSA) {warmup:.1f} s"
              + (f"; index-key cache {stats['hits']} hits, {stats['misses']} misses, "
                 f"{stats['rows_projected']} rows re-projected, {stats['bytes'] / 2**20:.1f} MiB"
                 if stats else ""))
    model.forward = dense_forward
    print(f"  {'attention':<22} {'prompt':>7} {'prefill s':>10} {'decode tok/s':>13}  "
          f"key found  answer")
    for name, length, prefill, rate, found, text in rows:
        print(f"  {name:<22} {length:>7} {prefill:>10.1f} {rate:>13.1f}  "
              f"{'yes' if found else 'no':<9}  {text.strip()[:40]!r}")
    dense = {r[1]: r[3] for r in rows if r[0] == "dense"}
    for name, length, _, rate, _, _ in rows:
        if name != "dense":
            print(f"  decode at {length} tokens: {label} {rate / dense[length]:.2f}x dense")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face folder or id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--calibrate", action="store_true", help="run a short calibration")
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=2, help="evaluation blocks of --length")
    parser.add_argument("--steps", type=int, default=300, help="calibration steps")
    parser.add_argument("--calib-blocks", type=int, default=4)
    parser.add_argument("--calib-length", type=int, default=4096,
                        help="tokens per calibration block (4096: the indexers then see "
                        "keys as far back as the 4K passkey)")
    parser.add_argument("--passkey", type=int, nargs="*", default=[1536, 4096],
                        help="haystack lengths in tokens")
    parser.add_argument("--trials", type=int, default=1, help="passkeys per length")
    parser.add_argument("--indexers", default=None, help="load indexers from this file")
    parser.add_argument("--save", default=None, help="save the indexers to this file")
    parser.add_argument("--plot", default=None, help="write the recall-by-layer PNG here")
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="tokens generated per prompt in the generation section")
    parser.add_argument("--generate-lengths", type=int, nargs="*", default=[1536, 4096, 8000],
                        help="prompt lengths of the generation section (8000: SmolLM2's "
                        "context, where attention is a large part of a decode step)")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation section")
    parser.add_argument("--oracle", action="store_true",
                        help="also measure the oracle: top_k keys by head-summed dense attention")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = DSAConfig(top_k=args.top_k, dense_below=0)
    timings = {}

    t = time.perf_counter()
    model, tok = load_causal_lm(args.model)
    timings["load model"] = time.perf_counter() - t
    name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    print(f"model: {name}")
    blocks = token_blocks(tok, args.length, args.blocks, offset=EVAL_OFFSET)
    print(f"text: Python reference manual (pydoc_data), {args.blocks} x {args.length} tokens; "
          f"top_k = {args.top_k} ({args.top_k / args.length:.3f} of the keys at the end)")

    if args.indexers:
        load_indexers(model, args.indexers)
        print(f"indexers loaded from {args.indexers}")
    t = time.perf_counter()
    fit_block = token_blocks(tok, args.length, 1, offset=FIT_OFFSET)[0]
    compiled, report = compile_dsa(model, fit_block, config)
    timings["torch.compile(backend='dsa') + fit"] = time.perf_counter() - t
    print(f'\nrewrite report of torch.compile(model, backend="dsa") '
          f"(dsa_compile {dsa_compile.__version__}):")
    print(report)

    rows, misses = {}, {}

    def measure(label, mode, ppl=None):
        t0 = time.perf_counter()
        if ppl is None:
            ppl = perplexity(model, blocks, mode, config)
            timings[f"perplexity {label}"] = time.perf_counter() - t0
        found = {}
        for n in args.passkey:
            if mode == "window" and n > 2048:
                continue  # nothing to learn: the needle is far outside every window
            t0 = time.perf_counter()
            res = passkey(model, tok, n, args.trials, mode, config)
            timings[f"passkey {n} {label}"] = time.perf_counter() - t0
            found[n] = (sum(r.found for r in res), sum(r.exact for r in res))
            misses[f"{label} @{n}"] = [(r.key, r.answer) for r in res if not r.exact]
        rows[label] = (ppl, found)
        print(f"  {label:<28} perplexity {ppl:8.3f}  " + "  ".join(
            f"passkey@{n}: {k}/{args.trials} (exact {e})" for n, (k, e) in found.items()),
            flush=True)

    def measure_compiled(label):
        t0 = time.perf_counter()
        ppl = compiled_perplexity(compiled, blocks)
        timings[f"perplexity {label} (compiled)"] = time.perf_counter() - t0
        measure(label, "dsa", ppl)

    print("measuring (attention / perplexity / passkeys found, i.e. the key's digits in the "
          "greedy answer; exact: the answer is exactly the key):")
    measure("dense", "dense")
    measure(f"window {args.top_k}", "window")
    if args.oracle:
        measure(f"oracle top {args.top_k}", "oracle")
    measure_compiled("DSA loaded indexers" if args.indexers else "DSA training-free")
    if args.calibrate:
        start = -(-CALIB_OFFSET * args.length // args.calib_length)  # after the fit block
        cal = token_blocks(tok, args.calib_length, args.calib_blocks, offset=start)
        res = calibrate(model, [b[None] for b in cal], config, steps=args.steps)
        timings["calibration"] = res.seconds
        print(f"calibration: {res.steps} steps, {res.tokens} tokens, {res.seconds:.0f} s, "
              f"KL {res.losses[0]:.4f} -> {sum(res.losses[-10:]) / min(10, len(res.losses)):.4f}")
        measure_compiled("DSA calibrated")
    if args.plot:
        report = selection_recall(model, blocks[:1], config)
        print(report)
        print(f"recall plot: {report.plot(args.plot)}")
    if args.save:
        save_indexers(model, args.save)
        print(f"indexers saved to {args.save}")

    if not args.no_generate:
        print(f"\ngeneration: model.generate, greedy, {args.new_tokens} new tokens "
              f"after each passkey prompt (the same model, its forward compiled with "
              f'backend="dsa" for DSA):')
        t0 = time.perf_counter()
        generation(model, tok, config, args.generate_lengths, args.new_tokens,
                   "DSA calibrated" if args.calibrate else "DSA")
        timings["generation (dense + DSA)"] = time.perf_counter() - t0

    print("\npasskey answers that are not exactly the key (key: greedy answer):")
    for where, wrong in misses.items():
        for key, answer in wrong:
            print(f"  {where:<32} {key}: {answer!r}")
    dense = rows["dense"][0]
    print("\nsummary (perplexity relative to dense):")
    for label, (ppl, _) in rows.items():
        print(f"  {label:<28} {ppl:8.3f}  {ppl / dense:6.3f}x")
    print("\ntimings (s):")
    for label, sec in timings.items():
        print(f"  {label:<32} {sec:7.1f}")


if __name__ == "__main__":
    main()
