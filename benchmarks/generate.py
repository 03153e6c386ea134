"""End-to-end decode tokens/s: a Llama-3-8B-shaped model, torch.compile default vs "dsa".

    python benchmarks/generate.py [--lengths 32768 131072] [--batch 1] [--layers 32]
                                  [--steps 32] [--shape llama8b|smollm2] [--device cuda|cpu]

Random weights (all ``--layers`` layers, bf16, Hq=32, Hkv=8, D=128, hidden 4096, MLP
14336, vocab 128256), a StaticCache of ``L + steps`` slots, a random prompt of L tokens.
Each method prefills once (untimed), then runs ``steps`` greedy decode steps through
the compiled ``forward`` the way ``generate`` does (one token, its cache_position);
tokens/s = B * steps / time. Methods: ``inductor`` = ``torch.compile(forward)``,
``dsa`` = ``torch.compile(forward, backend="dsa", options={"top_k": 2048})`` (index-key
cache on; decode steps above the measured crossover run the decode kernels). The
weights are read once per step either way; the line "weights" gives the time of that
read at the measured copy bandwidth, so the attention's share of a step shows.
``--shape smollm2 --device cpu``: SmolLM2-135M's shape (30 layers, 9/3 heads, D=64,
random weights, float32) on the CPU reference ops, top_k 256, also with the index-key
cache off (``dsa_nocache``) so the cache's share shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


SHAPES = {
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
}


def random_llama(layers: int, shape: str = "llama8b", device: str = "cuda"):
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], num_hidden_layers=layers,
                                      max_position_embeddings=262144)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    return model.to(torch.bfloat16) if device == "cuda" else model


DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def decode_rate(model, compile_kw, length, batch, steps):
    """(tokens/s, ms per step, greedy tokens) of ``steps`` decode steps after a prefill."""
    from transformers import StaticCache

    torch._dynamo.reset()
    forward = torch.compile(type(model).forward.__get__(model), **compile_kw)
    g = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=DEV, generator=g)
    cache = StaticCache(config=model.config, max_cache_len=length + steps + 8)
    tokens = []
    with torch.no_grad():
        out = forward(input_ids=ids, past_key_values=cache,
                      cache_position=torch.arange(length, device=DEV), logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        for warm in (True, False):
            _sync()
            t0 = time.perf_counter()
            for i in range(steps if not warm else 3):
                pos = length + i if not warm else length + steps + i  # warm-up writes spare slots
                out = forward(input_ids=nxt, past_key_values=cache,
                              cache_position=torch.tensor([pos], device=DEV))
                nxt = out.logits[:, -1:].argmax(-1)
                if not warm:
                    tokens.append(nxt)
            _sync()
            elapsed = time.perf_counter() - t0
    del cache
    return batch * steps / elapsed, elapsed / steps * 1e3, torch.cat(tokens, 1)


def main() -> None:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    DEV = args.device
    from dsa_compile import index_key_cache
    from dsa_compile.backends.dynamo import dsa_backend

    try:  # from a source tree (no entry point installed): register the backend by name
        torch._dynamo.lookup_backend("dsa")
    except Exception:
        torch._dynamo.register_backend(name="dsa")(dsa_backend)
    layers = args.layers or (32 if args.shape == "llama8b" else 30)
    model = random_llama(layers, args.shape, DEV)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if DEV == "cuda":
        import triton

        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"triton {triton.__version__}")
    else:
        print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    a = torch.empty(1 << (30 if DEV == "cuda" else 27), dtype=torch.int16, device=DEV)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    _sync()
    bw = 10 * 2 * a.numel() * 2 / (time.perf_counter() - t0)
    del a, b
    print(f"{args.shape}, layers {layers}, B={args.batch}, weights {weight_bytes / 1e9:.2f} GB: "
          f"{weight_bytes / bw * 1e3:.2f} ms per step at the copy bandwidth {bw / 1e12:.2f} TB/s")
    top_k = 2048 if args.shape == "llama8b" else 256
    methods = {"inductor": {}, "dsa": {"backend": "dsa", "options": {"top_k": top_k}}}
    if DEV == "cpu":  # the reference ops: sparse from the first key past top_k
        methods["dsa"]["options"]["dense_below"] = 0
        methods["dsa_nocache"] = {"backend": "dsa", "options": {
            "top_k": top_k, "dense_below": 0, "index_cache": False}}
    print(f"{'L':>7} {'method':<11} {'tok/s':>8} {'ms/step':>8} {'x inductor':>10}", flush=True)
    for length in args.lengths:
        base = None
        for name, kw in methods.items():
            index_key_cache().clear()
            rate, ms, _ = decode_rate(model, kw, length, args.batch, args.steps)
            base = base or rate
            extra = ""
            if name == "dsa":
                s = index_key_cache().stats()
                extra = f"  index-key cache hits {s['hits']}, misses {s['misses']}"
            print(f"{length:>7} {name:<11} {rate:8.1f} {ms:8.2f} {rate / base:9.2f}x{extra}",
                  flush=True)
            if DEV == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
