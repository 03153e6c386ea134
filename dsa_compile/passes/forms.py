"""The attention forms the passes rewrite: one class per form, one registry list.

A form names the anchor ops it starts from (``op_of`` names), matches a site from one
anchor node -- filling the canonical :class:`~dsa_compile.passes.site.AttentionSite` or
raising :class:`~dsa_compile.passes.site.Reject` with the reason it stays dense -- and
rewrites an accepted site into DSA ops. A form may hand a site to another: the softmax
form recognises a model already written with DSA's reference top-k and gives the site
the ``dsa_reference`` kind, which the reference form rewrites. Adding a form is one
class here and one line in :data:`FORMS`.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx
from torch.fx import Graph, Node

from dsa_compile.config import DSAConfig
from dsa_compile.passes import detect, dsa_reference, mha, rewrite
from dsa_compile.passes.normalize import op_of
from dsa_compile.passes.site import AttentionSite, Reject


class Form:
    """One attention form. ``anchors``: the ops a match starts from; ``kinds``: the site
    kinds it rewrites (the first is what a match from its anchors produces)."""

    anchors: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    def match(self, site: AttentionSite, node: Node, lookup, graph: nx.DiGraph) -> bool:
        """Fill ``site`` from the anchor ``node``; False when the node is not an
        attention at all (no site), Reject when it is one that must stay dense."""
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, site: AttentionSite, index: int,
                config: DSAConfig, params: dict[str, torch.Tensor]) -> None:
        """Replace the accepted ``site`` in ``gm``; ``index`` names its indexer module."""
        raise NotImplementedError


class SDPAForm(Form):
    """``F.scaled_dot_product_attention`` with any flags (mask, causal, scale, GQA)."""

    anchors = kinds = ("sdpa",)

    def match(self, site, node, lookup, graph):
        detect.match_sdpa(site, node, lookup)
        detect.finish(site)
        return True

    def rewrite(self, gm, site, index, config, params):
        rewrite.rewrite_site(gm, site, index, config, params)


class SoftmaxForm(Form):
    """Hand-written ``softmax(q k^T * scale + mask) v`` (matmul / bmm / einsum)."""

    anchors = kinds = ("softmax",)

    def match(self, site, node, lookup, graph):
        if not detect.match_softmax(site, node, lookup, graph):
            return False
        detect.finish(site)
        return True

    def rewrite(self, gm, site, index, config, params):
        rewrite.rewrite_site(gm, site, index, config, params)


class ReferenceForm(Form):
    """A model already written with DSA's reference top-k mask: lowered with the model's
    own index projections (matched by the softmax form)."""

    kinds = ("dsa_reference",)

    def rewrite(self, gm, site, index, config, params):
        dsa_reference.rewrite_reference_site(gm, site)


class MHAForm(Form):
    """``nn.MultiheadAttention`` and the fused ``nn.TransformerEncoderLayer`` call."""

    anchors = kinds = ("mha", "encoder_layer")

    def match(self, site, node, lookup, graph):
        mha.match(site, node, lookup)
        return True

    def rewrite(self, gm, site, index, config, params):
        mha.rewrite_mha_site(gm, site, index, config, params)


FORMS: tuple[Form, ...] = (SDPAForm(), SoftmaxForm(), ReferenceForm(), MHAForm())
"""Every form, in the order their anchors are tried on a node."""

_BY_ANCHOR = {a: f for f in FORMS for a in f.anchors}
_BY_KIND = {k: f for f in FORMS for k in f.kinds}


def form_of(kind: str) -> Form:
    """The form that rewrites sites of ``kind``."""
    return _BY_KIND[kind]


def find_sites(graph: Graph, lookup=lambda n: None) -> list[AttentionSite]:
    """Every attention site of ``graph``, accepted (reason == '') or rejected."""
    g = detect.to_networkx(graph)
    sites = []
    for node in graph.nodes:
        op = op_of(node)
        form = _BY_ANCHOR.get(op)
        if form is None:
            continue
        site = AttentionSite(name=detect.module_path(node), kind=op, output=node)
        try:
            if not form.match(site, node, lookup, g):
                continue
        except Reject as e:
            site.reason = str(e)
        sites.append(site)
    return sites
