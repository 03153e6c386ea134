"""Stage 2: replace each accepted attention site by ``torch.ops.dsa.attention``.

    q, k  --call_module(indexer)-->  q_idx, k_idx, w
    dsa.attention(q, k, v, q_idx, k_idx, w, top_k, scale, causal, q_offset,
                  key_mask, softcap, dense_below, mask, bias)  -> the dense output's layout

(built by argument name from the op's schema: :mod:`dsa_compile.ops.spec`)

The indexer comes from :data:`dsa_compile.indexer.REGISTRY`, anchored on the real
parameter tensors of the site's module, so every compile of the same model (a
recompile for a new shape, a calibrated model) finds the same indexer. The key-padding
mask is computed in the graph from the model's own mask tensor, so it follows the
inputs at run time. No Python branching on lengths is emitted: sizes flow into the op.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
from collections import Counter

import torch
from torch import fx
from torch.fx import Node

from dsa_compile.config import DSAConfig
from dsa_compile.indexer import REGISTRY, site_anchors
from dsa_compile.ops.spec import call_args
from dsa_compile.passes.normalize import val
from dsa_compile.passes.site import AttentionSite, Operand

COUNTERS: Counter = Counter()
"""Rewrites per kind ('sdpa', 'softmax', 'mha', 'encoder_layer', 'dsa_reference') and
'rejected', like Inductor's."""


@dataclasses.dataclass
class SiteRecord:
    """One row of the report: what happened to one attention site."""

    name: str
    kind: str
    rewritten: bool
    reason: str = ""
    num_q_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    causal: bool = False
    key_mask: bool = False
    index_cache: str = ""   # "static" / "dynamic" (+ " fp8"): index keys read from the cache
    key_rows: str = ""      # key rows the indexer projects per call when cached


def selected(name: str, config: DSAConfig) -> str:
    """'' when the config converts site ``name``, else the reason it does not."""
    if config.sites is not None and not any(fnmatch.fnmatch(name, p) for p in config.sites):
        return "not in config.sites"
    if any(fnmatch.fnmatch(name, p) for p in config.exclude):
        return "excluded by config.exclude"
    return ""


def operand(g: fx.Graph, o: Operand) -> Node:
    """The operand in canonical [B, H, L, D] layout (its unsqueeze / permute emitted)."""
    n = o.node
    if o.unsqueeze0:
        n = g.call_method("unsqueeze", (n, 0))
    if o.perm is not None:
        n = g.call_method("permute", (n, *o.perm))
    return n


def _key_mask(g: fx.Graph, site: AttentionSite, q: Node, k: Node) -> Node | None:
    if not site.key_factors:
        return None
    batch = g.call_method("size", (q, 0))
    keys = g.call_method("size", (k, 2))
    mask = None
    for f in site.key_factors:
        nd = val(f.node).dim()
        m = f.node
        if f.batch_key:
            m = g.call_method("expand", (m, batch, keys))
        else:
            if nd < 4:
                m = g.call_function(operator.getitem,
                                    (m, (None,) * (4 - nd) + (slice(None),) * nd))
            m = g.call_method("expand", (m, batch, 1, 1, keys))
            m = g.call_function(operator.getitem, (m, (slice(None), 0, 0, slice(None))))
        if val(f.node).dtype != torch.bool:
            m = g.call_function(operator.ne, (m, 0))
        if f.negate:
            m = g.call_function(torch.logical_not, (m,))
        mask = m if mask is None else g.call_function(torch.logical_and, (mask, m))
    return g.call_method("contiguous", (mask,))


def _general_masks(g: fx.Graph, site: AttentionSite, q: Node, k: Node):
    """(bool keep-mask, additive bias) nodes [B or 1, Lq, Lk] from the site's carried
    masks (None where there are none); each mask is brought to [B or 1, 1, Lq, Lk] and
    its head axis dropped."""
    if not site.masks:
        return None, None
    lq, lk = g.call_method("size", (q, 2)), g.call_method("size", (k, 2))
    keep = bias = None
    for m in site.masks:
        x = m.node
        if val(x).dim() == 2:
            x = g.call_function(operator.getitem, (x, (None, None)))
        batch = g.call_method("size", (x, 0))
        x = g.call_method("expand", (x, batch, 1, lq, lk))
        x = g.call_function(operator.getitem, (x, (slice(None), 0)))
        if m.additive:
            bias = x if bias is None else g.call_function(operator.add, (bias, x))
            continue
        if val(m.node).dtype != torch.bool:
            x = g.call_function(operator.ne, (x, 0))
        if m.negate:
            x = g.call_function(torch.logical_not, (x,))
        keep = x if keep is None else g.call_function(torch.logical_and, (keep, x))
    return keep, bias


def emit_attention(gm: fx.GraphModule, site: AttentionSite, q: Node, k: Node, v: Node,
                   index: int, config: DSAConfig, params: dict[str, torch.Tensor],
                   device: torch.device) -> Node:
    """Indexer + ``dsa.attention`` on canonical q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
    v [B, Hkv, Lk, Dv] nodes, at the graph's insertion point; returns [B, Hq, Lq, Dv]."""
    g = gm.graph
    fqns, tensors = site_anchors(params, site.name)
    indexer = REGISTRY.get_or_create(site.name, fqns, tensors, site.num_q_heads,
                                     site.num_kv_heads, site.head_dim, config, device)
    sub = f"dsa_indexer_{index}"
    gm.add_submodule(sub, indexer)
    idx = g.call_module(sub, (q, k))
    q_idx, k_idx, w = (g.call_function(operator.getitem, (idx, i)) for i in range(3))
    key_mask = _key_mask(g, site, q, k)
    mask, bias = _general_masks(g, site, q, k)
    softcap = config.softcap or site.softcap
    op = torch.ops.dsa.attention.default
    return g.call_function(op, call_args(
        op, q=q, k=k, v=v, q_idx=q_idx, k_idx=k_idx, w=w, top_k=config.top_k,
        scale=float(site.scale), causal=bool(site.causal), q_offset=site.q_offset,
        key_mask=key_mask, softcap=float(softcap), dense_below=config.dense_below,
        mask=mask, bias=bias))


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, index: int, config: DSAConfig,
                 params: dict[str, torch.Tensor]) -> None:
    """Replace one accepted site in ``gm`` (see module doc)."""
    g = gm.graph
    with g.inserting_before(site.output):
        q, k, v = (operand(g, o) for o in (site.q, site.k, site.v))
        out = emit_attention(gm, site, q, k, v, index, config, params, val(site.q.node).device)
        out = finish_output(g, site, out)
    site.output.replace_all_uses_with(out)
    for n in reversed(list(g.nodes)):
        if n in site.nodes and not n.users:
            g.erase_node(n)
    site.rewritten = True


def finish_output(g: fx.Graph, site: AttentionSite, out: Node) -> Node:
    """Canonical [B, Hq, Lq, Dv] output -> the replaced node's layout and dtype."""
    out_dtype = val(site.output).dtype
    if site.squeeze0:
        out = g.call_method("squeeze", (out, 0))
    if site.out_perm is not None:
        out = g.call_method("permute", (out, *site.out_perm))
    if val(site.q.node).dtype != out_dtype:
        out = g.call_method("to", (out, out_dtype))
    return out


def record(site: AttentionSite) -> SiteRecord:
    return SiteRecord(site.name, site.kind, site.rewritten, site.reason, site.num_q_heads,
                      site.num_kv_heads, site.head_dim, site.causal, bool(site.key_factors))
