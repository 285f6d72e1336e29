"""The model: a LLaMA-3-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU), read top to bottom.

Parameter names follow Meta's Llama-3 `model.py` (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so loading Meta checkpoints needs no
table and Hugging Face checkpoints need a short one (nano/convert.py). RoPE uses the "rotate half"
layout of Hugging Face checkpoints; convert.py permutes Meta's interleaved q/k weights into it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from nano.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (bf16 has too few mantissa bits for the mean of squares), scale in x's dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


# -----------------------------------------------------------------------------
# Rotary position embedding

def rope_inv_freq(dim, theta, scaling=None):
    """Inverse frequencies of RoPE (Su et al. 2021), with Llama-3.1's frequency scaling.

    Llama-3.1 scaling leaves high frequencies (wavelength < original_len / high_freq_factor)
    alone, divides low frequencies (wavelength > original_len / low_freq_factor) by `factor`, and
    interpolates smoothly in between. That extends the context without retraining short-range heads.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return inv_freq.float()
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: low-frequency end, 1: high
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.float()


def rope_cos_sin(positions, inv_freq):
    """cos/sin tables for integer positions of any shape: returns (*positions.shape, dim)."""
    freqs = positions.float()[..., None] * inv_freq  # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); cos/sin: (B, T, D). Rotate-half layout: pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def positions_from_cu_seqlens(cu_seqlens, total):
    """Position of each of `total` tokens within its document: restarts at 0 at every boundary."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.to(torch.int64), idx, right=True) - 1
    return idx - cu_seqlens.to(torch.int64)[doc]


# -----------------------------------------------------------------------------
# Attention

class KVCache(nn.Module):
    """Keys and values of past tokens for decoding, (B, Hkv, max_len, D) buffers.

    Every row keeps its own length: new entries are written at explicit positions, and a query at
    position p sees the cache entries 0..p. Rolling back (speculative decoding) is therefore only a
    matter of decoding from an earlier position again; stale entries beyond it are masked, then
    overwritten.
    """

    def __init__(self, batch_size, max_len, n_kv_head, k_dim, v_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch_size, n_kv_head, max_len, k_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(batch_size, n_kv_head, max_len, v_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, pos, k, v):
        """pos: (B, T) positions of the new tokens; k, v: (B, T, Hkv, D). Returns the whole cache."""
        rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self.k[rows, :, pos] = k.to(self.k.dtype)  # advanced indices first: the value is (B, T, Hkv, D)
        self.v[rows, :, pos] = v.to(self.v.dtype)
        return self.k, self.v


def cached_attention(q, k, v, pos, scale):
    """Decode-time attention of new queries q (B, T, Hq, D) at positions pos (B, T) over a cache
    k, v (B, Hkv, L, D): query at position p sees cache entries 0..p. Returns (B, T, Hq, Dv)."""
    mask = torch.arange(k.shape[2], device=q.device) <= pos[:, :, None]  # (B, T, L)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                       scale=scale, enable_gqa=k.shape[1] != q.shape[2])
    return y.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) with optional QK-norm (Qwen3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.impl = config.attn_impl
        self.wq = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.cache = None  # a KVCache while decoding (Transformer.setup_cache)

    def setup_cache(self, batch_size, max_len, dtype, device):
        self.cache = KVCache(batch_size, max_len, self.n_kv_head, self.head_dim, self.head_dim, dtype, device)

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, pos=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:  # per-head norm before RoPE, as in Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if pos is not None:  # decoding: append to the cache and attend over it
            k, v = self.cache.update(pos, k, v)
            y = cached_attention(q, k, v, pos, 1.0 / math.sqrt(self.head_dim))
        else:
            y = attend(q, k, v, cu_seqlens, max_seqlen, self.impl)
        return self.wo(y.reshape(B, T, -1))


def attend(q, k, v, cu_seqlens, max_seqlen, impl, softmax_scale=None):
    """Causal attention of (B, T, H, D) tensors, packed documents kept apart when cu_seqlens is given."""
    fn = kernels.attention_reference if impl == "reference" else kernels.flash_attention
    if cu_seqlens is None:
        return fn(q, k, v, causal=True, softmax_scale=softmax_scale)
    B, T = q.shape[:2]
    flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731 - varlen layout (total, H, D)
    y = fn(flat(q), flat(k), flat(v), causal=True, softmax_scale=softmax_scale,
           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return y.view(B, T, *y.shape[1:])


# -----------------------------------------------------------------------------
# Feed-forward

class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.recompute_act = False  # selective checkpointing: recompute silu(a) * b in the backward
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        if self.recompute_act and torch.is_grad_enabled():
            return self.w2(checkpoint(swiglu, a, b, use_reentrant=False))
        return self.w2(swiglu(a, b))


def swiglu(a, b):
    return F.silu(a) * b


# -----------------------------------------------------------------------------
# Block and model

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = MLP(config.n_embd, config.intermediate_size)
        self.grad_ckpt = "none"  # set by Transformer.set_grad_ckpt

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, pos=None):
        if self.grad_ckpt == "full" and torch.is_grad_enabled():
            # keep only the block's input; recompute everything inside it during the backward
            return checkpoint(self._forward, x, rope, cu_seqlens, max_seqlen, pos, use_reentrant=False)
        return self._forward(x, rope, cu_seqlens, max_seqlen, pos)

    def _forward(self, x, rope, cu_seqlens, max_seqlen, pos):
        x = x + self.attention(self._norm(self.attention_norm, x), rope, cu_seqlens, max_seqlen, pos)
        return x + self.feed_forward(self._norm(self.ffn_norm, x))

    def _norm(self, norm, x):
        # selective checkpointing recomputes the norms (cheap, elementwise) instead of storing
        # their fp32 intermediates; the matmul outputs are kept
        if self.grad_ckpt == "selective" and torch.is_grad_enabled():
            return checkpoint(norm, x, use_reentrant=False)
        return norm(x)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.init_weights()

    def _inv_freq(self):
        return rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every tensor (also after building on the meta device and `to_empty`).

        - tok_embeddings, and output when untied: normal(0, 0.02) (GPT-2).
        - every Linear: normal(0, 0.02); the projections that write into the residual stream
          (attention.wo, feed_forward.w2) use 0.02 / sqrt(2 * n_layer), so the residual's variance
          does not grow with depth (GPT-2, section 2.3).
        - RMSNorm weights: 1.
        - inv_freq (RoPE buffer): recomputed from the config.
        """
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, resid_std if name.endswith(("wo", "w2")) else std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.inv_freq.copy_(self._inv_freq().to(self.inv_freq.device))

    def set_grad_ckpt(self, mode):
        """Gradient checkpointing: "none", "full" (recompute each block in the backward, keep only
        block inputs) or "selective" (recompute norms and the SwiGLU activation, keep matmul outputs)."""
        for layer in self.layers:
            layer.grad_ckpt = mode
            if hasattr(layer.feed_forward, "recompute_act"):
                layer.feed_forward.recompute_act = mode == "selective"

    # ---- decoding state

    def setup_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """Allocate a KV cache in every attention layer; forward then takes `start_pos`."""
        p = self.output.weight
        for layer in self.layers:
            layer.attention.setup_cache(batch_size, max_len or self.config.max_seq_len, dtype or p.dtype,
                                        device or p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    # ---- forward

    def forward(self, idx, targets=None, *, cu_seqlens=None, start_pos=None):
        """idx (B, T) int64 -> (logits (B, T, V), loss or None).

        cu_seqlens: int32 (N+1,) document boundaries over the flattened B*T tokens; no token attends
            across a boundary and RoPE positions restart at each one.
        start_pos: with a KV cache (setup_cache), the position of idx[:, 0] in each row: an int or a
            (B,) tensor (rows may be at different lengths).
        """
        h = self.hidden_states(idx, cu_seqlens=cu_seqlens, start_pos=start_pos)
        if targets is None:
            return self.output(h), None
        return self.lm_loss(h, targets)

    def lm_loss(self, h, targets):
        """(logits or None, mean cross-entropy) of hidden states h (B, T, D) against targets (B, T);
        -100 targets are ignored. On CUDA (fused_ce) the loss comes from kernels.linear_cross_entropy,
        which never materialises the (B*T, V) logits, and logits is None."""
        if self.config.fused_ce and h.is_cuda:
            return None, kernels.linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.reshape(-1))
        logits = self.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, idx, *, cu_seqlens=None, start_pos=None):
        """The final-norm hidden states (B, T, n_embd) that the LM head reads."""
        B, T = idx.shape
        pos, max_seqlen = None, None
        if start_pos is not None:
            start = torch.as_tensor(start_pos, device=idx.device).reshape(-1).expand(B)
            pos = start[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            positions = pos
        elif cu_seqlens is not None:
            positions = positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        else:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        rope = rope_cos_sin(positions, self.inv_freq)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, cu_seqlens, max_seqlen, pos)
        return self.norm(x)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n
