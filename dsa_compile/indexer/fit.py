"""Training-free fitting of an indexer: low-rank factorisations of each KV group's
logits from example activations, the bias that keeps ReLU from cutting, and the
temperature of the head weights. :func:`ensure_fitted` is the one place that decides
when a fit happens."""

from __future__ import annotations

import math

import torch
from torch import nn

from dsa_compile.reference.dense import grouped_probs


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


def can_fit_on(q: torch.Tensor, k: torch.Tensor, min_tokens: int = FIT_MIN_TOKENS) -> bool:
    """True for real (not fake, not traced) tensors with enough keys to fit on."""
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or isinstance(q, FakeTensor) or isinstance(k, FakeTensor):
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return False
    return k.shape[0] * k.shape[2] >= min_tokens


def ensure_fitted(indexer, q: torch.Tensor, k: torch.Tensor,
                  min_tokens: int = FIT_MIN_TOKENS, real: bool = False) -> bool:
    """Fit ``indexer`` on (q, k) unless it is fitted already: the one place that decides
    when a training-free fit happens (an indexer's first real call, the backend's fit
    run, the evaluation harness). Skipped for fewer than ``min_tokens`` keys (B * Lk)
    and, unless the caller vouches that the tensors are ``real`` (the backend's fit run
    executes inside the compiler), for fake or traced tensors. Returns whether it fitted."""
    if indexer.fitted:
        return False
    if real:
        enough = k.shape[0] * k.shape[2] >= min_tokens
    else:  # tracing checks before any shape test: under dynamo a length test is a guard
        enough = can_fit_on(q, k, min_tokens)
    if not enough:
        return False
    indexer.fit(q, k)
    return True


def non_finite_parameters(indexer: nn.Module) -> list[str]:
    """Names of the parameters of ``indexer`` holding NaN or inf (empty when all finite)."""
    return [n for n, p in indexer.named_parameters() if not bool(torch.isfinite(p).all())]


@torch.no_grad()
def fit_indexer(indexer, q: torch.Tensor, k: torch.Tensor, max_samples: int = 8192):
    """Training-free fit of ``indexer`` (an :class:`Indexer`) from example activations of its site.

    Args:
        q: [B, Hq, Lq, D] and k: [B, Hkv, Lk, D], the site's post-RoPE inputs.
        max_samples: tokens used per group (evenly strided).

    Returns indexer. Sets each group's rank-r factorisation (``low_rank_bilinear``) and
    the bias c_j = 2 * the std of the head's centred scores, so that ReLU rarely cuts.
    Raises ValueError when q or k hold NaN / inf (a NaN indexer would select nothing),
    or when the fit itself comes out non-finite; the weights are then left as they were.
    """
    indexer._check_inputs(q, k)
    for name, t in (("q", q), ("k", k)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"Indexer.fit{indexer._where()}: the site's {name} {tuple(t.shape)} holds NaN "
                f"or inf values, so no indexer can be fitted on it; check the model's "
                f"weights and inputs (a NaN weight propagates into every later layer)")
    before = {n: p.detach().clone() for n, p in indexer.named_parameters()}
    d = indexer.head_dim
    group_size = indexer.num_q_heads // indexer.num_kv_heads
    qs = q.detach().float().reshape(q.shape[0], indexer.num_kv_heads, group_size, q.shape[2], d)
    q_sum = qs.sum(2).permute(1, 0, 2, 3).reshape(indexer.num_kv_heads, -1, d)
    k_all = k.detach().float().permute(1, 0, 2, 3).reshape(indexer.num_kv_heads, -1, d)
    step_q = max(1, q_sum.shape[1] // max_samples)
    step_k = max(1, k_all.shape[1] // max_samples)
    projections = [low_rank_bilinear(q_sum[g, ::step_q], k_all[g, ::step_k], indexer.rank)
                   for g in range(indexer.num_kv_heads)]
    indexer._set_projections(projections, torch.zeros(indexer.index_heads))
    q_idx, k_idx, _ = indexer._project(q[:, :, ::max(1, q.shape[2] // 256)],
                                       k[:, :, ::max(1, k.shape[2] // 256)])
    dots = torch.einsum("bqhd,bkd->bhqk", q_idx.float(), k_idx.float())
    dots = dots - dots.mean(-1, keepdim=True)
    bias = 2.0 * dots.transpose(0, 1).reshape(indexer.index_heads, -1).std(-1)
    indexer.bq.view(indexer.index_heads, indexer.index_dim)[:, -1] = bias.to(indexer.bq)
    indexer.bw.fill_(_softplus_inverse(fit_temperature(indexer, q, k)))
    bad = non_finite_parameters(indexer)
    if bad:
        for n, p in indexer.named_parameters():
            p.copy_(before[n])
        raise ValueError(
            f"Indexer.fit{indexer._where()}: the fit gave non-finite weights {bad} (activations "
            f"too large for float32?); the previous weights were kept")
    indexer.fitted = True
    return indexer


@torch.no_grad()
def fit_temperature(indexer, q: torch.Tensor, k: torch.Tensor, rows: int = 64) -> float:
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
    q_idx, k_idx, _ = indexer._project(qr, k.float())
    scores = torch.relu(torch.einsum("bqhd,bkd->bqhk", q_idx, k_idx)).sum(2)
    best, best_kl = 1.0, float("inf")
    for tau in torch.logspace(-3, 1, 41).tolist():
        log_q = torch.log_softmax((scores * tau).masked_fill(~visible, float("-inf")), -1)
        log_q = torch.where(target > 0, log_q, torch.zeros_like(log_q))
        kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1).mean().item()
        if kl < best_kl:
            best, best_kl = tau, kl
    return best
