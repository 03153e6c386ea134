"""DSAConfig: every knob of the DSA rewrite in one dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

DENSE_BELOW_DEFAULT = 131072
"""Default ``dense_below``: on an H200 (benchmarks/RESULTS.md, attention_layer.py, bf16,
32/8 heads, D=128, top_k=2048) the DSA kernels were slower than SDPA at every length up
to 128K (0.65x there), so every query up to 128K visible keys stays dense and the DSA
model is never slower than dense in that range. Pass ``dense_below=0`` for sparsity at
any length (quality studies, memory), or a smaller value once faster kernels move the
crossover down."""


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """What the DSA rewrite does to a model.

    Args:
        top_k: keys kept per query (DeepSeek uses 2048). Must be > 0.
        index_heads: indexer heads H_I per site. ``None`` picks a default from the
            site's shape (see :class:`dsa_compile.indexer.Indexer`).
        index_dim: indexer width d_I. ``None`` picks a default from the site's shape.
        dense_below: a query whose visible keys number at most
            ``max(top_k, dense_below)`` uses dense attention (exact, and faster at short
            length). ``0`` turns every dense fallback off and forces the sparse path.
            The default is the measured speed crossover of the current kernels
            (:data:`DENSE_BELOW_DEFAULT`).
        sites: module-path patterns (fnmatch) of the attention sites to convert;
            ``None`` converts every site the passes can prove safe.
        exclude: module-path patterns never to convert.
        softcap: logit soft-cap applied in sparse attention (``0`` = off); normally
            taken from the model, this overrides it.
        min_keys: sites whose key length is known statically and below this stay dense.
        index_fp8: score the indexer in FP8 (e4m3) on CUDA (Hopper or later) when the
            compiled model runs (``torch.compile`` backend; with :func:`apply`, run the
            model inside ``dsa_compile.fp8_indexer()``). CPU ignores it.
    """

    top_k: int = 2048
    index_heads: int | None = None
    index_dim: int | None = None
    dense_below: int = DENSE_BELOW_DEFAULT
    sites: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    softcap: float = 0.0
    min_keys: int = 0
    index_fp8: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ValueError(f"DSAConfig.top_k must be a positive int, got {self.top_k!r}")
        for name in ("index_heads", "index_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"DSAConfig.{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise ValueError(
                f"DSAConfig.dense_below must be an int >= 0 (0 forces the sparse path), "
                f"got {self.dense_below!r}"
            )
        if self.softcap < 0:
            raise ValueError(f"DSAConfig.softcap must be >= 0, got {self.softcap!r}")
        if self.sites is not None and isinstance(self.sites, str):
            object.__setattr__(self, "sites", (self.sites,))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | DSAConfig | None) -> DSAConfig:
        """Build a config from ``torch.compile(..., options={...})``; unknown keys raise."""
        if options is None:
            return cls()
        if isinstance(options, DSAConfig):
            return options
        options = dict(options)
        if "config" in options:
            base = options.pop("config")
            if not isinstance(base, DSAConfig):
                raise TypeError("options['config'] must be a DSAConfig")
            return dataclasses.replace(base, **options) if options else base
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown dsa option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**options)

    def dense_threshold(self) -> int:
        """Visible-key count at or below which a query uses dense attention."""
        return max(self.top_k, self.dense_below) if self.dense_below > 0 else 0
