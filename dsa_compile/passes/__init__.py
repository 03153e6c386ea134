"""FX passes that turn dense attention into DSA: normalise -> detect -> rewrite.

:func:`run_passes` is the one entry point used by the torch.compile backend and by
:func:`dsa_compile.apply`; it never raises for a model it cannot handle: a failure
leaves the graph dense and is reported.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from dsa_compile.config import DSAConfig
from dsa_compile.passes.detect import normalize_path
from dsa_compile.passes.forms import FORMS, find_sites, form_of
from dsa_compile.passes.normalize import eliminate_dead_code
from dsa_compile.passes.rewrite import COUNTERS, SiteRecord, record, selected

__all__ = ["COUNTERS", "FORMS", "Report", "SiteRecord", "find_sites", "normalize_path",
           "run_passes"]


@dataclasses.dataclass
class Report:
    """What the passes did: one :class:`SiteRecord` per attention site."""

    sites: list[SiteRecord]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.rewritten]

    def __str__(self) -> str:
        rows = [("site", "form", "heads q/kv", "causal", "pad mask", "DSA", "reason")]
        for s in self.sites:
            rows.append((s.name or "<root>", s.kind, f"{s.num_q_heads}/{s.num_kv_heads}",
                         "yes" if s.causal else "no", "yes" if s.key_mask else "no",
                         "yes" if s.rewritten else "no", s.reason or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n = len(self.rewritten)
        lines.append(f"{n} of {len(self.sites)} attention sites rewritten to DSA")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def run_passes(gm: fx.GraphModule, config: DSAConfig, params: dict[str, torch.Tensor],
               lookup=lambda node: None, rewrite: bool = True) -> list[SiteRecord]:
    """Rewrite every provably-safe attention site of ``gm`` in place.

    Args:
        gm: a torch-IR graph (dynamo or torch.export) with fake values in node.meta.
        config: the rewrite's settings.
        params: {FQN relative to the user's root model: real parameter tensor}, used to
            anchor each site's indexer in the registry.
        lookup: node -> real tensor for placeholders/get_attr (tril-buffer masks).
        rewrite: False only detects (for explain).

    Returns one :class:`SiteRecord` per attention site found.
    """
    records = []
    for i, site in enumerate(find_sites(gm.graph, lookup)):
        if not site.reason:
            site.reason = selected(site.name, config)
        if not site.reason and config.min_keys:
            if isinstance(site.lk, int) and site.lk < config.min_keys:
                site.reason = f"{site.lk} keys < config.min_keys"
        if not site.reason and rewrite:
            form_of(site.kind).rewrite(gm, site, i, config, params)
            COUNTERS[site.kind] += 1
        elif site.reason:
            COUNTERS["rejected"] += 1
        else:
            site.rewritten = True   # explain: would be rewritten
        records.append(record(site))
    if rewrite:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return records
