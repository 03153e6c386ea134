"""DSAConfig: every knob of the DSA rewrite in one dataclass."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

DENSE_BELOW_DEFAULT = 65536
"""Default ``dense_below``: the measured crossover of one DSA layer (indexer + top-k +
query-tile sparse attention) against SDPA on selections like a real model's
(benchmarks/RESULTS.md, attention_layer.py on an H100, bf16, 32/8 heads, D=128,
top_k=2048): 0.79x at 32K, 1.09x at 64K, 1.48x at 128K. Queries that see at most 64K
keys stay dense. Pass ``dense_below=0`` for sparsity at any length (quality studies,
memory)."""


def dense_threshold(top_k: int, dense_below: int) -> int:
    """The one rule of the dense dispatch: a query that sees at most this many keys uses
    dense attention (0: none does). The ONNX function body spells it in ONNX ops."""
    return max(top_k, dense_below) if dense_below > 0 else 0


def _check_int(name: str, value: Any, low: int, optional: bool = False, hint: str = "") -> None:
    """Raise unless ``value`` is an int >= ``low`` (or None when ``optional``); not a bool."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        what += " or None (the default)" if optional else ""
        hint = f" ({hint})" if hint else ""
        raise ValueError(f"DSAConfig.{name} must be {what}{hint}, got {value!r}")


def _patterns(name: str, value: Any, hint: str) -> tuple[str, ...]:
    """fnmatch patterns as a tuple: one str, or a list / tuple of str."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"DSAConfig.{name} must be a str or a list / tuple of str (fnmatch "
                     f"patterns of module paths; {hint}), got {value!r}")


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
        sites: module-path patterns (fnmatch) of the attention sites to convert: a str or
            a list / tuple of str, stored as a tuple; ``None`` converts every site the
            passes can prove safe.
        exclude: module-path patterns never to convert (str or list / tuple of str).
        softcap: logit soft-cap applied in sparse attention (``0`` = off); normally
            taken from the model, this overrides it.
        min_keys: sites whose key length is known statically and below this stay dense.
        index_fp8: score the indexer in FP8 (e4m3) on CUDA (Hopper or later) when the
            compiled model runs (``torch.compile`` backend; with :func:`apply`, run the
            model inside ``dsa_compile.fp8_indexer()``). CPU ignores it.
        index_cache: under ``torch.compile``, a site whose keys come from a KV-cache
            write projects only the new tokens' index keys and reads the others from an
            index-key cache (:mod:`dsa_compile.passes.index_cache`); ``False`` projects
            every key on every call (same result, slower decode).
        index_cache_fp8: store that cache as packed FP8 keys (e4m3 values and one float32
            scale per token, d_I + 4 bytes instead of 2 d_I in bf16: DeepSeek's 132 B at
            d_I = 128), which a decode step reads instead of the bf16 keys. Selections
            are then exact for the dequantised keys. Any device; needs d_I % 4 == 0 (a
            site with another width keeps a bf16 cache).

    Raises ValueError naming the field for a wrong type or range (ints must be ints, not
    bools; softcap finite).
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
    index_cache: bool = True
    index_cache_fp8: bool = False

    def __post_init__(self) -> None:
        # bool is an int subclass: top_k=True would silently mean top_k=1.
        _check_int("top_k", self.top_k, low=1)
        _check_int("index_heads", self.index_heads, low=1, optional=True)
        _check_int("index_dim", self.index_dim, low=1, optional=True)
        _check_int("dense_below", self.dense_below, low=0,
                   hint="0 forces the sparse path everywhere")
        _check_int("min_keys", self.min_keys, low=0)
        softcap = self.softcap
        if (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                or not math.isfinite(softcap) or softcap < 0):
            raise ValueError(f"DSAConfig.softcap must be a finite number >= 0 (0 = off), "
                             f"got {softcap!r}")
        for flag in ("index_fp8", "index_cache", "index_cache_fp8"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"DSAConfig.{flag} must be True or False, got "
                                 f"{getattr(self, flag)!r}")
        if self.sites is not None:
            object.__setattr__(self, "sites", _patterns("sites", self.sites, "None = all sites"))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude,
                                                      "() = exclude nothing"))

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
        return dense_threshold(self.top_k, self.dense_below)
