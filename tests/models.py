"""A zoo of small attention models for the pass and backend tests.

Each builder returns ``(model, kwargs)`` with random weights (seeded by the caller),
in eval mode, fp32, with awkward lengths (11, 13) so nothing lines up by accident.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _hf(cls_name: str, config_name: str, attn: str, **cfg):
    import transformers

    config = getattr(transformers, config_name)(**cfg)
    config._attn_implementation = attn
    return getattr(transformers, cls_name)(config).eval()


def llama(attn: str = "sdpa", layers: int = 2, heads: int = 4, kv_heads: int = 2):
    return _hf("LlamaForCausalLM", "LlamaConfig", attn, vocab_size=64, hidden_size=32,
               intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, max_position_embeddings=4096, use_cache=False)


def gpt2(attn: str = "sdpa"):
    return _hf("GPT2LMHeadModel", "GPT2Config", attn, vocab_size=64, n_embd=32, n_layer=2,
               n_head=4, n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0)


def bert(attn: str = "sdpa"):
    return _hf("BertModel", "BertConfig", attn, vocab_size=64, hidden_size=32,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def token_inputs(batch: int = 2, length: int = 11, pad: int = 3):
    """input_ids [B, L] and an attention mask whose last row is left-padded by ``pad``."""
    ids = torch.randint(0, 64, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: fused qkv, tril buffer, masked_fill(-inf), softmax, @ v."""

    def __init__(self, dim: int = 32, heads: int = 4, block: int = 64):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class HandAttention(nn.Module):
    """Hand-written attention with switchable forms (the hypothesis tests drive these).

    scale_on: 'scores' | 'q' | 'div'; mask: 'none' | 'causal_where' | 'causal_add' |
    'padding' | 'causal_padding'; gqa: 'none' | 'repeat_kv' | 'repeat_interleave';
    product: 'matmul' | 'einsum'; upcast: softmax in float32 then cast back.
    """

    def __init__(self, dim=32, heads=4, kv_heads=2, scale_on="scores", mask="causal_where",
                 gqa="repeat_kv", product="matmul", upcast=False, bias=None):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.scale_on, self.mask, self.gqa, self.product, self.upcast = (
            scale_on, mask, gqa, product, upcast)
        self.bias = bias

    def forward(self, x, key_mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        n = self.h // self.hkv
        if self.gqa == "repeat_kv":
            k = k[:, :, None].expand(b, self.hkv, n, t, self.d).reshape(b, self.h, t, self.d)
            v = v[:, :, None].expand(b, self.hkv, n, t, self.d).reshape(b, self.h, t, self.d)
        elif self.gqa == "repeat_interleave":
            k = k.repeat_interleave(n, dim=1)
            v = v.repeat_interleave(n, dim=1)
        scale = self.d ** -0.5
        if self.scale_on == "q":
            q = q * scale
        if self.product == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        else:
            s = q @ k.transpose(-2, -1)
        if self.scale_on == "scores":
            s = s * scale
        elif self.scale_on == "div":
            s = s / math.sqrt(self.d)
        if self.bias is not None:
            s = s + self.bias
        pos = torch.arange(t, device=x.device)
        causal = pos[None, :] <= pos[:, None]
        if self.mask == "causal_where":
            s = torch.where(causal, s, float("-inf"))
        elif self.mask == "causal_add":
            s = s + torch.where(causal, 0.0, torch.finfo(s.dtype).min).to(s.dtype)
        if self.mask in ("padding", "causal_padding"):
            s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            if self.mask == "causal_padding":
                s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        p = s.float().softmax(-1).to(q.dtype) if self.upcast else s.softmax(-1)
        if self.product == "einsum":
            o = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            o = p @ v
        return o.transpose(1, 2).reshape(b, t, -1)


class SDPAAttention(nn.Module):
    """F.scaled_dot_product_attention with the flags under test."""

    def __init__(self, dim=32, heads=4, kv_heads=2, causal=True, mask=None, gqa=True,
                 scale=None, dropout=0.0):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.causal, self.mask, self.gqa, self.scale, self.dropout = (
            causal, mask, gqa, scale, dropout)

    def forward(self, x, key_mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if self.mask == "bool":
            mask = key_mask[:, None, None, :]
        elif self.mask == "additive":
            mask = torch.zeros(b, 1, 1, t).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        elif self.mask == "alibi":
            pos = torch.arange(t, dtype=torch.float32)
            mask = -(pos[None, :] - pos[:, None]).abs()[None, None] * 0.5
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale,
            enable_gqa=self.gqa, dropout_p=self.dropout,
        ).transpose(1, 2).reshape(b, t, -1)


class ReturnsScores(HandAttention):
    """Returns the attention probabilities too: the site must stay dense."""

    def forward(self, x, key_mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        p = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1)
        return (p @ v).transpose(1, 2).reshape(b, t, -1), p


class TrainingDropout(HandAttention):
    """Dropout with training=True on the probabilities: must stay dense."""

    def forward(self, x, key_mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        p = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)).softmax(-1)
        p = F.dropout(p, 0.5, training=True)
        return (p @ v.repeat_interleave(2, 1)).transpose(1, 2).reshape(b, t, -1)


class MHABlock(nn.Module):
    """nn.MultiheadAttention called the ways models call it (the MHA pass tests drive these).

    mask: 'none' | 'causal_bool' (triu of ones, built in forward) | 'causal_float'
    (generate_square_subsequent_mask in forward) | 'causal_buffer' (a float buffer, sliced)
    | 'input' (attn_mask is a forward argument) | 'alibi' (a float bias, not a mask) |
    'per_head' (3-D [B * H, L, S]). padding: 'bool' passes key_padding_mask on, 'float'
    turns it into 0 / -inf first. weights: 'off' (need_weights=False) | 'unused' (the
    default need_weights=True, weights dropped) | 'averaged' / 'per_head' (returned).
    ``cross``: keys and values come from ``memory`` (kdim/vdim from ``mha_kwargs``).
    """

    def __init__(self, dim=32, heads=4, batch_first=True, mask="none", padding="bool",
                 weights="off", is_causal=False, cross=False, max_len=64, **mha_kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, **mha_kwargs)
        self.mask, self.padding, self.weights, self.is_causal, self.cross = (
            mask, padding, weights, is_causal, cross)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(max_len))

    def forward(self, x, key_padding_mask=None, attn_mask=None, memory=None):
        kv = memory if self.cross else x
        seq = 1 if self.attn.batch_first else 0
        lq, lk = x.shape[seq], kv.shape[seq]
        if self.mask == "causal_bool":
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=x.device).triu(1)
        elif self.mask == "causal_float":
            attn_mask = nn.Transformer.generate_square_subsequent_mask(lq, device=x.device)
        elif self.mask == "causal_buffer":
            attn_mask = self.causal[:lq, :lk]
        elif self.mask == "alibi":
            pos = torch.arange(lq, device=x.device, dtype=x.dtype)
            attn_mask = -(pos[None, :] - pos[:, None]).abs() * 0.5
        elif self.mask == "per_head":
            batch = x.shape[1 - seq]
            attn_mask = torch.zeros(batch * self.attn.num_heads, lq, lk, device=x.device)
        if self.padding == "float" and key_padding_mask is not None:
            key_padding_mask = torch.zeros(key_padding_mask.shape, dtype=x.dtype).masked_fill(
                key_padding_mask, float("-inf"))
        out, w = self.attn(x, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           need_weights=self.weights != "off", is_causal=self.is_causal,
                           average_attn_weights=self.weights != "per_head")
        return (out, w) if self.weights in ("averaged", "per_head") else out


class NativeMHA(nn.Module):
    """nn.MultiheadAttention's fused fast path, called directly (dynamo never takes it).

    mask: 'padding' (mask_type 1) | 'causal_padding' (merge_masks' [B, H, L, L], type 2).
    """

    def __init__(self, dim=32, heads=4, mask="padding"):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mask = mask

    def forward(self, x, key_padding_mask):
        a = self.attn
        pad = torch.zeros(key_padding_mask.shape, dtype=x.dtype).masked_fill(
            key_padding_mask, float("-inf"))
        causal = None
        if self.mask == "causal_padding":
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        mask, mask_type = a.merge_masks(causal, pad, x)
        return torch._native_multi_head_attention(
            x, x, x, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias,
            a.out_proj.weight, a.out_proj.bias, mask, False, True, mask_type)[0]


class Encoder(nn.Module):
    """nn.TransformerEncoder; ``causal`` ('float': generate_square_subsequent_mask, 'bool':
    triu of ones) builds the mask in forward and passes is_causal=True."""

    def __init__(self, dim=32, heads=4, layers=2, batch_first=True, causal=None,
                 norm_first=False, activation="relu", nested=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1,
                                           activation=activation, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)
        self.batch_first, self.causal = batch_first, causal

    def forward(self, x, key_padding_mask=None):
        length = x.shape[1] if self.batch_first else x.shape[0]
        mask = None
        if self.causal == "float":
            mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        elif self.causal == "bool":
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        return self.encoder(x, mask=mask, src_key_padding_mask=key_padding_mask,
                            is_causal=mask is not None)
