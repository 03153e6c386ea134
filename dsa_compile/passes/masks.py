"""Proving what a mask is: causal (with an offset), key padding, or neither.

A boolean keep-mask is split into AND-factors (De Morgan through ``|`` under a
negation, as ``masked_fill`` drop-masks need). Each factor is then proven to be one of:

- key padding, *by shape*: broadcast along the query and head axes, so it is a
  function of (batch, key) only; the DSA op takes it as ``key_mask [B, Lk]``;
- positional, *by abstract interpretation*: built from ``arange`` and comparisons,
  ``tril`` / ``triu`` of ones (or a triangular buffer of the model), it evaluates to
  the half-plane ``k <= q + o``, i.e. causal with query offset ``o``; a constant-True
  factor is dropped.

Additive masks (0 = keep, -inf = masked) are proven the same way, plus the forms
nn.MultiheadAttention / nn.Transformer build: ``triu(full(-inf), 1)``
(``generate_square_subsequent_mask``), ``zeros_like(m).masked_fill_(m, -inf)``
(``F._canonical_mask``), and views that add unit axes or lay a ``[B, S]``
``key_padding_mask`` out as ``[B, 1, 1, S]`` (``merge_masks``).

Content is read only from the model's own parameters and buffers: a model input can
hold another mask on the next call, so an input mask is never proven by its value.

A factor that is a mask but none of these (a sliding window, a mask built from
``cache_position`` or handed in by the caller) is *carried*: the rewrite passes its
value to the DSA op, which applies it exactly, so proving is only needed for the fast
structural paths. Carried are bool factors of any provenance and float terms that are
masks by construction (a model input, whose content the op applies as an additive mask
whatever it holds, or a model buffer of only 0 / very negative values). A float term
that may be a bias (ALiBi, relative position bias) raises :class:`Reject`. Proofs hold
for every input and every length, which is why they are symbolic rather than checks of
the example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dsa_compile.passes.normalize import (
    arg,
    is_number,
    is_zero_tensor,
    op_of,
    val,
    very_negative,
)
from dsa_compile.passes.site import KeyFactor, Reject

_SAME_VALUE = ("cast", "identity", "expand")


@dataclasses.dataclass
class MaskInfo:
    causal: bool = False
    offset: int = 0
    key_factors: list[KeyFactor] = dataclasses.field(default_factory=list)
    topk: Node | None = None      # DSA reference style: -inf everywhere but topk(...) keys
    carried: list[CarriedMask] = dataclasses.field(default_factory=list)

    def merge(self, other: MaskInfo) -> MaskInfo:
        if self.causal and other.causal and self.offset != other.offset:
            raise Reject("two causal masks with different offsets")
        if self.topk is not None and other.topk is not None:
            raise Reject("two top-k selection masks")
        return MaskInfo(self.causal or other.causal,
                        self.offset if self.causal else other.offset,
                        self.key_factors + other.key_factors, self.topk or other.topk,
                        self.carried + other.carried)


@dataclasses.dataclass
class CarriedMask:
    """A mask passed to the DSA op by value: bool (True = keep, or masked if ``negate``)
    or, if ``additive``, float added to the scores."""

    node: Node
    negate: bool = False
    additive: bool = False
    why: str = ""        # why no proof applies (for reports where carrying is not possible)


@dataclasses.dataclass
class _Lin:
    """Integer tensor value = sum(coef[axis] * index[axis]) + const (axes from the end)."""

    coef: dict
    const: int


@dataclasses.dataclass
class _Half:
    """Bool value ``k <= q + o`` (negated: ``k > q + o``)."""

    o: int
    negated: bool = False


_TRUE = "true"
_FALSE = "false"


def _gather(x, index: list):
    """x[i0, i1, ...] with index tensors: a position value composed with the indices."""
    if not isinstance(x, _Lin) or not all(isinstance(i, _Lin) for i in index):
        raise Reject("advanced indexing of a non-position value")
    coef, const = {}, x.const
    for ax, c in x.coef.items():
        idx = index[len(index) + ax]
        for bx, d in idx.coef.items():
            coef[bx] = coef.get(bx, 0) + c * d
        const += c * idx.const
    return _Lin({k: c for k, c in coef.items() if c}, const)


def _diff(node: Node, lookup):
    """diff(x, dim=-1, prepend=x[..., :1] - a) of positions with step a: constant a."""
    x = _pos_eval(node.args[0], lookup)
    dim = arg(node, 2, "dim", -1)
    pre = node.kwargs.get("prepend")
    if not isinstance(x, _Lin) or dim != -1 or set(x.coef) - {-1} or pre is None:
        raise Reject("diff of a non-arange value")
    step = x.coef.get(-1, 0)
    p = _pos_eval(pre, lookup)
    if not isinstance(p, _Lin) or set(p.coef) - {-1} or p.const != x.const - step:
        raise Reject("diff with an unknown prepend")
    return _Lin({}, step)


def _bool_factors(node, negate: bool, out: list) -> None:
    op = op_of(node) if isinstance(node, Node) else None
    if op in _SAME_VALUE and isinstance(node.args[0], Node):
        if op == "cast" and val(node) is not None and val(node).dtype != torch.bool:
            out.append((node, negate))
            return
        return _bool_factors(node.args[0], negate, out)
    if op == "not":
        return _bool_factors(node.args[0], not negate, out)
    if (op == "and" and not negate) or (op == "or" and negate):
        _bool_factors(node.args[0], negate, out)
        _bool_factors(node.args[1], negate, out)
        return
    out.append((node, negate))


def classify_bool(node: Node, negate: bool, lookup: Callable) -> MaskInfo:
    """MaskInfo of a bool mask node (True = keep, or True = masked when ``negate``)."""
    factors: list = []
    _bool_factors(node, negate, factors)
    info = MaskInfo()
    for f, neg in factors:
        info = info.merge(_classify_factor(f, neg, lookup))
    return info


def _classify_factor(node, negate: bool, lookup: Callable) -> MaskInfo:
    if not isinstance(node, Node):
        if isinstance(node, bool) and node != negate:
            return MaskInfo()
        raise Reject(f"constant mask factor {node!r}")
    v = val(node)
    if v is not None and v.dim() <= 4 and (v.dim() < 2 or v.shape[-2] == 1) and (
            v.dim() < 3 or v.shape[-3] == 1):
        return MaskInfo(key_factors=[KeyFactor(node, negate)])
    try:
        value = _pos_eval(node, lookup)
    except Reject as e:
        return _carry(node, negate, False, f"neither causal nor key padding ({e})")
    if value == _TRUE and not negate:
        return MaskInfo()
    if isinstance(value, _Half) and value.negated == negate:
        return MaskInfo(causal=True, offset=value.o)
    return _carry(node, negate, False, "not a causal (lower-triangular) mask")


def _carry(node: Node, negate: bool, additive: bool, why: str) -> MaskInfo:
    """Carry a mask the proofs could not place (see the module doc), if its shape is one
    pattern for all heads, ``[Lq, Lk]`` or ``[B or 1, 1, Lq, Lk]`` (axes may broadcast)."""
    v = val(node)
    shared = v is not None and (v.dim() == 2 or (v.dim() == 4 and _same(v.shape[1], 1)))
    if not shared:
        raise Reject(f"mask '{node.name}' is {why} and is not one pattern shared by all "
                     f"heads (shape {tuple(v.shape) if v is not None else '?'})")
    return MaskInfo(carried=[CarriedMask(node, negate, additive, why)])


def _int_const(x):
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    raise Reject(f"non-constant position offset {x!r}")


def _pos_eval(node, lookup: Callable):
    """Abstract value of a positional mask expression (see module doc): a constant, a
    :class:`_Lin` position, :data:`_TRUE` / :data:`_FALSE` or a causal :class:`_Half`.
    One rule per op (:data:`_POS_RULES`); anything else is rejected."""
    if not isinstance(node, Node):
        if is_number(node):
            return _Lin({}, _int_const(node))
        if isinstance(node, bool):
            return _TRUE if node else _FALSE
        raise Reject(f"unsupported constant {node!r}")
    if node.op in ("placeholder", "get_attr"):
        return _triangular_buffer(node, lookup)
    op = op_of(node)
    if op in _SAME_VALUE:
        return _pos_eval(node.args[0], lookup)
    rule = _POS_RULES.get(op)
    if rule is None:
        raise Reject(f"unsupported op {op or node.target} in positional mask")
    return rule(node, node.args, lambda x: _pos_eval(x, lookup), lookup)


def _linear_sum(x, y, sign: int) -> dict:
    """Coefficients of x + sign * y (zero terms dropped)."""
    coef = dict(x.coef)
    for ax, c in y.coef.items():
        coef[ax] = coef.get(ax, 0) + sign * c
    return {k: c for k, c in coef.items() if c}


def _pos_arange(node, a, ev, lookup):
    return _Lin({-1: 1}, _int_const(0 if len(a) < 2 else a[0]))


def _pos_ones(node, a, ev, lookup):
    return _TRUE


def _pos_full(node, a, ev, lookup):
    if arg(node, 1, "fill_value") is True:
        return _TRUE
    raise Reject("full of a value other than True in positional mask")


def _pos_add_sub(node, a, ev, lookup):
    x, y = ev(a[0]), ev(a[1])
    if not (isinstance(x, _Lin) and isinstance(y, _Lin)):
        raise Reject(f"{op_of(node)} of non-integer positions")
    sign = 1 if op_of(node) == "add" else -1
    return _Lin(_linear_sum(x, y, sign), x.const + sign * y.const)


def _pos_getitem(node, a, ev, lookup):
    if isinstance(a[1], tuple) and a[1] and all(isinstance(i, Node) for i in a[1]):
        return _gather(ev(a[0]), [ev(i) for i in a[1]])  # advanced indexing
    return _pos_reshape(node, a, ev, lookup)


def _pos_reshape(node, a, ev, lookup):
    """getitem by slices / None and unsqueeze: the same value on moved axes."""
    x = ev(a[0])
    src, dst = val(a[0]), val(node)
    if src is None or dst is None:
        raise Reject("no shape on positional index")
    if isinstance(x, (_Half, str)):
        return _slice_from_origin(node, x)
    return _Lin(_move_axes(node, x.coef, src.dim(), dst.dim()), x.const)


def _pos_diff(node, a, ev, lookup):
    return _diff(node, lookup)


def _pos_cumsum(node, a, ev, lookup):
    x = ev(a[0])
    if x == _FALSE or (isinstance(x, _Lin) and not x.coef and x.const == 0):
        return _Lin({}, 0)
    raise Reject("cumsum of a non-zero value")


def _pos_compare(node, a, ev, lookup):
    op = op_of(node)
    x, y = ev(a[0]), ev(a[1])
    if op in ("ge", "gt"):
        x, y = y, x
    if not (isinstance(x, _Lin) and isinstance(y, _Lin)):
        raise Reject("comparison of non-positions")
    coef = _linear_sum(x, y, -1)
    const = x.const - y.const + (1 if op in ("lt", "gt") else 0)
    if len(coef) == 1 and next(iter(coef.values())) == -1 and const <= 0:
        return _TRUE                 # -i + const <= 0 holds for every index i >= 0
    if coef == {-1: 1, -2: -1}:      # k - q + const <= 0  <=>  k <= q - const
        return _Half(-const)
    if coef == {-1: -1, -2: 1}:      # q - k + const <= 0  <=>  k >= q + const
        return _Half(const - 1, negated=True)
    raise Reject("comparison is not between query and key positions")


def _pos_and(node, a, ev, lookup):
    x, y = ev(a[0]), ev(a[1])
    if x == _TRUE:
        return y
    if y == _TRUE:
        return x
    raise Reject("two positional constraints (sliding window?)")


def _pos_not(node, a, ev, lookup):
    x = ev(a[0])
    if isinstance(x, _Half):
        return _Half(x.o, not x.negated)
    raise Reject("negated non-causal value")


def _pos_equal(node, a, ev, lookup):
    eq = op_of(node) == "eq"
    x = ev(a[0])
    if is_number(a[1]) or isinstance(a[1], Node):
        y = ev(a[1])
        if isinstance(x, _Lin) and isinstance(y, _Lin) and x.coef == y.coef:
            return _TRUE if (x.const == y.const) == eq else _FALSE
    if isinstance(x, _Half) and a[1] == 0:
        return _Half(x.o, x.negated != eq)
    raise Reject(f"{op_of(node)} on non-triangular value")


def _pos_triangle(node, a, ev, lookup):
    op = op_of(node)
    if ev(a[0]) != _TRUE:
        raise Reject(f"{op} of a tensor that is not all ones")
    d = _int_const(arg(node, 1, "diagonal", 0))
    # tril: True where k <= q + d; triu: True where k >= q + d, i.e. not k <= q + d - 1.
    return _Half(d) if op == "tril" else _Half(d - 1, negated=True)


_POS_RULES: dict[str, Callable] = {
    "arange": _pos_arange, "ones": _pos_ones, "full": _pos_full,
    "add": _pos_add_sub, "sub": _pos_add_sub,
    "getitem": _pos_getitem, "unsqueeze": _pos_reshape,
    "diff": _pos_diff, "cumsum": _pos_cumsum,
    "le": _pos_compare, "lt": _pos_compare, "ge": _pos_compare, "gt": _pos_compare,
    "and": _pos_and, "not": _pos_not, "eq": _pos_equal, "ne": _pos_equal,
    "tril": _pos_triangle, "triu": _pos_triangle,
}
"""How each op of a positional mask maps its arguments' abstract values to its own."""


class StateGuard:
    """Wraps a ``lookup`` (node -> real tensor) and remembers every model buffer a proof
    read, with its value: the rewrite trusts a causal buffer by its content, so a later
    in-place write to it (``model.bias.copy_(...)``) must be noticed. :meth:`changed` is
    cheap (version counters) unless a watched tensor was written to."""

    def __init__(self, lookup: Callable):
        self._lookup = lookup
        self._watched: dict[int, list] = {}

    def __call__(self, node: Node):
        t = self._lookup(node)
        if isinstance(t, torch.Tensor) and id(t) not in self._watched:
            self._watched[id(t)] = [t, t._version, t.detach().clone()]
        return t

    @property
    def watching(self) -> bool:
        return bool(self._watched)

    def changed(self) -> bool:
        """True if a watched buffer now holds another value than the proof saw."""
        for entry in self._watched.values():
            t, version, value = entry
            if t._version != version:
                if not torch.equal(t, value):
                    return True
                entry[1] = t._version
        return False


def _model_state(node: Node) -> bool:
    """A parameter or buffer of the model (get_attr, or a dynamo placeholder lifted from
    one), as opposed to a model input."""
    if node.op == "get_attr":
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else str(name)
    return "._buffers[" in name or "._parameters[" in name


def _state_tensor(node: Node, lookup: Callable) -> torch.Tensor:
    """The real value of a model buffer; a model input is never read (it may change)."""
    if node.op == "placeholder" and not _model_state(node):
        raise Reject(f"'{node.name}' is a model input of unknown content (build the mask "
                     "inside forward or keep it as a buffer)")
    t = lookup(node)
    if t is None or t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        raise Reject(f"'{node.name}' is a tensor of unknown content")
    return t


def _triangular_buffer(node: Node, lookup: Callable):
    """A buffer that is nonzero exactly on and below the diagonal (keep), or exactly above
    it (True = masked, as nn.MultiheadAttention's bool attn_mask)."""
    t = _state_tensor(node, lookup)
    n = t.shape[-1]
    tril = torch.ones(n, n, dtype=torch.bool, device=t.device).tril()
    nz = (t != 0).reshape(-1, n, n)
    if bool((nz == tril).all()):
        return _Half(0)
    if bool((nz == ~tril).all()):
        return _Half(0, negated=True)
    raise Reject(f"buffer '{node.name}' is not triangular")


def _slice_from_origin(node: Node, x):
    """Slicing a mask from index 0 along the query/key axes keeps its offset."""
    if op_of(node) != "getitem":
        return x
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    for s in idx:
        if s is Ellipsis or s is None:
            continue
        if not isinstance(s, slice) or s.start not in (None, 0) or s.step not in (None, 1):
            raise Reject("mask sliced away from its origin")
    if any(s is None for s in idx):
        raise Reject("new axes inserted into a 2-D positional mask")
    return x


def _move_axes(node: Node, coef: dict, src_dim: int, dst_dim: int) -> dict:
    """Where each source axis (counted from the end) lands after getitem/unsqueeze."""
    if op_of(node) == "unsqueeze":
        d = arg(node, 1, "dim")
        d = d if d < 0 else d - (src_dim + 1)
        return {(ax if ax > d else ax - 1) if ax <= -1 else ax: c for ax, c in coef.items()}
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(not (s is None or s is Ellipsis or (isinstance(s, slice) and s.start in (None, 0)
                                                and s.step in (None, 1))) for s in idx):
        raise Reject("positional index sliced")
    n_real = sum(1 for s in idx if s is not None and s is not Ellipsis)
    expanded: list = []
    for s in idx:
        if s is Ellipsis:
            expanded += [slice(None)] * (src_dim - n_real)
        else:
            expanded.append(s)
    expanded += [slice(None)] * (src_dim - sum(1 for s in expanded if s is not None))
    mapping, src_axis = {}, 0
    for pos, s in enumerate(expanded):
        if s is not None:
            mapping[src_axis - src_dim] = pos - len(expanded)
            src_axis += 1
    return {mapping[ax]: c for ax, c in coef.items()}


def classify_additive(node, lookup: Callable) -> MaskInfo:
    """MaskInfo of an additive mask term (0 = keep, -inf / very negative = masked)."""
    if not isinstance(node, Node):
        if is_number(node) and node == 0:
            return MaskInfo()
        raise Reject(f"additive constant {node!r} on the scores")
    op = op_of(node)
    a = node.args
    if op in _SAME_VALUE:
        return classify_additive(a[0], lookup)
    if op == "getitem" and val(a[0]) is not None and val(node) is not None and \
            tuple(val(a[0]).shape) == tuple(val(node).shape):
        return classify_additive(a[0], lookup)
    if op == "add":
        return classify_additive(a[0], lookup).merge(classify_additive(a[1], lookup))
    if op == "where":
        cond, x, y = a[0], arg(node, 1, "input"), arg(node, 2, "other")
        if is_zero_tensor(x) and very_negative(y):
            return classify_bool(cond, False, lookup)
        if very_negative(x) and is_zero_tensor(y):
            return classify_bool(cond, True, lookup)
    if op == "masked_fill" and is_zero_tensor(a[0]) and very_negative(arg(node, 2, "value")):
        return classify_bool(a[1], True, lookup)
    if op == "mul":
        x, y = a[0], a[1]
        if very_negative(x):
            x, y = y, x
        if very_negative(y) and isinstance(x, Node) and op_of(x) == "sub" and x.args[0] == 1:
            # (1 - m) * finfo.min: the HF padding form, m a 0/1 keep mask.
            return classify_bool(x.args[1], False, lookup)
    if op == "zeros":
        return MaskInfo()
    topk = _topk_scatter(node)
    if topk is not None:
        return MaskInfo(topk=topk)
    if op == "reshape" and isinstance(a[0], Node):
        src, dst = val(a[0]), val(node)
        if _adds_unit_axes(src, dst):
            return classify_additive(a[0], lookup)
        if _key_padding_view(src, dst):
            return classify_key_padding(a[0])
    if op in ("triu", "getitem") or node.op in ("placeholder", "get_attr"):
        try:
            return MaskInfo(causal=True, offset=_additive_causal(node, lookup))
        except Reject as e:
            if _input_view(node) or _zero_or_masked_buffer(node, lookup):
                return _carry(node, False, True, f"an additive mask of unknown pattern ({e})")
            raise Reject(f"additive term '{node.name}' is not provably a mask ({e})") from e
    raise Reject(f"additive term '{node.name}' ({op or node.target}) is not provably a mask "
                 "(a bias such as ALiBi stays dense)")


def _additive_causal(node, lookup: Callable) -> int:
    """Offset o of an additive causal mask: 0 where k <= q + o, very negative elsewhere."""
    if not isinstance(node, Node):
        raise Reject(f"constant {node!r}")
    op = op_of(node)
    if op in ("identity", "expand") or (op == "cast" and val(node.args[0]) is not None
                                        and val(node.args[0]).is_floating_point()):
        return _additive_causal(node.args[0], lookup)
    if op == "getitem":
        o = _additive_causal(node.args[0], lookup)
        _slice_from_origin(node, _Half(o))
        return o
    if op == "triu":
        base = node.args[0]
        if isinstance(base, Node) and op_of(base) == "full" and \
                very_negative(arg(base, 1, "fill_value")):
            # -inf where k >= q + d: keep k <= q + d - 1 (generate_square_subsequent_mask).
            return _int_const(arg(node, 1, "diagonal", 0)) - 1
        raise Reject("triu of a tensor that is not full(-inf)")
    if node.op in ("placeholder", "get_attr"):
        t = _state_tensor(node, lookup)
        n = t.shape[-1]
        tril = torch.ones(n, n, dtype=torch.bool, device=t.device).tril()
        t = t.reshape(-1, n, n)
        if bool((t[:, tril] == 0).all()) and bool((t[:, ~tril] <= -1e4).all()):
            return 0
        raise Reject(f"buffer '{node.name}' is not a causal 0 / -inf mask")
    raise Reject(f"unsupported op {op or node.target}")


def _input_view(node: Node) -> bool:
    """A model input (not a parameter or buffer), possibly sliced or cast: a mask the
    caller hands in, e.g. Hugging Face's 4-D mask for a static cache."""
    while op_of(node) in ("getitem", "cast", "identity", "expand") and \
            isinstance(node.args[0], Node):
        node = node.args[0]
    return node.op == "placeholder" and not _model_state(node)


def _zero_or_masked_buffer(node: Node, lookup: Callable) -> bool:
    """A model buffer (possibly sliced) holding only 0 and very negative values."""
    while op_of(node) in ("getitem", "cast", "identity", "expand") and \
            isinstance(node.args[0], Node):
        node = node.args[0]
    if node.op not in ("placeholder", "get_attr") or not _model_state(node):
        return False
    t = lookup(node)
    return isinstance(t, torch.Tensor) and t.is_floating_point() and \
        bool(((t == 0) | (t <= -1e4)).all())


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _adds_unit_axes(src, dst) -> bool:
    """A view that only prepends size-1 axes ([L, S] -> [1, 1, L, S])."""
    if src is None or dst is None or dst.dim() < src.dim():
        return False
    n = dst.dim() - src.dim()
    return all(_same(s, 1) for s in dst.shape[:n]) and \
        all(_same(s, t) for s, t in zip(dst.shape[n:], src.shape))


def _key_padding_view(src, dst) -> bool:
    """[B, S] -> [B, 1, 1, S], as MultiheadAttention.merge_masks lays out key padding."""
    return src is not None and dst is not None and src.dim() == 2 and dst.dim() == 4 and \
        _same(dst.shape[1], 1) and _same(dst.shape[2], 1) and \
        _same(dst.shape[0], src.shape[0]) and _same(dst.shape[3], src.shape[1])


def classify_key_padding(node) -> MaskInfo:
    """MaskInfo of an nn.MultiheadAttention ``key_padding_mask`` [B, S]: bool with True =
    padding, or the float 0 / -inf form that ``F._canonical_mask`` makes of one.

    A float mask of other provenance may hold any per-key bias, so it is rejected.
    """
    v = val(node)
    if v is None or v.dim() != 2:
        raise Reject("key_padding_mask is not a [B, S] tensor")
    if v.dtype == torch.bool:
        return MaskInfo(key_factors=[KeyFactor(node, negate=True, batch_key=True)])
    op, a = op_of(node), node.args

    def bool_2d(m):
        return val(m) is not None and val(m).dtype == torch.bool and val(m).dim() == 2

    if op in ("identity", "expand") or (op == "cast" and val(a[0]) is not None
                                        and val(a[0]).is_floating_point()):
        return classify_key_padding(a[0])
    if op == "masked_fill" and is_zero_tensor(a[0]) and very_negative(arg(node, 2, "value")) \
            and bool_2d(a[1]):
        return MaskInfo(key_factors=[KeyFactor(a[1], negate=True, batch_key=True)])
    if op == "where" and bool_2d(a[0]):
        x, y = arg(node, 1, "input"), arg(node, 2, "other")
        if very_negative(x) and is_zero_tensor(y):
            return MaskInfo(key_factors=[KeyFactor(a[0], negate=True, batch_key=True)])
        if is_zero_tensor(x) and very_negative(y):
            return MaskInfo(key_factors=[KeyFactor(a[0], negate=False, batch_key=True)])
    raise Reject(f"float key_padding_mask '{node.name}' is not provably 0 / -inf "
                 "(pass a bool mask)")


def _topk_scatter(node: Node) -> Node | None:
    """full(-inf).scatter(-1, topk(I, k, dim=-1).indices, 0) (maybe [:, None]) -> the topk."""
    if op_of(node) in ("getitem", "unsqueeze") and isinstance(node.args[0], Node):
        node = node.args[0]
    if op_of(node) != "scatter" or arg(node, 1, "dim") not in (-1, 2):
        return None
    base, index, value = node.args[0], arg(node, 2, "index"), arg(node, 3, "value")
    if not (isinstance(base, Node) and op_of(base) == "full" and very_negative(base.args[1])
            and is_number(value) and value == 0):
        return None
    if isinstance(index, Node) and op_of(index) == "getitem" and index.args[1] == 1:
        index = index.args[0]
    elif isinstance(index, Node) and index.op == "call_function" and \
            getattr(index.target, "__name__", "") == "getattr" and index.args[1] == "indices":
        index = index.args[0]
    if isinstance(index, Node) and op_of(index) == "topk":
        return index
    return None
