"""nn.MultiheadAttention and the fused nn.TransformerEncoderLayer as attention sites.

Dynamo does not trace into these modules' attention; each is one opaque call:

- ``F.multi_head_attention_forward(query, key, value, ...)``: every
  nn.MultiheadAttention under dynamo (its fast path is blocked while tracing),
  inputs [L, B, E] (batch_first modules transpose around the call);
- ``torch._native_multi_head_attention(query, key, value, ...)``: the MHA fast path,
  inputs [B, L, E];
- ``torch._transformer_encoder_layer_fwd(src, ...)``: an eval-mode
  nn.TransformerEncoderLayer (batch_first, relu/gelu) under no_grad, src [B, L, E].

:func:`match` turns each into an :class:`AttentionSite` named after the
MultiheadAttention module (``layers.0.self_attn``); :func:`rewrite_mha_site` replaces
the call by what it computes, with ``dsa.attention`` as the attention:

    in-projection -> split heads [B, H, L, D] -> dsa.attention -> merge heads
    -> out-projection   (encoder layer: + residuals, layer norms, feed-forward)

Masks reach the call already canonicalised by the module (bool -> 0 / -inf float;
merged into [B, H, L, S] on the fast paths) and are proven by :mod:`masks`.
``is_causal=True`` is taken at its word, as PyTorch itself does (it drops the mask for
the hint). Stays dense, with the reason: training-mode dropout, attention weights that
are used, bias_k / bias_v, add_zero_attn, static_k / static_v, unbatched input, a 3-D
(per batch and head) attn_mask, and any mask not provably causal / key padding.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx import Node

from dsa_compile.config import DSAConfig
from dsa_compile.passes.masks import (
    MaskInfo,
    classify_additive,
    classify_bool,
    classify_key_padding,
)
from dsa_compile.passes.normalize import is_number, op_of, val
from dsa_compile.passes.rewrite import emit_attention
from dsa_compile.passes.site import AttentionSite, Reject


@dataclasses.dataclass
class MHACall:
    """The projections of one multi-head attention; inputs [L, B, E] if ``seq_first``."""

    query: Node
    key: Node
    value: Node
    embed_dim: int
    num_heads: int
    in_weight: Node | None         # packed [3E, E]
    in_bias: Node | None           # packed [3E]
    separate: tuple | None         # (q_weight, k_weight, v_weight) when kdim / vdim != E
    out_weight: Node
    out_bias: Node | None
    seq_first: bool


@dataclasses.dataclass
class EncoderLayerCall:
    """torch._transformer_encoder_layer_fwd: self-attention + feed-forward, [B, L, E]."""

    attn: MHACall
    use_gelu: bool                 # else relu
    norm_first: bool
    eps: float                     # of both layer norms
    norm1: tuple                   # (weight, bias) of each
    norm2: tuple
    linear1: tuple
    linear2: tuple


def _arguments(node: Node) -> dict:
    """{parameter name: argument} of the call, defaults filled in."""
    target = node.target
    if target is F.multi_head_attention_forward:
        bound = inspect.signature(target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    op = target if isinstance(target, torch._ops.OpOverload) else \
        getattr(torch.ops.aten, target.__name__).default
    out = {a.name: a.default_value for a in op._schema.arguments}
    out.update(zip(out, node.args))
    out.update(node.kwargs)
    return out


def _const(x, kind, what: str):
    if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
        raise Reject(f"{what} is not a constant")
    return x


def _check_batched(*xs) -> None:
    for x in xs:
        if val(x) is None or val(x).dim() != 3:
            raise Reject("unbatched (2-D) input")


def _check_weights_unused(node: Node, need_weights, average) -> None:
    """Only output 0 may be used: DSA does not compute the attention weights."""
    for u in node.users:
        if op_of(u) == "getitem" and (u.args[1] == 0 or not u.users):
            continue
        raise Reject(f"need_weights={need_weights} and the attention weights output "
                     f"(average_attn_weights={average}) is used")


def _attn_mask(mask: Node, lookup, dims: tuple) -> MaskInfo:
    """An attn_mask in nn.MultiheadAttention's convention (bool: True = masked)."""
    v = val(mask)
    if v is None:
        raise Reject("attn_mask has no shape information")
    if v.dim() not in dims:
        per_head = " (one mask per batch and head)" if v.dim() == 3 else ""
        raise Reject(f"{v.dim()}-D attn_mask{per_head}")
    info = classify_bool(mask, True, lookup) if v.dtype == torch.bool else \
        classify_additive(mask, lookup)
    if info.topk is not None:
        raise Reject("top-k selection mask on nn.MultiheadAttention")
    return info


def _merged_mask(mask, mask_type, lookup) -> MaskInfo:
    """The fast paths' mask: 1 = key padding [B, S], 0 = [L, S], 2 = merged [B, H, L, S]."""
    if mask is None:
        return MaskInfo()
    if mask_type == 1:
        return classify_key_padding(mask)
    if mask_type in (0, 2):
        return _attn_mask(mask, lookup, (2, 4))
    raise Reject(f"mask_type {mask_type!r}")


def _name(node: Node) -> str:
    t = node.target
    return t._opname if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", "")


def _call(node: Node) -> MHACall | EncoderLayerCall:
    """The call's tensors and settings, read from its current arguments."""
    a, name = _arguments(node), _name(node)
    if name == "multi_head_attention_forward":
        separate = None
        if a["use_separate_proj_weight"]:
            separate = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        return MHACall(a["query"], a["key"], a["value"],
                       _const(a["embed_dim_to_check"], int, "embed_dim"),
                       _const(a["num_heads"], int, "num_heads"), a["in_proj_weight"],
                       a["in_proj_bias"], separate, a["out_proj_weight"], a["out_proj_bias"],
                       seq_first=True)
    if name == "_native_multi_head_attention":
        return MHACall(a["query"], a["key"], a["value"], _const(a["embed_dim"], int, "embed_dim"),
                       _const(a["num_head"], int, "num_head"), a["qkv_weight"], a["qkv_bias"],
                       None, a["proj_weight"], a["proj_bias"], seq_first=False)
    src = a["src"]
    attn = MHACall(src, src, src, _const(a["embed_dim"], int, "embed_dim"),
                   _const(a["num_heads"], int, "num_heads"), a["qkv_weight"], a["qkv_bias"],
                   None, a["proj_weight"], a["proj_bias"], seq_first=False)
    return EncoderLayerCall(
        attn, _const(a["use_gelu"], bool, "use_gelu"),
        _const(a["norm_first"], bool, "norm_first"), float(_const(a["eps"], float, "eps")),
        (a["norm_weight_1"], a["norm_bias_1"]), (a["norm_weight_2"], a["norm_bias_2"]),
        (a["ffn_weight_1"], a["ffn_bias_1"]), (a["ffn_weight_2"], a["ffn_bias_2"]))


def _functional_masks(node: Node, a: dict, lookup) -> MaskInfo:
    """Checks of F.multi_head_attention_forward's options, then its masks."""
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            raise Reject(f"{name} is set (extra keys outside the sequence)")
    if a["add_zero_attn"] is not False:
        raise Reject("add_zero_attn appends a zero key")
    p = a["dropout_p"]
    if a["training"] is not False and not (is_number(p) and p == 0):
        raise Reject(f"training-mode dropout (dropout_p={p})")
    _check_weights_unused(node, a["need_weights"], a["average_attn_weights"])
    info = MaskInfo()
    if a["key_padding_mask"] is not None:
        info = info.merge(classify_key_padding(a["key_padding_mask"]))
    if _const(a["is_causal"], bool, "is_causal"):
        info = info.merge(MaskInfo(causal=True))   # the documented hint: attn_mask is causal
    elif a["attn_mask"] is not None:
        info = info.merge(_attn_mask(a["attn_mask"], lookup, (2,)))
    return info


def match(site: AttentionSite, node: Node, lookup) -> None:
    """Fill ``site`` from an MHA / encoder-layer call (see module doc), or raise Reject."""
    a, name = _arguments(node), _name(node)
    call = _call(node)
    attn = call.attn if isinstance(call, EncoderLayerCall) else call
    if isinstance(call, EncoderLayerCall):
        site.name = f"{site.name}.self_attn" if site.name else "self_attn"
    _check_batched(attn.query, attn.key, attn.value)
    if name == "multi_head_attention_forward":
        info = _functional_masks(node, a, lookup)
    else:
        if name == "_native_multi_head_attention":
            _check_weights_unused(node, a["need_weights"], a["average_attn_weights"])
        info = _merged_mask(a["mask"], a["mask_type"], lookup)
    e, h = attn.embed_dim, attn.num_heads
    if h <= 0 or e % h:
        raise Reject(f"embed_dim {e} is not divisible by num_heads {h}")
    site.num_q_heads = site.num_kv_heads = h
    site.head_dim = e // h
    site.scale = 1.0 / math.sqrt(site.head_dim)
    if info.carried:
        c = info.carried[0]
        raise Reject(f"mask '{c.node.name}' is {c.why}")
    site.causal, site.q_offset, site.key_factors = info.causal, info.offset, info.key_factors
    site.lk = val(attn.key).shape[0 if attn.seq_first else 1]
    site.device = val(attn.query).device
    site.nodes = {node}


def _linear(g: fx.Graph, x: Node, w, b) -> Node:
    return g.call_function(F.linear, (x, w, b))


def _chunks(g: fx.Graph, x, dim: int = 0) -> list:
    """Thirds of a packed q/k/v tensor (None stays None)."""
    if x is None:
        return [None] * 3
    parts = g.call_method("chunk", (x, 3, dim))
    return [g.call_function(operator.getitem, (parts, i)) for i in range(3)]


def _in_projection(g: fx.Graph, c: MHACall, xq: Node, xk: Node, xv: Node) -> list[Node]:
    """q, k, v [.., E] as F.multi_head_attention_forward computes them."""
    if c.separate is not None:
        return [_linear(g, x, w, b) for x, w, b in zip((xq, xk, xv), c.separate,
                                                         _chunks(g, c.in_bias))]
    if xq is xk is xv:
        return _chunks(g, _linear(g, xq, c.in_weight, c.in_bias), -1)
    return [_linear(g, x, w, b) for x, w, b in zip((xq, xk, xv), _chunks(g, c.in_weight),
                                                     _chunks(g, c.in_bias))]


def _emit_mha(gm: fx.GraphModule, site: AttentionSite, c: MHACall, xq: Node, xk: Node,
              xv: Node, index: int, config: DSAConfig, params: dict) -> Node:
    """The attention output, out-projected, in the inputs' layout ([L, B, E] or [B, L, E])."""
    g = gm.graph
    split = (1, 2, 0, 3) if c.seq_first else (0, 2, 1, 3)      # -> [B, H, L, D]
    merge = (2, 0, 1, 3) if c.seq_first else (0, 2, 1, 3)      # [B, H, L, D] ->
    q, k, v = (g.call_method("permute", (g.call_method(
        "unflatten", (t, -1, (c.num_heads, site.head_dim))), *split))
        for t in _in_projection(g, c, xq, xk, xv))
    out = emit_attention(gm, site, q, k, v, index, config, params, site.device)
    out = g.call_method("flatten", (g.call_method("permute", (out, *merge)), -2))
    return _linear(g, out, c.out_weight, c.out_bias)


def _emit_encoder_layer(gm: fx.GraphModule, site: AttentionSite, c: EncoderLayerCall,
                        index: int, config: DSAConfig, params: dict) -> Node:
    """TransformerEncoderLayer's slow path, with the DSA self-attention."""
    g = gm.graph
    e = c.attn.embed_dim

    def norm(x, wb):
        return g.call_function(F.layer_norm, (x, (e,), *wb, c.eps))

    def attention(x):
        return _emit_mha(gm, site, c.attn, x, x, x, index, config, params)

    def feed_forward(x):
        h = _linear(g, x, *c.linear1)
        h = g.call_function(F.gelu if c.use_gelu else F.relu, (h,))
        return _linear(g, h, *c.linear2)

    def add(x, y):
        return g.call_function(operator.add, (x, y))

    x = c.attn.query
    if c.norm_first:
        x = add(x, attention(norm(x, c.norm1)))
        return add(x, feed_forward(norm(x, c.norm2)))
    x = norm(add(x, attention(x)), c.norm1)
    return norm(add(x, feed_forward(x)), c.norm2)


def rewrite_mha_site(gm: fx.GraphModule, site: AttentionSite, index: int, config: DSAConfig,
                     params: dict) -> None:
    """Replace one accepted MHA / encoder-layer call in ``gm`` by its DSA decomposition."""
    g = gm.graph
    node = site.output
    call = _call(node)      # now: an earlier rewrite may have replaced an input
    with g.inserting_before(node):
        if isinstance(call, EncoderLayerCall):
            out = _emit_encoder_layer(gm, site, call, index, config, params)
        else:
            out = _emit_mha(gm, site, call, call.query, call.key, call.value, index, config,
                            params)
    if isinstance(call, EncoderLayerCall):
        node.replace_all_uses_with(out)
    else:                                   # (output, weights): only output 0 is used
        for u in list(node.users):
            if u.args[1] == 0:
                u.replace_all_uses_with(out)
            g.erase_node(u)
    g.erase_node(node)
    site.rewritten = True
