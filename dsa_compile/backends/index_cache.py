"""The index-key cache at run time: mirrors of KV-cache K tensors in index-key space.

The graph side is :mod:`dsa_compile.passes.index_cache`. Here the backend's wrapper
looks up, before each call of a compiled graph, the mirror [B, L, d_I] of every cache K
tensor the graph reads, and records after it the mirrors the graph wrote or returned.

Ownership: the store holds a mirror for as long as its K tensor lives (a weak reference
to K drops the entry), so a DynamicCache's superseded tensors and a discarded
StaticCache take their mirrors with them. Validity: an entry is used only while K has
the version counter it had when the mirror was made; any write to K outside a compiled
DSA graph (``StaticCache.reset``, an in-place reorder, a user's edit) makes the next
lookup a miss, and a miss re-projects all of K eagerly -- exact, counted in
:attr:`IndexKeyStore.rows_projected` -- into the same mirror tensor where it has one
(a mirror is a static graph input: under CUDA graphs its address must not move). A new
K tensor (beam search's ``index_select``,
``crop``) is a miss for the same reason.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from dsa_compile.reference.index_keys import pack_index_keys


@dataclasses.dataclass
class _Entry:
    ref: weakref.ref
    version: int
    mirror: torch.Tensor


class IndexKeyStore:
    """{(K tensor, indexer): its index keys}, checked by version (two sites reading one
    K tensor, a cross-layer shared cache, keep one mirror each). Counters: ``hits``, ``misses``,
    ``rows_projected`` (K rows re-projected eagerly on misses, summed over the batch)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self.hits = self.misses = self.rows_projected = 0

    def lookup(self, k: torch.Tensor, indexer, dtype: torch.dtype) -> torch.Tensor:
        """The index keys [B, L, d_I] of ``k`` [B, Hkv, L, D] (packed uint8 [B, L, d_I + 4]
        when ``dtype`` is uint8), projected now on a miss."""
        e = self._entries.get((id(k), id(indexer)))
        if (e is not None and e.ref() is k and e.version == k._version
                and e.mirror.dtype == dtype
                and e.mirror.shape[:2] == (k.shape[0], k.shape[2])):
            self.hits += 1
            return e.mirror
        self.misses += 1
        self.rows_projected += k.shape[0] * k.shape[2]
        with torch.no_grad():
            fresh = indexer.project_keys(k)
            # uint8: the site keeps packed FP8 keys (reference/index_keys.py).
            fresh = pack_index_keys(fresh) if dtype == torch.uint8 else fresh.to(dtype)
            if (e is not None and e.ref() is k and e.mirror.dtype == dtype
                    and e.mirror.shape == fresh.shape):
                # Same cache tensor (a reset, a reorder in place): keep the mirror's
                # address, which a CUDA graph replaying this step has baked in.
                return e.mirror.copy_(fresh)
            return fresh.contiguous()

    def record(self, k: torch.Tensor, mirror: torch.Tensor, indexer) -> None:
        """``mirror`` holds the index keys of ``k`` as it is now."""
        key = (id(k), id(indexer))

        def drop(ref, key=key):
            e = self._entries.get(key)
            if e is not None and e.ref is ref:
                del self._entries[key]

        self._entries[key] = _Entry(weakref.ref(k, drop), k._version, mirror)

    def carry_over(self, k: torch.Tensor, version: int) -> None:
        """``k`` was written since ``version`` only where the next graph call rewrites it
        (the fit run of a new graph on a KV cache it updates in place): the mirrors made
        at ``version`` stay valid."""
        for e in self._entries.values():
            if e.ref() is k and e.version == version:
                e.version = k._version

    def nbytes(self) -> int:
        """Bytes held by live mirrors."""
        seen, total = set(), 0
        for e in self._entries.values():
            if e.ref() is not None and e.mirror.untyped_storage().data_ptr() not in seen:
                seen.add(e.mirror.untyped_storage().data_ptr())
                total += e.mirror.untyped_storage().nbytes()
        return total

    def stats(self) -> dict[str, int]:
        """Live entries, their bytes, and the hit/miss/re-projection counters."""
        return {"entries": len(self._entries), "bytes": self.nbytes(), "hits": self.hits,
                "misses": self.misses, "rows_projected": self.rows_projected}

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = self.rows_projected = 0


STORE = IndexKeyStore()


def index_key_cache() -> IndexKeyStore:
    """The process-wide index-key cache of ``torch.compile(..., backend="dsa")`` graphs:
    ``index_key_cache().stats()`` gives its size in bytes and how often it was hit."""
    return STORE


def call_with_mirrors(compiled, plan, args: list, boxed: bool):
    """Run ``compiled`` on ``args`` plus the mirrors ``plan`` asks for; record the mirrors
    it wrote and returned; return the original outputs only."""
    mirrors = [STORE.lookup(args[m.source], m.indexer, m.dtype) for m in plan.inputs]
    full = [*args, *mirrors]
    out = compiled(full) if boxed else compiled(*full)
    for m, mirror in zip(plan.inputs, mirrors):
        STORE.record(args[m.source], mirror, m.indexer)
    n = len(out) - len(plan.outputs)
    for (tied, owner), mirror in zip(plan.outputs, out[n:]):
        STORE.record(out[tied], mirror, owner)
    return out[:n]
