"""The lightning indexer of one attention site, and the registry that keeps it.

An :class:`Indexer` turns the site's own (post-projection, post-RoPE) queries and keys
into the DSA indexer inputs:

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D]
        ->  q_idx [B, Lq, H_I, d_I], k_idx [B, Lk, d_I], w [B, Lq, H_I]

    q_idx = q_cat @ wq + bq       q_cat: the Hq query heads of a token, concatenated
    k_idx = k_cat @ wk + bk       k_cat: the Hkv key heads of a token, concatenated
    w     = softplus(q_cat @ ww + bw)

Cost per (query, key) pair is H_I * d_I multiply-adds; the default keeps it at most a
quarter of the attention's Hq * D (SmolLM2: 144 of 576).

Training-free start (:meth:`Indexer.fit`, or the data-free :meth:`reset_parameters`):
the key width is split into one block per KV group plus one bias dimension. Block g
holds a rank-r factorisation of that group's logits, ``q_g . k_g ~ (q_g P_g)(k_g R_g)``
with q_g the sum of the group's query heads times the attention scale, so the index
score is (up to ReLU) the sum of all heads' attention logits. ``fit`` takes P, R from
example activations: the best rank-r approximation of the bilinear form q^T k under
the data's second moments (SVD of Cq^1/2 Ck^1/2, keys centred because a per-query
constant does not change a ranking). Without data, ``reset_parameters`` uses random
orthogonal projections. The bias dimension (k = 1, q = c >= 0) lifts the logits above
zero so ReLU does not flatten the useful part of the ranking.

Measured on SmolLM2-135M-Instruct, L = 2048, top_k = 256, Python reference manual text
(see examples/demo.py and the report in dsa_compile/calibration.py):

| indexer (cost 144 = 1/4 of QK^T per pair)         | perplexity | vs dense 11.707 |
|---------------------------------------------------|------------|-----------------|
| H_I = 3, d_I = 48, fitted (15 dims/group + bias)  | 11.946     | 1.020x          |
| H_I = 1, d_I = 144, fitted (47 dims/group + bias) | 11.988     | 1.024x          |
| H_I = 1, d_I = 144, random orthogonal, no bias    | 22.03      | 1.88x           |
| H_I = 3, d_I = 48, lowest RoPE frequencies        | 218        | (ReLU cuts)     |
| oracle top-256 by head-summed attention           | 11.785     | 1.007x          |
| sliding window of 256 keys                        | 23.26      | 1.99x           |

(2 blocks of 2048 tokens; fit on one other 2048-token block.) The default is
therefore H_I = Hkv, d_I = Hq * D / (4 * Hkv), fitted. Data-free inits are poor, so an
indexer that has never seen data fits itself on its first eager call with at least
``FIT_MIN_TOKENS`` keys (``fitted`` says whether that happened; calibration and
``load_indexers`` set it).

Indexers outlive compiled graphs: the registry maps the site's parameters (by tensor
identity) to its indexer, so every compile of the same model -- a recompile for a new
shape, a calibrated model compiled later -- finds the same indexer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.reference.dense import grouped_probs


def default_index_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(H_I, d_I) by default: one indexer head per KV group, H_I * d_I at most a quarter
    of the attention's Hq * D multiply-adds per (query, key) pair (SmolLM2: 3 x 48)."""
    budget = max(1, (num_q_heads * head_dim) // 4)
    return num_kv_heads, max(budget // num_kv_heads, num_kv_heads + 1)


def _inv_sqrt_and_sqrt(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^-1/2, C^1/2) of a symmetric PSD matrix, regularised so C^-1/2 stays finite."""
    vals, vecs = torch.linalg.eigh(cov.double())
    vals = vals.clamp_min(vals.max().clamp_min(1e-12) * 1e-6)
    return (vecs * vals.rsqrt()) @ vecs.T, (vecs * vals.sqrt()) @ vecs.T


def low_rank_bilinear(q: torch.Tensor, k: torch.Tensor,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P [D, r], R [D, r] minimising E (q^T k - (q P) . (k R))^2 over the samples.

    Args: q [N, D] query samples; k [M, D] key samples (centred here); rank r <= D.
    """
    qd, kd = q.double(), k.double()
    kd = kd - kd.mean(0)
    cq = qd.T @ qd / max(1, qd.shape[0])
    ck = kd.T @ kd / max(1, kd.shape[0])
    cq_inv, cq_half = _inv_sqrt_and_sqrt(cq)
    ck_inv, ck_half = _inv_sqrt_and_sqrt(ck)
    u, s, vh = torch.linalg.svd(cq_half @ ck_half)
    root = s[:rank].sqrt()
    p = cq_inv @ (u[:, :rank] * root)
    r = ck_inv @ (vh[:rank].T * root)
    return p.float(), r.float()


FIT_MIN_TOKENS = 256
"""Keys an unfitted indexer needs in one eager call before it fits itself on them."""


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _can_fit_on(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True for real (not fake, not traced) tensors with enough keys to fit on."""
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or isinstance(q, FakeTensor) or isinstance(k, FakeTensor):
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    return k.shape[0] * k.shape[2] >= FIT_MIN_TOKENS


class Indexer(nn.Module):
    """Lightning indexer fed from one site's queries and keys (see the module doc).

    Args:
        num_q_heads, num_kv_heads, head_dim: the site's attention shape (Hq, Hkv, D).
        index_heads, index_dim: the indexer's shape H_I x d_I (None = from
            :func:`default_index_shape`).

    Parameters: wq [Hq*D, H_I*d_I], bq [H_I*d_I], wk [Hkv*D, d_I], bk [d_I],
    ww [Hq*D, H_I], bw [H_I]. Raises ValueError when Hq is not a multiple of Hkv or
    d_I leaves no room for one dimension per KV group plus the bias dimension.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 index_heads: int | None = None, index_dim: int | None = None):
        super().__init__()
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        heads, dim = default_index_shape(num_q_heads, num_kv_heads, head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.index_heads = index_heads or heads
        self.index_dim = index_dim or dim
        if self.index_dim < num_kv_heads + 1:
            raise ValueError(f"index_dim must be at least num_kv_heads + 1 = {num_kv_heads + 1} "
                             f"(one dim per KV group and a bias dim), got {self.index_dim}")
        hq_d, hkv_d = num_q_heads * head_dim, num_kv_heads * head_dim
        width = self.index_heads * self.index_dim
        self.wq = nn.Parameter(torch.empty(hq_d, width))
        self.bq = nn.Parameter(torch.zeros(width))
        self.wk = nn.Parameter(torch.empty(hkv_d, self.index_dim))
        self.bk = nn.Parameter(torch.zeros(self.index_dim))
        self.ww = nn.Parameter(torch.zeros(hq_d, self.index_heads))
        self.bw = nn.Parameter(torch.zeros(self.index_heads))
        self.fitted = False
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """Dimensions of the key width given to each KV group (the last one is the bias)."""
        return min(self.head_dim, (self.index_dim - 1) // self.num_kv_heads)

    def _head_of_group(self, group: int) -> int:
        return group % self.index_heads

    @torch.no_grad()
    def _set_projections(self, projections: list[tuple[torch.Tensor, torch.Tensor]],
                         bias: torch.Tensor) -> None:
        """Place group g's (P_g [D, r], R_g [D, r]) in its block; ``bias`` [H_I] is c_j."""
        d, r, di = self.head_dim, self.rank, self.index_dim
        group_size = self.num_q_heads // self.num_kv_heads
        scale = d ** -0.5
        for t in (self.wq, self.bq, self.wk, self.bk, self.ww):
            t.zero_()
        self.bw.fill_(math.log(math.e - 1))  # softplus^-1(1): w = 1
        for g, (p, rk) in enumerate(projections):
            j = self._head_of_group(g)
            cols = slice(j * di + g * r, j * di + (g + 1) * r)
            for h in range(g * group_size, (g + 1) * group_size):
                self.wq[h * d : (h + 1) * d, cols] = p.to(self.wq) * scale
            self.wk[g * d : (g + 1) * d, g * r : (g + 1) * r] = rk.to(self.wk)
        self.bk[di - 1] = 1.0
        for j in range(self.index_heads):
            self.bq[j * di + di - 1] = bias[j]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Data-free start: random orthogonal projections of each KV group, no bias."""
        gen = torch.Generator().manual_seed(0)
        d, r = self.head_dim, self.rank
        projections = []
        for _ in range(self.num_kv_heads):
            basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
            p = basis[:, :r] * math.sqrt(d / r)
            projections.append((p, p))
        self._set_projections(projections, torch.zeros(self.index_heads))

    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: torch.Tensor, max_samples: int = 8192) -> Indexer:
        """Training-free fit from example activations of this site.

        Args:
            q: [B, Hq, Lq, D] and k: [B, Hkv, Lk, D], the site's post-RoPE inputs.
            max_samples: tokens used per group (evenly strided).

        Returns self. Sets each group's rank-r factorisation (``low_rank_bilinear``) and
        the bias c_j = 2 * the std of the head's centred scores, so that ReLU rarely cuts.
        Raises ValueError when q or k hold NaN / inf (a NaN indexer would select nothing),
        or when the fit itself comes out non-finite; the weights are then left as they were.
        """
        self._check_inputs(q, k)
        for name, t in (("q", q), ("k", k)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"Indexer.fit{self._where()}: the site's {name} {tuple(t.shape)} holds NaN "
                    f"or inf values, so no indexer can be fitted on it; check the model's "
                    f"weights and inputs (a NaN weight propagates into every later layer)")
        before = {n: p.detach().clone() for n, p in self.named_parameters()}
        d = self.head_dim
        group_size = self.num_q_heads // self.num_kv_heads
        qs = q.detach().float().reshape(q.shape[0], self.num_kv_heads, group_size, q.shape[2], d)
        q_sum = qs.sum(2).permute(1, 0, 2, 3).reshape(self.num_kv_heads, -1, d)
        k_all = k.detach().float().permute(1, 0, 2, 3).reshape(self.num_kv_heads, -1, d)
        step_q = max(1, q_sum.shape[1] // max_samples)
        step_k = max(1, k_all.shape[1] // max_samples)
        projections = [low_rank_bilinear(q_sum[g, ::step_q], k_all[g, ::step_k], self.rank)
                       for g in range(self.num_kv_heads)]
        self._set_projections(projections, torch.zeros(self.index_heads))
        q_idx, k_idx, _ = self._project(q[:, :, ::max(1, q.shape[2] // 256)],
                                       k[:, :, ::max(1, k.shape[2] // 256)])
        dots = torch.einsum("bqhd,bkd->bhqk", q_idx.float(), k_idx.float())
        dots = dots - dots.mean(-1, keepdim=True)
        bias = 2.0 * dots.transpose(0, 1).reshape(self.index_heads, -1).std(-1)
        self.bq.view(self.index_heads, self.index_dim)[:, -1] = bias.to(self.bq)
        self.bw.fill_(_softplus_inverse(self._fit_temperature(q, k)))
        bad = non_finite_parameters(self)
        if bad:
            for n, p in self.named_parameters():
                p.copy_(before[n])
            raise ValueError(
                f"Indexer.fit{self._where()}: the fit gave non-finite weights {bad} (activations "
                f"too large for float32?); the previous weights were kept")
        self.fitted = True
        return self

    def _where(self) -> str:
        name = getattr(self, "site_name", None)
        return f" (site {name!r})" if name is not None else ""

    @torch.no_grad()
    def _fit_temperature(self, q: torch.Tensor, k: torch.Tensor, rows: int = 64) -> float:
        """The w (same for all heads) whose softmax(index scores) is closest in KL to the
        head-summed dense attention: scaling w keeps the ranking, so this is free, and it
        gives calibration a sensible start."""
        b, hq, lq, d = q.shape
        lk = k.shape[2]
        pos = torch.linspace(lq // 2, lq - 1, min(rows, lq - lq // 2), device=q.device).long()
        qr = q[:, :, pos].float()
        off = lk - lq
        visible = torch.arange(lk, device=q.device)[None, :] <= (pos + off)[:, None]
        target = grouped_probs(qr, k, d ** -0.5, visible).sum((1, 2)) / hq
        q_idx, k_idx, _ = self._project(qr, k.float())
        scores = torch.relu(torch.einsum("bqhd,bkd->bqhk", q_idx, k_idx)).sum(2)
        best, best_kl = 1.0, float("inf")
        for tau in torch.logspace(-3, 1, 41).tolist():
            log_q = torch.log_softmax((scores * tau).masked_fill(~visible, float("-inf")), -1)
            log_q = torch.where(target > 0, log_q, torch.zeros_like(log_q))
            kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1).mean().item()
            if kl < best_kl:
                best, best_kl = tau, kl
        return best

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"Indexer expects q [B, Hq, Lq, D] and k [B, Hkv, Lk, D], got "
                             f"q {tuple(q.shape)} and k {tuple(k.shape)}")
        if (q.shape[1], q.shape[3]) != (self.num_q_heads, self.head_dim) or (
                k.shape[1], k.shape[3]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"Indexer built for Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim} got q {tuple(q.shape)} and k {tuple(k.shape)}")

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> (q_idx [B, Lq, H_I, d_I],
        k_idx [B, Lk, d_I], w [B, Lq, H_I]) in q's dtype."""
        if not self.fitted and _can_fit_on(q, k):
            self.fit(q, k)
        return self._project(q, k)

    def _project(self, q: torch.Tensor, k: torch.Tensor):
        q_idx, w = self.project_queries(q)
        return q_idx, self.project_keys(k).to(q.dtype), w

    def project_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, Lq, D] -> (q_idx [B, Lq, H_I, d_I], w [B, Lq, H_I]) in q's dtype."""
        b, hq, lq, d = q.shape
        q_cat = q.permute(0, 2, 1, 3).reshape(b, lq, hq * d).to(self.wq.dtype)
        q_idx = (q_cat @ self.wq + self.bq).view(b, lq, self.index_heads, self.index_dim)
        w = nn.functional.softplus(q_cat @ self.ww + self.bw)
        return q_idx.to(q.dtype), w.to(q.dtype)

    def project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, Hkv, Lk, D] -> k_idx [B, Lk, d_I] in k's dtype. A row depends on its own
        token only, which is what lets an index-key cache project each token once."""
        b, hkv, lk, d = k.shape
        k_cat = k.permute(0, 2, 1, 3).reshape(b, lk, hkv * d).to(self.wk.dtype)
        return (k_cat @ self.wk + self.bk).to(k.dtype)


def non_finite_parameters(indexer: nn.Module) -> list[str]:
    """Names of the parameters of ``indexer`` holding NaN or inf (empty when all finite)."""
    return [n for n, p in indexer.named_parameters() if not bool(torch.isfinite(p).all())]



def site_anchors(params: Mapping[str, Tensor], name: str) -> tuple[list[str], list[Tensor]]:
    """The tensors a site's indexer is anchored on in a registry: every parameter of the
    site module's subtree (FQNs relative to the root model), walking up the module path
    until one has any. The one rule for the passes, the harness and calibration, so a
    model compiled, evaluated or calibrated finds the same indexer."""
    path = name
    while True:
        prefix = path + "." if path else ""
        found = {f: t for f, t in params.items() if f.startswith(prefix)}
        if found or not path:
            return list(found), list(found.values())
        path = path.rpartition(".")[0]

class IndexerRegistry:
    """Maps a site's anchor parameters (by identity) to its :class:`Indexer`.

    A site is anchored on the parameters of the module that owns it (e.g. the q/k/v
    projections of ``model.layers.0.self_attn``); the same module compiled again finds
    the same indexer. Entries go away with their parameters.
    """

    def __init__(self) -> None:
        # Keyed by id(): tensors compare elementwise, so they cannot be dict keys by
        # equality; the weak reference proves the id still names the same tensor.
        self._by_id: dict[int, tuple[weakref.ref, Indexer]] = {}

    def _get(self, t: torch.Tensor) -> Indexer | None:
        entry = self._by_id.get(id(t))
        if entry is None:
            return None
        ref, indexer = entry
        if ref() is not t:
            del self._by_id[id(t)]
            return None
        return indexer

    def lookup(self, anchors: Sequence[torch.Tensor]) -> Indexer | None:
        for t in anchors:
            found = self._get(t)
            if found is not None:
                return found
        return None

    def register(self, site_name: str, anchor_fqns: Sequence[str],
                 anchors: Sequence[torch.Tensor], indexer: Indexer) -> Indexer:
        """Make ``indexer`` the one every anchor in ``anchors`` maps to (replacing any)."""
        indexer.site_name = site_name
        indexer.anchor_fqns = list(anchor_fqns)
        for t in anchors:
            key = id(t)
            self._by_id[key] = (weakref.ref(t, lambda _, key=key: self._by_id.pop(key, None)),
                                indexer)
        return indexer

    def get_or_create(self, site_name: str, anchor_fqns: Sequence[str],
                      anchors: Sequence[torch.Tensor], num_q_heads: int, num_kv_heads: int,
                      head_dim: int, config: DSAConfig, device=None) -> Indexer:
        """The site's indexer: the registered one, else a new training-free one.

        A registered indexer is never rebuilt behind the user's back (it may be calibrated):
        when ``config.index_heads`` / ``index_dim`` are set and differ from its shape, this
        raises ValueError; ``None`` (the default) matches any shape. To change the shape,
        :func:`reset_indexers` the model first (and ``torch._dynamo.reset()`` before the
        next compile).
        """
        found = self.lookup(anchors)
        if found is not None:
            want = (config.index_heads or found.index_heads, config.index_dim or found.index_dim)
            if want != (found.index_heads, found.index_dim):
                raise ValueError(
                    f"site {site_name!r} already has an indexer of shape H_I x d_I = "
                    f"{found.index_heads} x {found.index_dim}"
                    f"{' (fitted or calibrated)' if found.fitted else ''}, but the config asks "
                    f"for {want[0]} x {want[1]}; leave index_heads / index_dim at None (or "
                    f"set them to {found.index_heads} / {found.index_dim}) to use it, or call "
                    f"dsa_compile.reset_indexers(model) to drop the model's indexers "
                    f"(their fit and calibration are lost) and compile again")
            return found
        indexer = Indexer(num_q_heads, num_kv_heads, head_dim, config.index_heads,
                          config.index_dim)
        if device is not None:
            indexer.to(device)
        return self.register(site_name, anchor_fqns, anchors, indexer)

    def remove(self, model: nn.Module) -> list[str]:
        """Unregister every indexer anchored on ``model``'s parameters; returns the site
        names (as :meth:`sites_of`)."""
        names = sorted(self.sites_of(model))
        for p in model.parameters():
            if self._get(p) is not None:
                del self._by_id[id(p)]
        return names

    def sites_of(self, model: nn.Module) -> dict[str, tuple[Indexer, list[str]]]:
        """{site name: (indexer, its anchors' FQNs)} for every registered site whose
        anchors live in ``model``, named relative to ``model``.

        Found by parameter identity, so an indexer registered while compiling a wrapper
        (site ``lm.model.layers.0.self_attn``) is ``model.layers.0.self_attn`` of the
        wrapped model: files saved from either load into the other. The name is the
        common module of the anchors, else the registered name.
        """
        anchors: dict[int, tuple[Indexer, list[str]]] = {}
        for fqn, p in model.named_parameters():
            indexer = self._get(p)
            if indexer is not None:
                anchors.setdefault(id(indexer), (indexer, []))[1].append(fqn)
        found: dict[str, tuple[Indexer, list[str]]] = {}
        for indexer, fqns in anchors.values():
            parents = [f.split(".")[:-1] for f in fqns]
            common = parents[0]
            for parts in parents[1:]:
                n = 0
                while n < min(len(common), len(parts)) and common[n] == parts[n]:
                    n += 1
                common = common[:n]
            name = ".".join(common) or indexer.site_name
            found.setdefault(name, (indexer, fqns))
        return found

    def indexers_of(self, model: nn.Module) -> dict[str, Indexer]:
        """{site name: indexer} for every registered site whose anchors live in ``model``,
        named relative to ``model`` (see :meth:`sites_of`)."""
        return {name: ix for name, (ix, _) in self.sites_of(model).items()}


REGISTRY = IndexerRegistry()


def reset_indexers(model: nn.Module) -> list[str]:
    """Forget the indexers of ``model`` (fitted, calibrated or loaded), so the next
    compile, ``calibrate`` or evaluation builds new ones from its config (e.g. another
    index_heads / index_dim). Graphs compiled earlier keep their indexers: call
    ``torch._dynamo.reset()`` before compiling again. Returns the site names dropped."""
    return REGISTRY.remove(model)


# --------------------------------------------------------------------------- per KV group


def grouped_index_shape(num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(H_I, d_I) of each KV group's indexer in a :class:`GroupedIndexer`: one head of
    width budget / Hkv, so the Hkv groups together cost what the shared default costs
    (SmolLM2: 3 groups x 1 x 48 = 144 multiply-adds per (query, key) pair)."""
    budget = max(1, (num_q_heads * head_dim) // 4)
    return 1, max(budget // num_kv_heads, 2)


class GroupedIndexer(nn.Module):
    """Per-KV-group selection: one :class:`Indexer` per KV group, each fed only its own
    group's query heads and key head, each choosing its own top_k keys.

    Selection then has the ``indices [B, G, Lq, top_k]`` shape with G = Hkv that
    ``dsa::sparse_attention`` accepts, instead of one selection shared by all heads.
    Group g's indexer is ``groups[g]``, an ordinary Indexer with Hq / Hkv query heads and
    one KV head (so fit, calibration and its projections are the shared indexer's).

    Args:
        num_q_heads, num_kv_heads, head_dim: the site's attention shape (Hq, Hkv, D).
        index_heads, index_dim: each group's (H_I, d_I); None = :func:`grouped_index_shape`.

    Raises ValueError as :class:`Indexer` does.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 index_heads: int | None = None, index_dim: int | None = None):
        super().__init__()
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        heads, dim = grouped_index_shape(num_q_heads, num_kv_heads, head_dim)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group_size = num_q_heads // num_kv_heads
        self.groups = nn.ModuleList(Indexer(self.group_size, 1, head_dim, index_heads or heads,
                                            index_dim or dim)
                                    for _ in range(num_kv_heads))

    @property
    def fitted(self) -> bool:
        return all(ix.fitted for ix in self.groups)

    @fitted.setter
    def fitted(self, value: bool) -> None:
        for ix in self.groups:
            ix.fitted = value

    @property
    def cost_per_pair(self) -> int:
        """Multiply-adds per (query, key) pair of all groups' index scores together."""
        return sum(ix.index_heads * ix.index_dim for ix in self.groups)

    def group_inputs(self, q: torch.Tensor, k: torch.Tensor,
                     group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group ``group``'s q [B, Hq/Hkv, Lq, D] and k [B, 1, Lk, D] (views)."""
        g = self.group_size
        return q[:, group * g : (group + 1) * g], k[:, group : group + 1]

    @torch.no_grad()
    def fit(self, q: torch.Tensor, k: torch.Tensor, max_samples: int = 8192) -> GroupedIndexer:
        """Fit every group's indexer on its own heads (see :meth:`Indexer.fit`)."""
        for g, ix in enumerate(self.groups):
            ix.fit(*self.group_inputs(q, k, g), max_samples=max_samples)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        """q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D] -> one (q_idx [B, Lq, H_I, d_I],
        k_idx [B, Lk, d_I], w [B, Lq, H_I]) per KV group, a list of Hkv tuples."""
        return [ix(*self.group_inputs(q, k, g)) for g, ix in enumerate(self.groups)]


GROUPED_REGISTRY = IndexerRegistry()
"""Per-KV-group indexers (:class:`GroupedIndexer`) of the evaluation harness and
calibration, kept apart from :data:`REGISTRY` so the compiled path never meets one."""
