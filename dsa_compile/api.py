"""The passes as a library: :func:`apply` and :func:`explain`.

Both capture the model with ``torch._dynamo.export`` (the same torch-IR graph the
``dsa`` backend sees, so one set of passes serves both; ``torch.export`` graphs are
ATen-level and build masks through ``aten.index``, which the mask prover does not
cover). The result is an ordinary ``fx.GraphModule`` holding the model's own
parameter tensors (indexers anchor on them by identity, with FQNs relative to the
user's model), that runs eagerly and that ``torch.export`` /
``torch.onnx.export(dynamo=True)`` can trace again, the DSA ops showing as
``torch.ops.dsa.attention`` nodes.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import fx, nn

from dsa_compile.config import DSAConfig
from dsa_compile.passes import SiteRecord, run_passes
from dsa_compile.passes.fit import fit_new_indexers


@dataclasses.dataclass
class Report:
    """What the passes did: one :class:`SiteRecord` per attention site."""

    sites: list[SiteRecord]

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
        return "\n".join(lines)


def _split_args(example_args):
    if isinstance(example_args, dict):
        return (), dict(example_args)
    if isinstance(example_args, tuple) and len(example_args) == 2 and \
            isinstance(example_args[1], dict) and isinstance(example_args[0], tuple):
        return example_args
    if not isinstance(example_args, (tuple, list)):
        return (example_args,), {}
    return tuple(example_args), {}


def _capture(model, example_args) -> fx.GraphModule:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, fx.GraphModule) and any(
            "example_value" in n.meta or "val" in n.meta for n in model.graph.nodes):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or ExportedProgram, got {type(model)}")
    args, kwargs = _split_args(example_args)
    # nn.MultiheadAttention / nn.TransformerEncoder warn about a bool key_padding_mask
    # next to a float attn_mask; let the warning move out of the graph instead of
    # breaking it (export needs one graph).
    logging = torch._dynamo.config.reorderable_logging_functions | {warnings.warn}
    with torch.no_grad(), torch._dynamo.config.patch(reorderable_logging_functions=logging):
        gm, _ = torch._dynamo.export(model)(*args, **kwargs)
    return gm


def _params(gm: fx.GraphModule, model) -> dict:
    """{FQN in the user's model: parameter} for the parameters the graph holds."""
    names = {}
    if isinstance(model, nn.Module):
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {names.get(id(p), n): p for n, p in gm.named_parameters(remove_duplicate=False)}


def _lookup(gm: fx.GraphModule):
    def lookup(node):
        if node.op != "get_attr":
            return None
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None
    return lookup


def apply(model_or_graph_module, example_args, config: DSAConfig | None = None) -> nn.Module:
    """Rewrite every provably-safe dense attention of a model into DSA.

    Args:
        model_or_graph_module: an ``nn.Module``, an ``fx.GraphModule`` carrying fake
            values (node.meta 'val'), or a ``torch.export.ExportedProgram``.
        example_args: a tuple of positional inputs, a dict of keyword inputs, or
            ``(args, kwargs)``; shapes only matter for capture (lengths stay free at run
            time only if the capture made them dynamic).
        config: :class:`DSAConfig` (default: ``DSAConfig()``).

    Returns:
        An ``fx.GraphModule`` computing the model with ``torch.ops.dsa.attention`` in
        place of each rewritten site; ``.dsa_report`` holds the :class:`Report`. New
        indexers are fitted, training-free, on ``example_args`` (at least 256 tokens;
        shorter inputs leave them data-free, with a warning).

    Raises:
        TypeError: the model is not a module or exported program.
    """
    config = DSAConfig.from_options(config)
    gm = _capture(model_or_graph_module, example_args)
    params = _params(gm, model_or_graph_module)
    records = run_passes(gm, config, params, lookup=_lookup(gm))
    gm.dsa_report = Report(records)
    if any(r.rewritten for r in records):
        args, kwargs = _split_args(example_args)
        flat = [x for x in torch.utils._pytree.tree_leaves((args, kwargs))]
        fit_new_indexers(gm, lambda: gm(*args, **kwargs), flat)
    return gm


def explain(model, example_args, config: DSAConfig | None = None) -> Report:
    """Which attention sites the passes find, and why each one is or is not rewritten.

    Same arguments as :func:`apply`; the model is not changed.
    """
    config = DSAConfig.from_options(config)
    gm = _capture(model, example_args)
    params = _params(gm, model)
    return Report(run_passes(gm, config, params, lookup=_lookup(gm), rewrite=False))
