"""Stage 1: find every dense attention in an FX graph and normalise it to a site.

Three anchors cover all supported forms:

- an SDPA call (``F.scaled_dot_product_attention`` with any flags), and
- a ``softmax`` over the last axis, walked backwards through casts, masks
  (add / masked_fill / where), scales (mul / div), an optional tanh soft-cap, down to
  ``matmul`` / ``bmm`` / ``einsum`` of q and k^T, and forwards through casts and
  eval-mode dropout to the ``matmul`` / ``einsum`` with v.

- an nn.MultiheadAttention / fused nn.TransformerEncoderLayer call, which dynamo keeps
  opaque (see :mod:`dsa_compile.passes.mha`).

Then GQA repeats of k and v (repeat_kv's unsqueeze+expand+reshape, repeat_interleave)
are stripped, because the DSA op takes Hkv heads directly. networkx proves that the
nodes between the q.k^T product and the output are used only inside the site (the
score and probability matrices are not returned or reused), so removing them is safe.
What cannot be proven safe is kept as a rejected site with a reason.
"""

from __future__ import annotations

import math
import re

import networkx as nx
import torch
from torch.fx import Graph, Node

from dsa_compile.passes.dsa_reference import match_reference
from dsa_compile.passes.masks import MaskInfo, classify_additive, classify_bool
from dsa_compile.passes.normalize import arg, is_number, op_of, val, very_negative
from dsa_compile.passes.site import AttentionSite, Operand, Reject

_PASS = ("cast", "identity")


def module_path(node: Node) -> str:
    """'L['self'].model.layers[0].self_attn' -> 'model.layers.0.self_attn'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_path(path)


_ROOT = re.compile(r"^(L|G)\[[^\]]*\](\[\d+\])?")


def normalize_path(path: str) -> str:
    """Normalise a dynamo source / module path to a dotted FQN relative to the root."""
    path = _ROOT.sub("", path)
    path = re.sub(r"\._(modules|parameters|buffers)\['([^']*)'\]", r".\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".")


def to_networkx(graph: Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for u in n.users:
            g.add_edge(n, u)
    return g


def _shape(node) -> tuple:
    v = val(node)
    if v is None:
        raise Reject(f"no shape information on '{getattr(node, 'name', node)}'")
    return tuple(v.shape)


def _static(x, what: str) -> int:
    if isinstance(x, int):
        return x
    try:
        return int(x)
    except Exception as e:
        raise Reject(f"{what} is not static") from e


def _canonical_shape(o: Operand) -> tuple:
    s = _shape(o.node)
    if o.unsqueeze0:
        s = (1, *s)
    if o.perm is not None:
        s = tuple(s[p] for p in o.perm)
    return s


def finish(site: AttentionSite) -> None:
    """Strip GQA repeats and fill in head counts; checks canonical shapes."""
    site.k = _strip_repeat(site.k)
    site.v = _strip_repeat(site.v)
    qs, ks, vs = (_canonical_shape(o) for o in (site.q, site.k, site.v))
    if not (len(qs) == len(ks) == len(vs) == 4):
        raise Reject(f"q/k/v are not 4-D after normalisation ({qs}, {ks}, {vs})")
    hq, hkv = _static(qs[1], "query head count"), _static(ks[1], "key head count")
    if hkv != _static(vs[1], "value head count") or hq % hkv:
        raise Reject(f"head counts do not group: Hq={hq}, Hk={hkv}, Hv={vs[1]}")
    site.num_q_heads, site.num_kv_heads = hq, hkv
    site.head_dim = _static(qs[3], "head dim")
    site.lk = ks[2]
    if qs[0] != ks[0] and ks[0] != 1:
        raise Reject("q and k batch sizes differ")


def _strip_repeat(o: Operand) -> Operand:
    """k/v repeated for GQA -> the un-repeated tensor (query head h uses kv head h // n)."""
    if o.perm is not None or o.unsqueeze0:
        return o
    n = o.node
    op = op_of(n)
    if op == "repeat_interleave" and arg(n, 2, "dim") in (1, -3) and val(n) is not None \
            and val(n).dim() == 4 and is_number(arg(n, 1, "repeats")):
        return Operand(n.args[0])
    if op == "reshape":
        src = n.args[0]
        if isinstance(src, Node) and op_of(src) == "expand":
            base = src.args[0]
            if isinstance(base, Node) and val(base) is not None and val(base).dim() == 5:
                bs = _shape(base)
                if bs[2] == 1 and op_of(base) in ("getitem", "unsqueeze"):
                    orig = base.args[0]
                    if val(orig) is not None and val(orig).dim() == 4:
                        return Operand(orig)
    return o


def _scalar(x, what: str) -> float:
    if is_number(x):
        return float(x)
    raise Reject(f"{what} is a tensor, not a constant")


def match_sdpa(site: AttentionSite, node: Node, lookup) -> None:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    if not (is_number(dropout) and dropout == 0):
        raise Reject(f"dropout_p={dropout} (training-mode dropout)")
    if not isinstance(causal, bool):
        raise Reject("is_causal is not a constant")
    if any(val(t) is None or val(t).dim() != 4 for t in (q, k, v)):
        raise Reject("SDPA operands are not 4-D")
    site.q, site.k, site.v = Operand(q), Operand(k), Operand(v)
    site.scale = 1.0 / math.sqrt(_shape(q)[-1]) if scale is None else _scalar(scale, "scale")
    site.causal, site.q_offset = causal, 0      # SDPA's is_causal is top-left aligned
    if mask is not None:
        mv = val(mask)
        info = classify_bool(mask, False, lookup) if mv is not None and mv.dtype == torch.bool \
            else classify_additive(mask, lookup)
        _apply_mask(site, info)
    site.nodes = {node}


def _apply_mask(site: AttentionSite, info: MaskInfo) -> None:
    if info.causal:
        if site.causal and site.q_offset != info.offset:
            raise Reject("conflicting causal offsets")
        site.causal, site.q_offset = True, info.offset
    site.key_factors += info.key_factors
    site.masks += info.carried


def match_softmax(site: AttentionSite, sm: Node, lookup, g: nx.DiGraph) -> bool:
    """Returns False when the softmax is not attention-shaped at all (no report row)."""
    x = sm.args[0]
    dim = arg(sm, 1, "dim")
    xv = val(x)
    if xv is None or dim not in (-1, xv.dim() - 1) or xv.dim() not in (3, 4):
        return False
    # Backwards: scores expression down to the q.k^T product.
    scale, softcap, masks, chain = 1.0, 0.0, MaskInfo(), [sm]
    qk = None
    while qk is None:
        op = op_of(x) if isinstance(x, Node) else None
        if op is None:
            return False
        chain.append(x)
        a = x.args
        if op in _PASS:
            x = a[0]
        elif op == "mul" and _softcap_of(x) is not None:
            if scale != 1.0:
                raise Reject("scale applied after the soft-cap")
            softcap, tanh = _softcap_of(x)
            chain += [tanh, tanh.args[0]]
            x = tanh.args[0].args[0]
        elif op in ("mul", "div") and (is_number(a[1]) or is_number(a[0])):
            c, t = (a[1], a[0]) if is_number(a[1]) else (a[0], a[1])
            if op == "div" and not is_number(a[1]):
                raise Reject("scores divided into a constant")
            scale *= (1.0 / c) if op == "div" else c
            x = t
        elif op == "add":
            dep = [isinstance(t, Node) and _depends_on_matmul(t) for t in a[:2]]
            if dep == [True, False]:
                masks = masks.merge(classify_additive(a[1], lookup))
                x = a[0]
            elif dep == [False, True]:
                masks = masks.merge(classify_additive(a[0], lookup))
                x = a[1]
            else:
                masks, x = _split_two_sided_add(x, masks, lookup)
        elif op == "masked_fill" and very_negative(arg(x, 2, "value")):
            masks = masks.merge(classify_bool(a[1], True, lookup))
            x = a[0]
        elif op == "where" and very_negative(a[2]) and isinstance(a[1], Node):
            masks = masks.merge(classify_bool(a[0], False, lookup))
            x = a[1]
        elif op == "where" and very_negative(a[1]) and isinstance(a[2], Node):
            masks = masks.merge(classify_bool(a[0], True, lookup))
            x = a[2]
        elif op in ("matmul", "einsum"):
            qk = x
        else:
            if not _depends_on_matmul(x):
                return False
            raise Reject(f"unknown op '{op}' between q.k^T and softmax")
    q, k, extra_scale = _parse_qk(qk)
    scale *= extra_scale
    # Forwards: probabilities -> (cast, eval dropout) -> matmul with v.
    p = sm
    while True:
        if len(p.users) != 1:
            raise Reject("attention probabilities are used elsewhere (e.g. returned)")
        u = next(iter(p.users))
        op = op_of(u)
        if op in _PASS and u.args[0] is p:
            p = u
        elif op == "dropout":
            training = arg(u, 2, "training", True)
            if training is not False and arg(u, 1, "p", 0.5) != 0:
                raise Reject("training-mode dropout on attention probabilities")
            p = u
        elif op in ("matmul", "einsum"):
            break
        else:
            raise Reject(f"attention probabilities flow into '{op}', not a matmul with v")
    pv = u
    v, out_perm = _parse_pv(pv, p)
    site.output, site.q, site.k, site.v = pv, q, k, v
    site.out_perm, site.scale, site.softcap = out_perm, scale, softcap
    site.squeeze0 = q.unsqueeze0
    if site.squeeze0 and (masks.key_factors or masks.carried):
        raise Reject("key padding or general mask on a 3-D (bmm) attention")
    _apply_mask(site, masks)
    _prove_region(site, qk, pv, g)
    if masks.topk is not None:
        match_reference(site, masks.topk, lookup)
    return True


def _split_two_sided_add(x: Node, masks: MaskInfo, lookup):
    """Both sides reach a matmul (e.g. a top-k mask built from index scores): the side
    that classifies as a mask is the mask."""
    for mask_side, score_side in ((1, 0), (0, 1)):
        try:
            return masks.merge(classify_additive(x.args[mask_side], lookup)), x.args[score_side]
        except Reject:
            continue
    raise Reject(f"'{x.name}' adds two score-like tensors")


def _softcap_of(node: Node):
    """c * tanh(x / c) -> (c, the tanh node)."""
    a = node.args
    for c, t in ((a[0], a[1]), (a[1], a[0])):
        if is_number(c) and isinstance(t, Node) and op_of(t) == "tanh":
            inner = t.args[0]
            if isinstance(inner, Node) and op_of(inner) == "div" and inner.args[1] == c:
                return float(c), t
    return None


def _depends_on_matmul(node: Node) -> bool:
    """Whether a score-side value comes from a matmul/einsum (cheap bounded walk)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or len(seen) > 64:
            continue
        seen.add(n)
        if op_of(n) in ("matmul", "einsum"):
            return True
        stack += [a for a in n.all_input_nodes]
    return False


def _strip_scale(x):
    """q * c, q / c (possibly nested) -> (q, c)."""
    scale = 1.0
    while isinstance(x, Node) and op_of(x) in ("mul", "div") and is_number(x.args[1]) and \
            len(x.users) == 1:
        scale *= x.args[1] if op_of(x) == "mul" else 1.0 / x.args[1]
        x = x.args[0]
    return x, scale


def _parse_qk(qk: Node):
    """q.k^T product -> (q operand, k operand, scale folded into q or k)."""
    if op_of(qk) == "einsum":
        return _parse_einsum_qk(qk)
    a, b = qk.args[:2]
    a, sa = _strip_scale(a)
    if val(a) is None or val(b) is None or val(a).dim() != val(b).dim():
        raise Reject("q and k^T have different ranks")
    nd = val(a).dim()
    if nd not in (3, 4):
        raise Reject(f"{nd}-D q.k^T product")
    three = nd == 3
    if isinstance(b, Node) and op_of(b) == "transpose" and \
            {d % nd for d in b.args[1:3]} == {nd - 1, nd - 2} and len(b.users) == 1:
        kt, sb = _strip_scale(b.args[0])
        k = Operand(kt, unsqueeze0=three)
    elif isinstance(b, Node) and op_of(b) == "permute" and len(b.users) == 1:
        perm = tuple(b.args[1]) if isinstance(b.args[1], (tuple, list)) else tuple(b.args[1:])
        kperm = list(perm)
        kperm[-1], kperm[-2] = kperm[-2], kperm[-1]
        kt, sb = b.args[0], 1.0
        if three:
            raise Reject("permuted 3-D key")
        k = Operand(kt, perm=tuple(kperm))
    else:
        sb = 1.0
        k = Operand(b, perm=(0, 1, 3, 2)) if not three else None
        if k is None:
            raise Reject("3-D key not given as a transpose")
    return Operand(a, unsqueeze0=three), k, sa * sb


def _einsum_parts(node: Node):
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or "->" not in eq or len(ops) != 2:
        raise Reject("unsupported einsum")
    lhs, out = eq.replace(" ", "").split("->")
    x, y = lhs.split(",")
    if "." in eq:
        raise Reject("einsum with ellipsis")
    return x, y, out, ops


def _perm(src: str, dst: str) -> tuple | None:
    if sorted(src) != sorted(dst):
        raise Reject(f"einsum operand '{src}' cannot be permuted to '{dst}'")
    p = tuple(src.index(c) for c in dst)
    return None if p == tuple(range(len(p))) else p


def _parse_einsum_qk(node: Node):
    x, y, out, (a, b) = _einsum_parts(node)
    if len(out) != 4:
        raise Reject("einsum scores are not 4-D")
    bh, lq, lk = out[:2], out[2], out[3]
    d = set(x) & set(y) - set(out)
    if len(d) != 1 or lq not in x or lk not in y:
        raise Reject("einsum is not a q.k^T product")
    (dl,) = d
    a, sa = _strip_scale(a)
    return (Operand(a, perm=_perm(x, bh + lq + dl)),
            Operand(b, perm=_perm(y, bh + lk + dl)), sa)


def _parse_pv(pv: Node, p: Node):
    if op_of(pv) == "einsum":
        x, y, out, (a, b) = _einsum_parts(pv)
        if a is not p or len(x) != 4:
            raise Reject("probabilities are not the first einsum operand")
        bh, lq, lk = x[:2], x[2], x[3]
        dv = (set(y) - set(x)).pop() if len(set(y) - set(x)) == 1 else None
        if dv is None:
            raise Reject("einsum with v has no value axis")
        canon = bh + lq + dv
        return Operand(b, perm=_perm(y, bh + lk + dv)), _perm(canon, out)
    if pv.args[0] is not p:
        raise Reject("probabilities are the right operand of the matmul")
    v = pv.args[1]
    three = val(v) is not None and val(v).dim() == 3
    return Operand(v, unsqueeze0=three), None


def _prove_region(site: AttentionSite, qk: Node, pv: Node, g: nx.DiGraph) -> None:
    """The nodes strictly between q.k^T and the output must have no outside users."""
    region = (nx.descendants(g, qk) | {qk}) & (nx.ancestors(g, pv))
    for n in region:
        outside = [u for u in n.users if u not in region and u is not pv]
        if outside:
            raise Reject(f"score tensor '{n.name}' is also used by '{outside[0].name}'")
    site.nodes = region | {pv}
