"""Where indexers live: a registry from a site's parameters (by identity) to its
indexer, so every compile, evaluation or calibration of the same model meets the same one."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dsa_compile.config import DSAConfig
from dsa_compile.indexer.module import Indexer


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


GROUPED_REGISTRY = IndexerRegistry()
"""Per-KV-group indexers (:class:`GroupedIndexer`) of the evaluation harness and
calibration, kept apart from :data:`REGISTRY` so the compiled path never meets one."""
