"""torch.ops.dsa.*: opcheck, autograd, dense dispatch, argument errors, bounded memory."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dsa_compile  # noqa: F401  (registers the ops)
from dsa_compile import reference
from dsa_compile.ops.attention import dense_rows

OPS = torch.ops.dsa


def indexer_inputs(b=2, lq=9, lk=13, h=3, d=8, requires_grad=False):
    t = (torch.randn(b, lq, h, d), torch.randn(b, lk, d), torch.rand(b, lq, h) + 0.1)
    return tuple(x.requires_grad_(requires_grad) for x in t)


def attention_inputs(b=2, hq=4, hkv=2, lq=9, lk=13, d=16, requires_grad=False):
    t = (torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d))
    return tuple(x.requires_grad_(requires_grad) for x in t)


def test_opcheck_indexer_topk():
    q_idx, k_idx, w = indexer_inputs()
    mask = torch.rand(2, 13) > 0.2
    torch.library.opcheck(OPS.indexer_topk.default, (q_idx, k_idx, w, 5, 4, True, mask))
    torch.library.opcheck(OPS.indexer_topk.default, (q_idx, k_idx, w, 20, 0, False, None))


def test_opcheck_indexer_scores():
    q_idx, k_idx, w = indexer_inputs(requires_grad=True)
    torch.library.opcheck(OPS.indexer_scores.default, (q_idx, k_idx, w, 4, True, None))


def test_opcheck_sparse_attention():
    q, k, v = attention_inputs(requires_grad=True)
    idx = reference.indexer_topk(*indexer_inputs(), 6, 4, True)[:, None]
    torch.library.opcheck(OPS.sparse_attention.default, (q, k, v, idx, 0.25, 0.0))
    torch.library.opcheck(OPS.sparse_attention.default, (q, k, v, idx, 0.25, 5.0))


def test_opcheck_attention():
    q, k, v = attention_inputs(requires_grad=True)
    q_idx, k_idx, w = indexer_inputs()
    for dense_below in (0, 10):
        torch.library.opcheck(
            OPS.attention.default,
            (q, k, v, q_idx, k_idx, w, 6, 0.25, True, 4, None, 0.0, dense_below),
        )


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_sparse_attention_gradients_match_reference_autograd(softcap):
    q, k, v = attention_inputs(hq=8, hkv=2, lq=11, lk=19, requires_grad=True)
    idx = torch.stack(
        [reference.indexer_topk(*indexer_inputs(lq=11, lk=19), 7, 8, True) for _ in range(2)], 1
    )
    out, lse = OPS.sparse_attention(q, k, v, idx, 0.3, softcap)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, 0.3, softcap)
    ref = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (q, k, v))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_indexer_scores_gradients_match_dense_formula():
    q_idx, k_idx, w = indexer_inputs(lq=5, lk=7, requires_grad=True)
    scores = OPS.indexer_scores(q_idx, k_idx, w, 2, True, None)
    g = torch.randn_like(scores)
    got = torch.autograd.grad(scores.masked_fill(scores.isinf(), 0).mul(g).sum(), (q_idx, k_idx, w))
    dots = torch.relu(torch.einsum("bthd,bsd->bths", q_idx, k_idx))
    dense = (dots * w[..., None]).sum(2)
    visible = torch.arange(7)[None] <= torch.arange(5)[:, None] + 2
    want = torch.autograd.grad((dense * g * visible).sum(), (q_idx, k_idx, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_forced_sparse_with_full_topk_equals_dense():
    q, k, v = attention_inputs(lq=9, lk=13)
    q_idx, k_idx, w = indexer_inputs()
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False
    out = OPS.attention(q, k, v, q_idx, k_idx, w, 13, 0.25, True, 4, mask, 0.0, 0)
    dense, _ = reference.dense_attention(q, k, v, 0.25, True, 4, mask)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_attention_dense_dispatch_rows():
    # Query t sees q_offset + t + 1 keys; those at or under max(top_k, dense_below) go dense.
    assert dense_rows(lq=10, lk=10, top_k=4, q_offset=0, causal=True, dense_below=6) == 6
    assert dense_rows(lq=10, lk=20, top_k=4, q_offset=10, causal=True, dense_below=6) == 0
    assert dense_rows(lq=10, lk=10, top_k=4, q_offset=0, causal=True, dense_below=0) == 0
    assert dense_rows(lq=10, lk=10, top_k=16, q_offset=0, causal=False, dense_below=1) == 10
    q, k, v = attention_inputs(lq=13, lk=13)
    q_idx, k_idx, w = indexer_inputs(lq=13, lk=13)
    mixed = OPS.attention(q, k, v, q_idx, k_idx, w, 3, 0.25, True, 0, None, 0.0, 6)
    dense, _ = reference.dense_attention(q, k, v, 0.25, True, 0)
    sparse = OPS.attention(q, k, v, q_idx, k_idx, w, 3, 0.25, True, 0, None, 0.0, 0)
    torch.testing.assert_close(mixed[:, :, :6], dense[:, :, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[:, :, 6:], sparse[:, :, 6:])
    assert not torch.allclose(sparse[:, :, 6:], dense[:, :, 6:], atol=1e-3)


def test_attention_gradients_flow_to_qkv():
    q, k, v = attention_inputs(requires_grad=True)
    q_idx, k_idx, w = indexer_inputs()
    out = OPS.attention(q, k, v, q_idx, k_idx, w, 5, 0.25, True, 4, None, 0.0, 6)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_ops_trace_under_torch_compile_with_dynamic_shapes():
    def f(q, k, v, q_idx, k_idx, w):
        return OPS.attention(q, k, v, q_idx, k_idx, w, 4, 0.25, True, 0, None, 0.0, 0)

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for length in (7, 12):
        q, k, v = attention_inputs(lq=length, lk=length)
        args = (q, k, v, *indexer_inputs(lq=length, lk=length))
        torch.testing.assert_close(compiled(*args), f(*args))


# -- bad input: each error names the argument -------------------------------------------

def _idx_args():
    return list(indexer_inputs()) + [5, 4, True, None]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "q_idx must have rank 4"),
        (lambda a: a.__setitem__(1, a[1][:1]), "k_idx must be"),
        (lambda a: a.__setitem__(2, a[2][:, :, :2]), "w must be"),
        (lambda a: a.__setitem__(3, 0), "top_k must be > 0"),
        (lambda a: a.__setitem__(3, -3), "top_k must be > 0"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int64)), "q_idx has dtype"),
        (lambda a: a.__setitem__(6, torch.ones(2, 12, dtype=torch.bool)), "key_mask must be bool"),
        (lambda a: a.__setitem__(6, torch.ones(2, 13)), "key_mask has dtype"),
        (lambda a: a.__setitem__(1, a[1].transpose(1, 2).contiguous().transpose(1, 2)),
         "k_idx must be contiguous in its last dimension"),
    ],
)
def test_indexer_topk_bad_input(mutate, match):
    args = _idx_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        OPS.indexer_topk(*args)


def _attn_args():
    q, k, v = attention_inputs()
    idx = reference.indexer_topk(*indexer_inputs(), 6, 4, True)[:, None]
    return [q, k, v, idx, 0.25, 0.0]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "q must have rank 4"),
        (lambda a: a.__setitem__(1, a[1][:1]), "batch sizes differ"),
        (lambda a: a.__setitem__(0, torch.randn(2, 3, 9, 16)), "multiple of key/value heads"),
        (lambda a: a.__setitem__(2, a[2][:, :1]), "k has 2 heads but v has 1"),
        (lambda a: a.__setitem__(1, a[1].double()), "k has dtype"),
        (lambda a: a.__setitem__(1, a[1].half()), "must share a dtype"),
        (lambda a: a.__setitem__(3, a[3].float()), "indices has dtype"),
        (lambda a: a.__setitem__(3, a[3].expand(2, 3, 9, 6)), "indices must be"),
        (lambda a: a.__setitem__(3, a[3] + 100), "indices out of range"),
        (lambda a: a.__setitem__(3, a[3] - 5), "indices out of range"),
        (lambda a: a.__setitem__(5, -1.0), "softcap must be >= 0"),
        (lambda a: a.__setitem__(0, torch.randn(2, 4, 16, 9).transpose(-1, -2)),
         "q must be contiguous in its last dimension"),
    ],
)
def test_sparse_attention_bad_input(mutate, match):
    args = _attn_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        OPS.sparse_attention(*args)


def test_attention_rejects_mismatched_indexer_inputs():
    q, k, v = attention_inputs(lq=9, lk=13)
    q_idx, k_idx, w = indexer_inputs(lq=9, lk=12)
    with pytest.raises(ValueError, match="do not match"):
        OPS.attention(q, k, v, q_idx, k_idx, w, 4, 0.25)


def test_config_rejects_bad_values():
    from dsa_compile import DSAConfig

    with pytest.raises(ValueError, match="top_k must be a positive int"):
        DSAConfig(top_k=0)
    with pytest.raises(ValueError, match="dense_below"):
        DSAConfig(dense_below=-1)
    with pytest.raises(ValueError, match="unknown dsa option"):
        DSAConfig.from_options({"topk": 3})
    assert DSAConfig.from_options({"top_k": 3}).top_k == 3


def test_sparse_attention_long_sequence_memory_is_bounded():
    """Lq = Lk = 32768, top_k = 256, 4 heads, d = 64 on CPU: peak RSS under 2 GB."""
    script = textwrap.dedent(
        """
        import resource, torch, dsa_compile
        torch.manual_seed(0)
        L, H, D, K = 32768, 4, 64, 256
        q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
        idx = torch.randint(0, L, (1, 1, L, K), dtype=torch.int32)
        idx = idx.sort(-1).values
        idx = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])  # distinct, -1 holes
        out, lse = torch.ops.dsa.sparse_attention(q, k, v, idx, D ** -0.5)
        assert torch.isfinite(out).all()
        # VmHWM, not ru_maxrss: the latter keeps the parent's (pytest's) high-water mark
        # across fork + exec, so it measured whatever earlier tests had loaded.
        hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM:")]
        print(int(hwm[0].split()[1]) // 1024 if hwm else
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    # glibc gives each OpenMP worker its own malloc arena and keeps freed per-chunk buffers
    # there, inflating RSS several-fold over live memory; two arenas measure what we allocate.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    peak_mb = int(res.stdout.split()[-1])
    assert peak_mb < 2048, f"peak RSS {peak_mb} MB"
