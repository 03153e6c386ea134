"""End-to-end decode tokens/s: a Llama-3-8B-shaped model, torch.compile default vs "dsa".

    python benchmarks/generate.py [--lengths 32768 131072] [--batch 1 4] [--layers 32]
                                  [--steps 32] [--no-cudagraphs] [--prefill]
                                  [--shape llama8b|smollm2] [--device cuda|cpu]

Random weights (all ``--layers`` layers, bf16, Hq=32, Hkv=8, D=128, hidden 4096, MLP
14336, vocab 128256), a StaticCache of ``L + steps + 8`` slots holding a context of L
tokens. Each method runs ``steps`` greedy decode steps (after 3 warm-up steps) through
the compiled ``forward`` the way ``generate`` does (one token per sequence, its
cache_position); tokens/s = B * steps / time. Methods: ``inductor`` =
``torch.compile(forward, mode="reduce-overhead")`` on Hugging Face's sdpa attention
(which repeats K/V to Hq heads when a mask is passed, as it is under a StaticCache);
``inductor_gqa`` = the same with dense SDPA called on the KV heads directly, the G query
heads of a group folded into the query axis (no K/V copy: the strongest dense decode
Hugging Face models can be given without new kernels); ``dsa`` = ``torch.compile(forward,
backend="dsa", options={"top_k": 2048, "mode": "reduce-overhead"})`` (CUDA graphs on
both; ``--no-cudagraphs`` for neither); ``dsa_fp8`` = the same with
``index_cache_fp8=True`` (the index-key cache as packed e4m3 keys + a scale per token).
The index-key cache is on: the first compiled step projects the context's index keys
once (a miss per layer), later steps hit.

Context: by default the cache's K/V buffers are filled with random values (a real
prefill of 128K tokens through an 8B model costs minutes and does not change a decode
step's cost); ``--prefill`` runs the prompt through the eager model in 8K chunks, as
``generate`` runs its prefill uncompiled.

Printed with each length: the floors of one step at the copy bandwidth measured in the
same run: the weights (read once per step by either method), dense attention's K/V
cache, DSA's index keys plus top_k K/V rows per KV head; so the time splits into weights
+ attention + the rest. ``--shape smollm2 --device cpu``: SmolLM2-135M's shape (30
layers, 9/3 heads, D=64, random weights, float32) on the CPU reference ops, top_k 256,
also with the index-key cache off (``dsa_nocache``) so the cache's share shows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import harness
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


def sdpa_folded(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):
    """Hugging Face attention function: dense SDPA without repeating K/V for GQA.

    query [B, Hq, Lq, D], key/value [B, Hkv, L, D], attention_mask [B|1, 1, Lq, >=L]
    (bool or additive) or None -> ([B, Lq, Hq, D], None). The G = Hq / Hkv query heads
    of a KV group are consecutive, so [B, Hkv, G * Lq, D] queries meet their group's
    keys in one SDPA call; the mask rows repeat G times to match.
    """
    b, hq, lq, d = query.shape
    hkv, length = key.shape[1], key.shape[-2]
    g = hq // hkv
    mask = attention_mask
    if mask is None and lq > 1:  # causal, the queries ending at the last key
        mask = torch.ones(lq, length, dtype=torch.bool, device=query.device).tril(length - lq)
        mask = mask[None, None]
    if mask is not None:
        mask = mask[..., :length]
        if lq > 1:
            mask = mask.unsqueeze(2).expand(mask.shape[0], 1, g, lq, length)
            mask = mask.reshape(mask.shape[0], 1, g * lq, length)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, hkv, g * lq, d), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, lq, d).transpose(1, 2).contiguous(), None


def register_folded() -> None:
    """Make ``sdpa_folded`` an attention implementation (with sdpa's masks)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("sdpa_folded", sdpa_folded)
    AttentionMaskInterface.register("sdpa_folded", sdpa_mask)


def check_folded(model) -> float:
    """Max |logits| difference of sdpa_folded against sdpa on one short batch (eager)."""
    ids = torch.randint(0, model.config.vocab_size, (2, 37), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    outs = []
    with torch.no_grad():
        for impl in ("sdpa", "sdpa_folded"):
            model.config._attn_implementation = impl
            outs.append(model(input_ids=ids, attention_mask=mask).logits.float())
    model.config._attn_implementation = "sdpa"
    return (outs[0] - outs[1]).abs().max().item()


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def make_cache(model, batch: int, length: int, capacity: int, prefill: bool):
    """A StaticCache of ``capacity`` slots holding ``length`` context tokens per sequence."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=capacity)
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.no_grad():
        if prefill:
            ids = torch.randint(0, model.config.vocab_size, (batch, length), device=DEV,
                                generator=g)
            for start in range(0, length, 8192):
                stop = min(length, start + 8192)
                model(input_ids=ids[:, start:stop], past_key_values=cache,
                      cache_position=torch.arange(start, stop, device=DEV), logits_to_keep=1)
        else:  # one eager token allocates the buffers; random values stand for the context
            model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=DEV),
                  past_key_values=cache, cache_position=torch.zeros(1, dtype=torch.long,
                                                                    device=DEV))
            for layer in cache.layers:
                for buf in (layer.keys, layer.values):
                    buf[:, :, :length].normal_(generator=g)
    return cache


def decode_rate(model, compile_kw, length, batch, steps, prefill=False, attn="sdpa"):
    """(tokens/s, ms per step, seconds of compile + warm-up, index-key cache stats) of
    ``steps`` decode steps."""
    torch._dynamo.reset()
    model.config._attn_implementation = attn
    forward = torch.compile(type(model).forward.__get__(model), **compile_kw)
    cache = make_cache(model, batch, length, length + steps + 8, prefill)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEV)
    with torch.no_grad():
        t_warm = time.perf_counter()
        for warm in (True, False):
            _sync()
            t0 = time.perf_counter()
            for i in range(3 if warm else steps):
                pos = length + steps + i if warm else length + i  # warm-up writes spare slots
                out = forward(input_ids=nxt, past_key_values=cache,
                              cache_position=torch.tensor([pos], device=DEV))
                nxt = out.logits[:, -1:].argmax(-1)
            _sync()
            elapsed = time.perf_counter() - t0
            if warm:
                t_warm = time.perf_counter() - t_warm
    from dsa_compile import index_key_cache

    stats = index_key_cache().stats()  # while the cache (the store's key) is alive
    del cache, out
    model.config._attn_implementation = "sdpa"
    return batch * steps / elapsed, elapsed / steps * 1e3, t_warm, stats


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device copy (the step floors' rate)."""
    return harness.copy_bandwidth(DEV)


def main() -> None:
    global DEV
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--no-cudagraphs", action="store_true")
    parser.add_argument("--prefill", action="store_true",
                        help="a real (eager, chunked) prefill instead of random K/V")
    parser.add_argument("--methods", nargs="+", default=None)
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
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    graphs = DEV == "cuda" and not args.no_cudagraphs
    if DEV == "cuda":
        import triton

        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"triton {triton.__version__}  CUDA graphs: {graphs}")
    else:
        print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bw = copy_bandwidth()
    elt = next(model.parameters()).element_size()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    top_k = 2048 if args.shape == "llama8b" else 256
    print(f"{args.shape}, layers {layers}, weights {weight_bytes / 1e9:.2f} GB: "
          f"{weight_bytes / bw * 1e3:.2f} ms per step at the copy bandwidth {bw / 1e12:.2f} TB/s")
    mode = {"mode": "reduce-overhead"} if graphs else {}
    register_folded()
    print(f"sdpa_folded vs sdpa, eager logits max |diff| {check_folded(model):.2e}")
    methods = {"inductor": dict(mode), "inductor_gqa": dict(mode),
               "dsa": {"backend": "dsa", "options": {"top_k": top_k, **mode}},
               "dsa_fp8": {"backend": "dsa", "options": {"top_k": top_k,
                                                         "index_cache_fp8": True, **mode}}}
    if DEV == "cpu":  # the reference ops: sparse from the first key past top_k
        methods["dsa"]["options"]["dense_below"] = 0
        methods["dsa_fp8"]["options"]["dense_below"] = 0
        methods["dsa_nocache"] = {"backend": "dsa", "options": {
            "top_k": top_k, "dense_below": 0, "index_cache": False}}
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    print(f"{'B':>3} {'L':>7} {'method':<12} {'tok/s':>8} {'ms/step':>8} {'x inductor':>10} "
          f"{'warm s':>7}", flush=True)
    for batch in args.batch:
        for length in args.lengths:
            kv = layers * batch * length * cfg.num_key_value_heads * head_dim * 2 * elt
            d_i = 128 if args.shape == "llama8b" else 48
            sparse = layers * batch * (length * d_i * elt
                                       + min(top_k, length) * cfg.num_key_value_heads
                                       * head_dim * 2 * elt)
            print(f"{batch:>3} {length:>7} floors (ms/step): weights "
                  f"{weight_bytes / bw * 1e3:.2f}, dense K/V {kv / bw * 1e3:.2f}, "
                  f"DSA index keys + top_k rows {sparse / bw * 1e3:.2f}", flush=True)
            base = None
            for name, kw in methods.items():
                index_key_cache().clear()
                try:
                    rate, ms, warm, st = decode_rate(
                        model, kw, length, batch, args.steps, args.prefill,
                        "sdpa_folded" if name == "inductor_gqa" else "sdpa")
                except Exception as e:  # report and go on with the next point
                    print(f"{batch:>3} {length:>7} {name:<12} failed: {type(e).__name__}: "
                          f"{str(e)[:400]}", flush=True)
                    continue
                base = base or (rate if name == "inductor" else None)
                extra = ""
                if name.startswith("dsa"):
                    extra = (f"  index-key cache hits {st['hits']}, misses {st['misses']}, "
                             f"{st['bytes'] / 1e6:.1f} MB (K/V cache {kv / 1e6:.0f} MB)")
                ratio = f"{rate / base:9.2f}x" if base else f"{'-':>10}"
                print(f"{batch:>3} {length:>7} {name:<12} {rate:8.1f} {ms:8.2f} {ratio} "
                      f"{warm:7.1f}{extra}", flush=True)
                if DEV == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
