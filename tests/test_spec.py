"""Named access to DSA op nodes (dsa_compile.ops.spec): built, read and edited by name."""

import pytest
import torch
from torch import fx

import dsa_compile  # noqa: F401  (registers the ops)
from dsa_compile.ops.spec import arg_names, call_args, get_arg, set_args

ATT = torch.ops.dsa.attention.default


def test_names_follow_the_schema():
    assert arg_names(ATT)[:6] == ("q", "k", "v", "q_idx", "k_idx", "w")
    assert arg_names(ATT)[-2:] == ("mask", "bias")


def test_call_args_fills_defaults_and_rejects_bad_names():
    args = call_args(ATT, q=1, k=2, v=3, q_idx=4, k_idx=5, w=6, top_k=7, scale=0.5,
                     dense_below=9)
    assert len(args) == len(arg_names(ATT))
    assert args[arg_names(ATT).index("dense_below")] == 9
    assert args[arg_names(ATT).index("causal")] is True
    assert args[arg_names(ATT).index("mask")] is None
    with pytest.raises(TypeError, match="unknown arguments \\['topk'\\]"):
        call_args(ATT, q=1, k=2, v=3, q_idx=4, k_idx=5, w=6, topk=7, scale=0.5)
    with pytest.raises(TypeError, match="missing arguments \\['scale'\\]"):
        call_args(ATT, q=1, k=2, v=3, q_idx=4, k_idx=5, w=6, top_k=7)


def test_get_and_set_positional_and_keyword():
    g = fx.Graph()
    xs = [g.placeholder(n) for n in ("q", "k", "v", "qi", "ki", "w")]
    node = g.call_function(ATT, (*xs, 8, 0.5), {"softcap": 2.0})
    assert get_arg(node, "k_idx") is xs[4]
    assert get_arg(node, "softcap") == 2.0
    assert get_arg(node, "dense_below") == 0  # the schema default
    set_args(node, k_idx=xs[0], softcap=3.0, dense_below=5)
    assert node.args[4] is xs[0]
    assert node.kwargs == {"softcap": 3.0, "dense_below": 5}
