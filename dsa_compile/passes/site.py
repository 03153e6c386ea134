"""The canonical attention site every dense form is normalised into."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.fx import Node


class Reject(Exception):
    """Raised while matching: the site stays dense, and the message says why."""


@dataclasses.dataclass
class Operand:
    """A graph value and how to bring it into canonical layout [B, H, L, D].

    ``perm`` is applied with ``permute``; ``unsqueeze0`` adds a batch dim to a 3-D
    ``[N, L, D]`` operand (bmm forms: the N = B * H slices become heads of batch 1).
    """

    node: Node
    perm: tuple[int, ...] | None = None
    unsqueeze0: bool = False


@dataclasses.dataclass
class KeyFactor:
    """A bool (or 0/1) tensor broadcastable to [B, 1, 1, Lk]; ``negate``: True = masked.

    ``batch_key``: the tensor is laid out [B, Lk] instead (nn.MultiheadAttention's
    ``key_padding_mask``).
    """

    node: Node
    negate: bool = False
    batch_key: bool = False


@dataclasses.dataclass
class ReferenceIndex:
    """A model's own DSA index inputs (the reference form): q_idx [B, Lq, H_I, d_I],
    k_idx [B, Lk, d_I], w [B, Lq, H_I] nodes and the top_k it keeps."""

    q_idx: Node
    k_idx: Node
    w: Node
    top_k: Any


@dataclasses.dataclass
class AttentionSite:
    """One dense attention, in canonical form.

    q: [B, Hq, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, Dv] (after the operands'
    layout transforms, with GQA repeats stripped). ``output`` is the node whose value
    the DSA op replaces; ``out_perm`` maps the canonical [B, Hq, Lq, Dv] back to it.
    """

    name: str
    kind: str
    output: Node
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    num_q_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    scale: float = 1.0
    causal: bool = False
    q_offset: Any = 0
    key_factors: list[KeyFactor] = dataclasses.field(default_factory=list)
    masks: list[Any] = dataclasses.field(default_factory=list)  # masks.CarriedMask
    softcap: float = 0.0
    out_perm: tuple[int, ...] | None = None
    squeeze0: bool = False
    out_dtype: Any = None
    nodes: set[Node] = dataclasses.field(default_factory=set)
    reason: str = ""
    rewritten: bool = False
    lk: Any = None        # key count (int or SymInt), for config.min_keys
    device: Any = None    # where the indexer goes when q has no fake value (MHA)
    reference: ReferenceIndex | None = None  # kind 'dsa_reference' only
