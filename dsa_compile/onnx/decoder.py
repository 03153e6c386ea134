"""A stateful ONNX decoder (KV cache + DSA index-key cache) written from a Hugging Face
Llama-family model's weights.

    dsa_compile.onnx.export(model, (input_ids,), "decoder.onnx", config=cfg, past=True)
    dsa_compile.onnx.export(model, (input_ids,), "dense.onnx", past=True, dense=True)

One file serves prefill (past length 0) and every decode step; batch, new length and
past length are dynamic. Inputs and outputs carry the names Hugging Face / Optimum
decoders use, plus the index-key state of DSA:

    input_ids        int64 [B, L]
    attention_mask   int64 [B, P + L]     1 = token, 0 = (left) padding, past included
    position_ids     int64 [B, L]
    past_key_values.{i}.key        float32 [B, Hkv, P, D]
    past_key_values.{i}.value      float32 [B, Hkv, P, D]
    past_key_values.{i}.index_key  float32 [B, P, d_I]      (DSA files only)
 -> logits           float32 [B, L, V]    ([B, 1, V] with logits="last")
    present.{i}.key / .value / .index_key                   (P + L rows)

The file's metadata ``dsa_compile.decoder`` (JSON) lists the state tensors, their
shapes and what generation needs (:mod:`dsa_compile.onnx.generate` reads it).

With ``shared_buffer=True`` the state tensors are buffers of a fixed capacity C instead
(past_key_values.{i}.key [B, Hkv, C, D], .index_key [B, C, d_I]; P = attention_mask's
length - L): the graph writes rows P .. P + L - 1 with ScatterND and present.* is the
written buffer, so a runtime that binds present.* to the past buffer (onnxruntime
IOBinding) updates it in place, and attention reads the buffer with the padded mask
(rows past P + L are empty and, being after every query, causally hidden too). The
concat layout copies the whole cache every step; this one writes one row per layer.

Why the graph is written here rather than traced. The issue asks for a decoder whose
non-attention part is as lean as onnxruntime-genai's. Tracing a Hugging Face model with
its cache through ``torch.onnx.export`` gives per-layer repeat_kv expands, mask
construction from ``cache_position`` (which the dsa ops cannot take, see
export._no_general_mask), RoPE with batch-1 cos/sin and cache objects that torch.export
cannot return; the last prefill export was several times slower than genai's before
attention counted. Llama-family decoders are a short, fixed recipe, so this module is
the compiler idea at the ONNX level: read the weights, emit the canonical layer with
fused MatMuls (one for q/k/v, one for gate/up, the indexer's query side in one), RoPE
on [B, L, H, D] (where the indexer also reads q and k, so no transpose is needed for
it), and for attention either one ``dsa.Attention`` node (with the runtime
``q_offset`` input: the past length) or, with ``dense=True``, opset-23 ``Attention``
with past state: the like-for-like dense baseline. Families: llama, mistral (without
sliding window), qwen2 (q/k/v bias), qwen3 (q/k norm); others raise ExportError.

The indexers are each site's registry indexer (:mod:`dsa_compile.indexer`), the same
ones ``torch.compile(backend="dsa")`` and ``dsa_compile.evaluation.attention_override``
use, so the PyTorch DSA model and the file select the same keys. Sites without one get
one from an eager "dsa" run on the example (fitting itself when it has >= 256 tokens).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dsa_compile.config import DSAConfig
from dsa_compile.onnx import functions

META_DECODER = "dsa_compile.decoder"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class DecoderExportError(RuntimeError):
    """The model is not one this decoder writer supports (the message says why)."""


@dataclasses.dataclass
class DecoderSpec:
    """What the graph needs to know about the model, read from its HF config."""

    family: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float


class _Graph:
    """Node list, initializers and unique names of one ONNX graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def name(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1,
           hint: str | None = None, domain: str = "", **attrs):
        outs = outputs if isinstance(outputs, list) else [
            self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain,
                                           name=self.name(f"n_{op_type}"), **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, value) -> str:
        arr = value.detach().float().cpu().numpy() if hasattr(value, "detach") else value
        arr = np.asarray(arr)  # (ascontiguousarray would make a 0-d scalar [1])
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(arr) if arr.ndim else arr, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.weight(self.name("const"), np.asarray(value, dtype=dtype))


def model_spec(model: torch.nn.Module) -> DecoderSpec:
    """The decoder shape of a Hugging Face causal LM, or DecoderExportError."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise DecoderExportError(
            f"export(past=True) writes Llama-family decoders ({', '.join(FAMILIES)}); "
            f"got model_type {family!r}. Export it without past=True (prefill only)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise DecoderExportError(f"{family} with sliding_window={config.sliding_window} is "
                                 f"not supported by the decoder writer")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise DecoderExportError(f"hidden_act {config.hidden_act!r}: only silu is supported")
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    return DecoderSpec(family, config.num_hidden_layers, config.hidden_size, q_heads,
                       config.num_key_value_heads or q_heads, head_dim, config.vocab_size,
                       float(config.rms_norm_eps))


def _linear_t(*linears) -> np.ndarray:
    """[in, sum(out)] of nn.Linear weights, concatenated along the output."""
    return np.concatenate([m.weight.detach().float().cpu().numpy().T for m in linears], 1)


def _bias(*linears) -> np.ndarray | None:
    if all(m.bias is None for m in linears):
        return None
    return np.concatenate([(m.bias if m.bias is not None else torch.zeros(m.out_features))
                           .detach().float().cpu().numpy() for m in linears])


def _linear(g: _Graph, x: str, w_name: str, w: np.ndarray, b: np.ndarray | None) -> str:
    y = g.op("MatMul", x, g.weight(w_name, w))
    return y if b is None else g.op("Add", y, g.weight(w_name + ".bias", b))


def _rms_norm(g: _Graph, x: str, weight, name: str, eps: float) -> str:
    return g.op("RMSNormalization", x, g.weight(name, weight), axis=-1, epsilon=eps)


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x [B, L, H, D] * cos + rotate_half(x) * sin (cos/sin [B, L, 1, D])."""
    first, second = g.op("Split", x, g.const([half, half]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def site_indexers(model: torch.nn.Module, example_ids: torch.Tensor,
                  config: DSAConfig, spec: DecoderSpec) -> list:
    """Each layer's registry indexer; an eager "dsa" run on ``example_ids`` creates (and
    fits, with >= 256 tokens) the missing ones."""
    from dsa_compile.evaluation import attention_override
    from dsa_compile.indexer import REGISTRY

    def lookup():
        found = REGISTRY.indexers_of(model)
        return [found.get(f"model.layers.{i}.self_attn") for i in range(spec.layers)]

    indexers = lookup()
    if any(ix is None for ix in indexers):
        with torch.no_grad(), attention_override(model, "dsa", config):
            model(input_ids=example_ids, use_cache=False)
        indexers = lookup()
    missing = [i for i, ix in enumerate(indexers) if ix is None]
    if missing:
        raise DecoderExportError(f"layers {missing} got no indexer from the eager DSA run "
                                 f"(their attention is not SDPA without a mask?)")
    return indexers


def state_names(spec: DecoderSpec, dense: bool,
                shared_buffer: bool = False) -> list[tuple[str, str, str]]:
    """(past input, present output, shape) of every state tensor, layer by layer."""
    rows = "capacity" if shared_buffer else "past"
    kinds = [("key", f"[batch, kv_heads, {rows}, head_dim]"),
             ("value", f"[batch, kv_heads, {rows}, head_dim]")]
    if not dense:
        kinds.append(("index_key", f"[batch, {rows}, index_dim]"))
    return [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", shape)
            for i in range(spec.layers) for kind, shape in kinds]


def build_decoder(model: torch.nn.Module, config: DSAConfig | None, dense: bool,
                  example_ids: torch.Tensor | None = None,
                  query_chunk: int = functions.DEFAULT_QUERY_CHUNK,
                  logits: str = "all", shared_buffer: bool = False) -> onnx.ModelProto:
    """The decoder ModelProto (no dsa functions attached yet: export.finish_model does).

    Args:
        model: a Hugging Face causal LM of :data:`FAMILIES` (fp32 weights are written).
        config: DSAConfig of the DSA attention (top_k, dense_below, indexer shape).
        dense: write opset-23 ``Attention`` with past state instead of ``dsa.Attention``.
        example_ids: int64 [B, L] for the eager run that creates missing indexers.
        query_chunk: query rows per Loop iteration of the dsa bodies.
        logits: "all" ([B, L, V], as Hugging Face) or "last" ([B, 1, V]: what generation
            reads; prefill skips L - 1 rows of the vocabulary projection).
        shared_buffer: state tensors are buffers of a fixed capacity (rows P .. P + L - 1
            written by ScatterND; P = attention_mask's length - L), not a past to Concat.
    """
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
    spec = model_spec(model)
    config = config or DSAConfig()
    hf = model.model
    indexers = None
    if not dense:
        if example_ids is None:
            raise ValueError("a DSA decoder needs example input_ids to find its indexers")
        indexers = site_indexers(model, example_ids, config, spec)
    g = _Graph()
    hq, hkv, d = spec.q_heads, spec.kv_heads, spec.head_dim
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info(
        "logits", f32, ["batch", "sequence" if logits == "all" else 1, spec.vocab])]
    rows_in, rows_out = ("capacity", "capacity") if shared_buffer else \
        ("past_sequence", "total_sequence")
    for past, present, _ in state_names(spec, dense, shared_buffer):
        if past.endswith("index_key"):
            dims_in, dims_out = ["batch", rows_in, indexers[0].index_dim], \
                ["batch", rows_out, indexers[0].index_dim]
        else:
            dims_in, dims_out = ["batch", hkv, rows_in, d], ["batch", hkv, rows_out, d]
        inputs.append(helper.make_tensor_value_info(past, f32, dims_in))
        outputs.append(helper.make_tensor_value_info(present, f32, dims_out))

    # Shared per step: embeddings, RoPE tables, past length, masks.
    x = g.op("Gather", g.weight("model.embed_tokens.weight", hf.embed_tokens.weight),
             "input_ids", axis=0)                                       # [B, L, H]
    rotary = hf.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=f32), g.const([-1]))
    freqs = g.op("Mul", pos, g.weight("rope.inv_freq", inv_freq))       # [B, L, D/2]
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))
    scaling = g.const(float(getattr(rotary, "attention_scaling", 1.0)), np.float32)
    cos = g.op("Mul", g.op("Cos", emb), scaling, hint="cos")           # [B, L, 1, D]
    sin = g.op("Mul", g.op("Sin", emb), scaling, hint="sin")
    new_len = g.op("Shape", "input_ids", start=1, end=2, hint="new_len")
    if shared_buffer:
        total = g.op("Shape", "attention_mask", start=1, end=2)
        past_len = g.op("Sub", total, new_len, hint="past_len")
        capacity = g.op("Shape", "past_key_values.0.key", start=2, end=3, hint="capacity")
        # The mask padded to the capacity: rows past P + L are empty (and after every
        # query, so causality hides them too).
        pads = g.op("Concat", g.const([0, 0, 0]), g.op("Sub", capacity, total), axis=0)
        full_mask = g.op("Pad", "attention_mask", pads)
        kv_at, idx_at = _buffer_rows(g, "input_ids", past_len, new_len, hkv)
    else:
        past_len = g.op("Shape", "past_key_values.0.key", start=2, end=3, hint="past_len")
        full_mask = "attention_mask"
    key_mask = g.op("Cast", full_mask, to=TensorProto.BOOL, hint="key_mask")
    if dense:
        mask = _dense_mask(g, key_mask, past_len, new_len)
    else:
        q_offset = g.op("Squeeze", past_len, g.const([0]), hint="q_offset")
    scale = float(getattr(hf.layers[0].self_attn, "scaling", d ** -0.5))

    for i, layer in enumerate(hf.layers):
        attn, p = layer.self_attn, f"model.layers.{i}"
        h = _rms_norm(g, x, layer.input_layernorm.weight, f"{p}.input_layernorm.weight",
                      spec.eps)
        qkv = _linear(g, h, f"{p}.self_attn.qkv_proj.weight",
                      _linear_t(attn.q_proj, attn.k_proj, attn.v_proj),
                      _bias(attn.q_proj, attn.k_proj, attn.v_proj))
        q, k, v = g.op("Split", qkv, g.const([hq * d, hkv * d, hkv * d]), axis=-1, outputs=3)
        q = g.op("Reshape", q, g.const([0, 0, hq, d]))                 # [B, L, Hq, D]
        k = g.op("Reshape", k, g.const([0, 0, hkv, d]))
        v = g.op("Reshape", v, g.const([0, 0, hkv, d]))
        if getattr(attn, "q_norm", None) is not None:                   # qwen3
            q = _rms_norm(g, q, attn.q_norm.weight, f"{p}.self_attn.q_norm.weight", spec.eps)
            k = _rms_norm(g, k, attn.k_norm.weight, f"{p}.self_attn.k_norm.weight", spec.eps)
        q, k = _rope(g, q, cos, sin, d // 2), _rope(g, k, cos, sin, d // 2)
        q_t = g.op("Transpose", q, perm=[0, 2, 1, 3])                  # [B, Hq, L, D]
        k_t = g.op("Transpose", k, perm=[0, 2, 1, 3])
        v_t = g.op("Transpose", v, perm=[0, 2, 1, 3])
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        if shared_buffer:
            g.op("ScatterND", past_k, kv_at, k_t, outputs=[present_k])
            g.op("ScatterND", past_v, kv_at, v_t, outputs=[present_v])
        if dense and shared_buffer:
            out = g.op("Attention", q_t, present_k, present_v, mask, scale=scale)
        elif dense:
            out = g.op("Attention", q_t, k_t, v_t, mask, past_k, past_v, scale=scale,
                       outputs=[g.name("attn"), present_k, present_v])[0]
        else:
            if not shared_buffer:
                g.op("Concat", past_k, k_t, axis=2, outputs=[present_k])
                g.op("Concat", past_v, v_t, axis=2, outputs=[present_v])
            q_idx, k_idx, w = _indexer(g, indexers[i], q, k, p)
            past_idx, present_idx = f"past_key_values.{i}.index_key", f"present.{i}.index_key"
            if shared_buffer:
                g.op("ScatterND", past_idx, idx_at, k_idx, outputs=[present_idx])
            else:
                g.op("Concat", past_idx, k_idx, axis=1, outputs=[present_idx])
            out = g.op("Attention", q_t, present_k, present_v, q_idx, present_idx, w,
                       key_mask, q_offset, domain=functions.DOMAIN, top_k=config.top_k,
                       scale=scale, causal=1, softcap=float(config.softcap or 0.0),
                       dense_below=config.dense_below, query_chunk=query_chunk)
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, hq * d]))
        x = g.op("Add", x, _linear(g, out, f"{p}.self_attn.o_proj.weight",
                                   _linear_t(attn.o_proj), _bias(attn.o_proj)))
        h = _rms_norm(g, x, layer.post_attention_layernorm.weight,
                      f"{p}.post_attention_layernorm.weight", spec.eps)
        mlp = layer.mlp
        gate_up = _linear(g, h, f"{p}.mlp.gate_up_proj.weight",
                          _linear_t(mlp.gate_proj, mlp.up_proj), _bias(mlp.gate_proj, mlp.up_proj))
        gate, up = g.op("Split", gate_up, g.const([mlp.gate_proj.out_features] * 2), axis=-1,
                        outputs=2)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, _linear(g, act, f"{p}.mlp.down_proj.weight",
                                   _linear_t(mlp.down_proj), _bias(mlp.down_proj)))
    x = _rms_norm(g, x, hf.norm.weight, "model.norm.weight", spec.eps)
    if logits == "last":
        x = g.op("Slice", x, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1]))
    lm_head = model.lm_head
    if lm_head.weight is hf.embed_tokens.weight:  # tied: Gemm with transB, no copy
        flat = g.op("Reshape", x, g.const([-1, spec.hidden]))
        y = g.op("Gemm", flat, "model.embed_tokens.weight", transB=1)
        shape = g.op("Concat", g.op("Shape", x, start=0, end=2), g.const([spec.vocab]), axis=0)
        g.op("Reshape", y, shape, outputs=["logits"])
    else:
        g.op("MatMul", x, g.weight("lm_head.weight", _linear_t(lm_head)), outputs=["logits"])

    graph = helper.make_graph(g.nodes, "dsa_decoder" if not dense else "dense_decoder",
                              inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", functions.ONNX_OPSET)]
    if not dense:
        opsets.append(helper.make_opsetid(functions.DOMAIN, functions.VERSION))
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    meta = decoder_metadata(model, spec, dense, indexers, logits, shared_buffer)
    helper.set_model_props(proto, {META_DECODER: json.dumps(meta)})
    return proto


def _dense_mask(g: _Graph, key_mask: str, past_len: str, new_len: str) -> str:
    """bool [B, 1, L, Lk]: query t (position P + t) sees key s <= P + t that is not
    padding, and always itself (a padding query then attends to itself alone, so no row
    is empty and no NaN reaches the real tokens through V). key_mask: bool [B, Lk] (Lk =
    P + L, or the buffer capacity)."""
    lk = g.op("Shape", key_mask, start=1, end=2)
    zero, one = g.const(0), g.const(1)
    key_pos = g.op("Range", zero, g.op("Squeeze", lk, g.const([0])), one)      # [Lk]
    q_pos = g.op("Range", g.op("Squeeze", past_len, g.const([0])),
                 g.op("Squeeze", g.op("Add", past_len, new_len), g.const([0])), one)
    q_pos = g.op("Unsqueeze", q_pos, g.const([1]))                             # [L, 1]
    causal = g.op("LessOrEqual", key_pos, q_pos)                               # [L, Lk]
    itself = g.op("Equal", key_pos, q_pos)
    keep = g.op("Unsqueeze", key_mask, g.const([1, 2]))                        # [B, 1, 1, Lk]
    return g.op("Or", g.op("And", causal, keep), itself, hint="attn_mask")


def _buffer_rows(g: _Graph, ids: str, past_len: str, new_len: str,
                 kv_heads: int) -> tuple[str, str]:
    """ScatterND indices of the new rows P .. P + L - 1: int64 [B, Hkv, L, 3] into a K/V
    buffer [B, Hkv, C, D] and [B, L, 2] into an index-key buffer [B, C, d_I]."""
    zero, one = g.const(0), g.const(1)
    batch = g.op("Shape", ids, start=0, end=1)
    sq = lambda x: g.op("Squeeze", x, g.const([0]))
    b = g.op("Range", zero, sq(batch), one)
    h = g.op("Range", zero, g.const(kv_heads), one)
    pos = g.op("Range", sq(past_len), sq(g.op("Add", past_len, new_len)), one)
    kv_shape = g.op("Concat", batch, g.const([kv_heads]), new_len, g.const([1]), axis=0)
    parts = [g.op("Expand", g.op("Reshape", x, g.const(shape)), kv_shape)
             for x, shape in ((b, [-1, 1, 1, 1]), (h, [1, -1, 1, 1]), (pos, [1, 1, -1, 1]))]
    kv_at = g.op("Concat", *parts, axis=-1, hint="kv_rows")
    idx_shape = g.op("Concat", batch, new_len, g.const([1]), axis=0)
    parts = [g.op("Expand", g.op("Reshape", x, g.const(shape)), idx_shape)
             for x, shape in ((b, [-1, 1, 1]), (pos, [1, -1, 1]))]
    return kv_at, g.op("Concat", *parts, axis=-1, hint="index_rows")


def _indexer(g: _Graph, indexer, q: str, k: str, prefix: str) -> tuple[str, str, str]:
    """The indexer of one site on q [B, L, Hq, D] and k [B, L, Hkv, D] (post-RoPE):
    q_idx [B, L, H_I, d_I], k_idx [B, L, d_I], w [B, L, H_I] (see Indexer._project)."""
    hi, di = indexer.index_heads, indexer.index_dim
    q_cat = g.op("Reshape", q, g.const([0, 0, -1]))
    k_cat = g.op("Reshape", k, g.const([0, 0, -1]))
    t = lambda p: p.detach().float().cpu().numpy()
    wq = np.concatenate([t(indexer.wq), t(indexer.ww)], 1)
    bq = np.concatenate([t(indexer.bq), t(indexer.bw)])
    qw = _linear(g, q_cat, f"{prefix}.indexer.wq_ww", wq, bq)
    q_idx, w = g.op("Split", qw, g.const([hi * di, hi]), axis=-1, outputs=2)
    q_idx = g.op("Reshape", q_idx, g.const([0, 0, hi, di]))
    w = g.op("Softplus", w)
    k_idx = _linear(g, k_cat, f"{prefix}.indexer.wk", t(indexer.wk), t(indexer.bk))
    return q_idx, k_idx, w


def decoder_metadata(model, spec: DecoderSpec, dense: bool, indexers, logits: str,
                     shared_buffer: bool = False) -> dict:
    """The JSON recorded as META_DECODER: state tensors and what generation needs."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    return {
        "format": 1, "family": spec.family, "attention": "dense" if dense else "dsa",
        "layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "index_dim": None if dense else indexers[0].index_dim, "vocab": spec.vocab,
        "logits": logits,
        "state_layout": "shared_buffer" if shared_buffer else "concat",
        "inputs": ["input_ids", "attention_mask", "position_ids"],
        "state": [{"past": past, "present": present, "shape": shape}
                  for past, present, shape in state_names(spec, dense, shared_buffer)],
        "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
        "pad_token_id": pad,
        "notes": "attention_mask covers past + new tokens (left padding); position_ids = "
                 "cumsum(attention_mask) - 1 at the new tokens; " + (
                     "past_key_values.* are zero-initialised buffers of a capacity >= the "
                     "longest total length; present.* are the same buffers with the new rows "
                     "written: bind each present.* to its past_key_values.* OrtValue "
                     "(IOBinding) and the update is in place." if shared_buffer else
                     "feed present.* back as past_key_values.* (empty [B, ., 0, .] tensors "
                     "for prefill)."),
    }
