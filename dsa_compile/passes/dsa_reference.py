"""Models already written in DSA reference style, lowered to the DSA ops.

DeepSeek-V3.2's reference prefill computes the index scores densely,

    I = sum_h w[..., h] * relu(q_I[:, :, h] . k_I)        [B, Lq, Lk]   (+ causal mask)
    idx = I.topk(k, dim=-1).indices
    mask = full(-inf).scatter(-1, idx, 0)
    out = softmax(q.k^T * scale + mask[:, None] (+ causal)) @ v

The softmax detector sees the scattered ``-inf`` mask as an additive term and hands
the ``topk`` node here; this module proves the index scores have that form and
lowers the site to ``dsa.indexer_topk`` (with the model's OWN q_I, k_I, w, no
registry indexer) + ``dsa.sparse_attention``. Keys outside the top-k are masked in
both, so the result is the same (up to ties in the index scores).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx import Node

from dsa_compile.ops.spec import call_args
from dsa_compile.passes.masks import classify_bool
from dsa_compile.passes.normalize import arg, op_of, val, very_negative
from dsa_compile.passes.site import AttentionSite, ReferenceIndex, Reject


def _strip(x):
    while isinstance(x, Node) and op_of(x) in ("cast", "identity"):
        x = x.args[0]
    return x


def match_reference(site: AttentionSite, topk: Node, lookup) -> None:
    """Set ``site.reference`` (the model's q_I, k_I, w and top_k), or raise Reject."""
    if arg(topk, 2, "dim", -1) not in (-1, 2):
        raise Reject("topk is not over the key axis")
    scores = _strip(topk.args[0])
    causal, offset = False, 0
    if op_of(scores) == "masked_fill" and very_negative(arg(scores, 2, "value")):
        info = classify_bool(scores.args[1], True, lookup)
        if info.key_factors or info.carried:
            raise Reject("index-score padding or general mask")
        causal, offset = info.causal, info.offset
        scores = _strip(scores.args[0])
    if causal != site.causal or (causal and offset != site.q_offset):
        raise Reject("index-score mask differs from the attention mask")
    if op_of(scores) != "sum" or arg(scores, 1, "dim") not in (2, -2):
        raise Reject("index scores are not a sum over indexer heads")
    prod = _strip(scores.args[0])
    if op_of(prod) != "mul":
        raise Reject("index scores are not weighted by w")
    a, b = prod.args[:2]
    relu, w = (a, b) if op_of(_strip(a)) == "relu" else (b, a)
    relu = _strip(relu)
    if op_of(relu) != "relu" or not isinstance(w, Node):
        raise Reject("index scores have no ReLU")
    if op_of(w) in ("getitem", "unsqueeze") and val(w) is not None and val(w).dim() == 4:
        w = w.args[0]
    dots = _strip(relu.args[0])
    if op_of(dots) != "einsum" or dots.args[0].replace(" ", "") != "bshd,btd->bsht":
        raise Reject("index dot products are not einsum('bshd,btd->bsht')")
    q_idx, k_idx = dots.args[1:3]
    if site.key_factors or site.masks:  # the model's own index scores see no such mask
        raise Reject("DSA-reference attention with a key-padding or general mask as well")
    site.kind = "dsa_reference"
    site.reference = ReferenceIndex(q_idx, k_idx, w, topk.args[1])


def rewrite_reference_site(gm: fx.GraphModule, site: AttentionSite) -> None:
    """indexer_topk(model's q_I, k_I, w) -> sparse_attention, in the output's layout
    (the operands' layout transforms and the output's permute / squeeze / cast applied
    as :func:`~dsa_compile.passes.rewrite.rewrite_site` applies them)."""
    from dsa_compile.passes.rewrite import finish_output, operand

    g = gm.graph
    ref = site.reference
    with g.inserting_before(site.output):
        q, k, v = (operand(g, o) for o in (site.q, site.k, site.v))
        topk, sparse = torch.ops.dsa.indexer_topk.default, torch.ops.dsa.sparse_attention.default
        idx = g.call_function(topk, call_args(
            topk, q_idx=ref.q_idx, k_idx=ref.k_idx, w=ref.w, top_k=ref.top_k,
            q_offset=site.q_offset, causal=site.causal))
        idx = g.call_method("unsqueeze", (idx, 1))
        res = g.call_function(sparse, call_args(
            sparse, q=q, k=k, v=v, indices=idx, scale=float(site.scale),
            softcap=float(site.softcap)))
        out = finish_output(g, site, g.call_function(operator.getitem, (res, 0)))
    site.output.replace_all_uses_with(out)
    for n in reversed(list(g.nodes)):
        if n in site.nodes and not n.users:
            g.erase_node(n)
    site.rewritten = True
