"""Learned selection beats position: multi-query associative recall, from scratch on CPU.

    .venv/bin/python examples/synthetic_recall.py

A sequence holds N key-value pairs ``k1 v1 k2 v2 ...`` and then the N keys again in
another order, each followed by its value: ``... k7 v7 k2 v2 ...``. The model must
predict every value of the second half, which sits up to L tokens back. A tiny dense
transformer (2 layers, SDPA attention, learned positions) is trained to near-perfect
accuracy, then run with

- DSA at top_k = L / 16 (indexers fitted, then calibrated on the dense attention),
- a sliding window of the same L / 16 keys,

and the accuracies are compared. A window cannot see the pair it needs; the indexer can
pick that one key out of hundreds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dsa_compile.calibrate import calibrate, fit_indexers
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import attention_override


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, L, dim]
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-norm blocks."""

    def __init__(self, vocab: int, length: int, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):  # ids: [B, L] -> logits [B, L, vocab]
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def mqar_batch(batch: int, pairs: int, keys: int, gen: torch.Generator):
    """ids int64 [B, 4 * pairs], targets int64 [B, 4 * pairs] (-100 except the recalled values).

    Keys are tokens 0..keys-1, values keys..2*keys-1.
    """
    k = torch.argsort(torch.rand(batch, keys, generator=gen), dim=1)[:, :pairs]
    v = torch.randint(keys, 2 * keys, (batch, pairs), generator=gen)
    order = torch.argsort(torch.rand(batch, pairs, generator=gen), dim=1)
    first = torch.stack([k, v], dim=2).reshape(batch, 2 * pairs)
    second = torch.stack([k.gather(1, order), v.gather(1, order)], dim=2).reshape(batch, 2 * pairs)
    ids = torch.cat([first, second], dim=1)
    targets = torch.full_like(ids, -100)
    # Position t predicts token t + 1: each second-half key predicts its value.
    targets[:, 2 * pairs : -1 : 2] = ids[:, 2 * pairs + 1 :: 2]
    return ids, targets


@torch.no_grad()
def accuracy(model, data, mode="dense", config=None) -> float:
    hits, total = 0, 0
    with attention_override(model, mode, config):
        for ids, targets in data:
            pred = model(ids).argmax(-1)
            mask = targets != -100
            hits += (pred[mask] == targets[mask]).sum().item()
            total += mask.sum().item()
    return hits / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=2500)
    parser.add_argument("--calib-steps", type=int, default=60)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pairs = args.length // 4
    model = TinyLM(2 * args.keys, args.length, dim=args.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.train_steps,
                                                pct_start=0.1)
    test = [mqar_batch(64, pairs, args.keys, gen) for _ in range(4)]
    t = time.perf_counter()
    for step in range(args.train_steps):
        ids, targets = mqar_batch(args.batch, pairs, args.keys, gen)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            model.eval()
            print(f"step {step + 1}: loss {loss.item():.4f}, dense accuracy "
                  f"{accuracy(model, test):.4f}", flush=True)
            model.train()
    model.eval()
    print(f"trained in {time.perf_counter() - t:.0f} s")

    top_k = args.length // 16
    # 2 indexer heads x 33 (8 dims per head group + bias): about half of QK^T per pair.
    config = DSAConfig(top_k=top_k, dense_below=0, index_heads=2, index_dim=33)
    calib = [mqar_batch(16, pairs, args.keys, gen)[0] for _ in range(8)]
    fit_indexers(model, calib[:1], config)
    dense = accuracy(model, test)
    window = accuracy(model, test, "window", config)
    fitted = accuracy(model, test, "dsa", config)
    t = time.perf_counter()
    calibrate(model, calib, config, steps=args.calib_steps, lr=3e-3, progress=False)
    calibrated = accuracy(model, test, "dsa", config)
    print(f"calibrated in {time.perf_counter() - t:.0f} s")
    recalled = sum((t != -100).sum().item() for _, t in test)
    print(f"\nL = {args.length}, top_k = window = {top_k} keys (L/16), {recalled} recalled values")
    print(f"  dense                  {dense:.4f}")
    print(f"  sliding window {top_k:<7} {window:.4f}")
    print(f"  DSA fitted (no train)  {fitted:.4f}")
    print(f"  DSA calibrated         {calibrated:.4f}   ({calibrated / dense:.4f} of dense)")


if __name__ == "__main__":
    main()
