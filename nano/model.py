"""The model: a LLaMA-3-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU), read top to bottom, with
DeepSeek-V3's parts as options: MLA attention (attn="mla"), mixture-of-experts feed-forward layers
(n_routed_experts > 0, in nano/moe.py) and multi-token prediction modules (mtp_depth > 0).

Parameter names follow Meta's Llama-3 `model.py` (tok_embeddings, layers.N.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so loading Meta checkpoints needs no
table and Hugging Face checkpoints need a short one (nano/convert.py). The DeepSeek parts take the names
of DeepSeek's own inference code (attention.wq_a/q_norm/wq_b/wkv_a/kv_norm/wkv_b, feed_forward.gate,
.experts, .shared_experts) plus mtp.K.enorm/hnorm/eh_proj/block/norm. RoPE uses the "rotate half"
layout of Hugging Face checkpoints; convert.py permutes interleaved (Meta, DeepSeek) q/k weights into it.
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import kernels
from nano import moe
from nano.config import ModelConfig
from nano.moe import MoE, swiglu


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


def check_cu_seqlens(cu_seqlens, B, T):
    """One-line errors for document boundaries that break forward's contract. Reads host memory only:
    a CUDA tensor is not checked (that would be a device sync; train.py's loader builds it correct)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_cuda:
        return
    cu = cu_seqlens.numpy()
    if not (len(cu) >= 2 and cu[0] == 0 and cu[-1] == B * T and (cu[1:] >= cu[:-1]).all()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to B*T = {B * T}, got "
                         f"{cu[:8].tolist()}{'...' if len(cu) > 8 else ''}")


@dataclass
class Context:
    """What every block of one forward shares, built once per forward by Transformer.

    mode: "train" (no cache: training, evaluation, scoring a sequence), "prefill" (prompts from position
        0: attend with the kernel over the new tokens, write them to the cache) or "decode" (the new
        tokens attend over the cache).
    rope: (cos, sin), each (B, T, rope_dim), at each token's position.
    cu_seqlens, max_seqlen: packed document boundaries over the flattened B*T tokens (train mode).
    slots: (B, T) cache slots the new tokens are written to (prefill, decode).
    mask: (B, T, L) which of the cache's L slots each new token sees (decode).
    A token's position (rope) and its cache slot are separate, and the mask is any pattern: tree-shaped
    verification (siblings at one position in their own slots, each seeing its ancestors) fits.
    """
    mode: str
    rope: tuple
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


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

    def move(self, src, dst):
        """Copy the entries at slots src (B, n) to slots dst (B, n) (tree speculation's accepted path)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        self.k[rows, :, dst] = self.k[rows, :, src]  # the gather copies first, so overlaps are safe
        self.v[rows, :, dst] = self.v[rows, :, src]

    def update(self, slots, k, v):
        """slots: (B, T) cache slots of the new tokens; k, v: (B, T, Hkv, D). Returns the whole cache."""
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.k[rows, :, slots] = k.to(self.k.dtype)  # advanced indices first: the value is (B, T, Hkv, D)
        self.v[rows, :, slots] = v.to(self.v.dtype)
        return self.k, self.v


def cached_attention(q, k, v, mask, scale):
    """Decode-time attention of new queries q (B, T, Hq, D) over a cache k, v (B, Hkv, L, D); mask
    (B, T, L) says which slots each query sees. Returns (B, T, Hq, Dv)."""
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

    def forward(self, x, ctx: Context):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:  # per-head norm before RoPE, as in Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.mode == "decode":  # append to the cache and attend over it
            k, v = self.cache.update(ctx.slots, k, v)
            y = cached_attention(q, k, v, ctx.mask, 1.0 / math.sqrt(self.head_dim))
        else:
            if ctx.mode == "prefill":  # the prompt: fill the cache, attend with the kernel
                self.cache.update(ctx.slots, k, v)
            y = attend(q, k, v, ctx, self.impl)
        return self.wo(y.reshape(B, T, -1))


def attend(q, k, v, ctx, impl, softmax_scale=None):
    """Causal attention of (B, T, H, D) tensors, packed documents kept apart when ctx has cu_seqlens.
    Calls the attention op without argument checks: forward checked cu_seqlens once for all layers."""
    if impl == "reference":
        fn = kernels.attention_reference
    else:
        fn = partial(kernels.attention, row_len=q.shape[1])  # every row starts a document
    if ctx.cu_seqlens is None:
        return fn(q, k, v, causal=True, softmax_scale=softmax_scale)
    B, T = q.shape[:2]
    flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731 - varlen layout (total, H, D)
    y = fn(flat(q), flat(k), flat(v), causal=True, softmax_scale=softmax_scale,
           cu_seqlens=ctx.cu_seqlens, max_seqlen=ctx.max_seqlen)
    return y.view(B, T, *y.shape[1:])


class LatentCache(nn.Module):
    """MLA's decode cache: per token only the normalised KV latent c (kv_lora_rank) and the RoPE key
    (qk_rope_head_dim), both shared by all heads, in one (B, 1, max_len, r + d_rope) buffer. Read whole,
    it is the key of a single-head attention; its first r channels are the value. Same position rules
    as KVCache (per-row positions, stale entries masked)."""

    def __init__(self, batch_size, max_len, dim, dtype, device):
        super().__init__()
        self.register_buffer("kv", torch.zeros(batch_size, 1, max_len, dim, dtype=dtype, device=device),
                             persistent=False)

    def move(self, src, dst):
        """Copy the entries at slots src (B, n) to slots dst (B, n), like KVCache.move."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        self.kv[rows, 0, dst] = self.kv[rows, 0, src]

    def update(self, slots, kv):
        """slots (B, T); kv (B, T, r + d_rope). Returns the whole cache."""
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.kv[rows, 0, slots] = kv.to(self.kv.dtype)
        return self.kv


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1; used by DeepSeek-V3).

    Keys and values of all heads are up-projected (wkv_b) from one small latent c = kv_norm(W_DKV x)
    per token; RoPE would not commute with that up-projection, so position goes through a separate
    qk_rope_head_dim key k_pe shared by all heads, and each head's query/key is [nope part, rope part].
    The query is low-rank too when q_lora_rank > 0 (wq_a -> q_norm -> wq_b), else one wq.

    Training and prefill expand per-head K (Dqk = nope + rope) and V (Dv = v_head_dim) and call the
    attention kernel. Decoding caches only [c, k_pe] and uses the absorbed form (DeepSeek-V2, appendix
    C): q_nope . (W_UK c) = (W_UK^T q_nope) . c, so W_UK is folded into the query and the heads attend
    to the latent itself, as one shared key [c, k_pe] and value c (MQA with Dqk = r + rope, Dv = r);
    W_UV is applied to the attention output. No per-head K/V is ever built for the cached tokens.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.impl = config.n_head, config.attn_impl
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank, self.q_lora = config.kv_lora_rank, config.q_lora_rank
        qk_dim = self.nope + self.rope
        self.scale = qk_dim ** -0.5
        H, D = self.n_head, config.n_embd
        # the latent norms use eps 1e-6 whatever norm_eps is, as DeepSeek's code and checkpoints do
        if config.q_lora_rank:
            self.wq_a = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, 1e-6)
            self.wq_b = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.rank + self.rope, bias=False)  # -> [c, k_pe]
        self.kv_norm = RMSNorm(self.rank, 1e-6)
        self.wkv_b = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)  # c -> [k_nope, v] / head
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.cache = None  # a LatentCache while decoding (Transformer.setup_cache)

    def setup_cache(self, batch_size, max_len, dtype, device):
        self.cache = LatentCache(batch_size, max_len, self.rank + self.rope, dtype, device)

    def forward(self, x, ctx: Context):
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora else self.wq(x)
        q_nope, q_pe = q.view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, *ctx.rope)
        c, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        c = self.kv_norm(c)  # (B, T, r)
        k_pe = apply_rope(k_pe[:, :, None], *ctx.rope)  # (B, T, 1, rope): one RoPE key for all heads
        if ctx.mode == "decode":
            y = self._absorbed(q_nope, q_pe, torch.cat([c, k_pe[:, :, 0]], dim=-1), ctx)
        else:
            if ctx.mode == "prefill":  # the prompt: cache the latents, attend in the expanded form
                self.cache.update(ctx.slots, torch.cat([c, k_pe[:, :, 0]], dim=-1))
            k_nope, v = self.wkv_b(c).view(B, T, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(B, T, self.n_head, self.rope)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            y = attend(q, k, v, ctx, self.impl, softmax_scale=self.scale)  # (B, T, H, Dv)
        return self.wo(y.reshape(B, T, -1))

    def _absorbed(self, q_nope, q_pe, latent, ctx):
        """Decode over the latent cache: q parts (B, T, H, .), latent [c, k_pe] (B, T, r + rope)
        -> (B, T, H, Dv)."""
        w = self.wkv_b.weight.view(self.n_head, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # (H, nope, r), (H, Dv, r)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # W_UK folded into the query
        kv = self.cache.update(ctx.slots, latent)  # (B, 1, L, r + rope)
        y = cached_attention(torch.cat([q_lat, q_pe], dim=-1), kv, kv[..., :self.rank], ctx.mask, self.scale)
        return torch.einsum("bthr,hvr->bthv", y, w_uv)  # W_UV after attention


# -----------------------------------------------------------------------------
# Feed-forward

class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


# -----------------------------------------------------------------------------
# Block and model

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = MLA(config) if config.attn == "mla" else Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        if config.n_routed_experts and layer_id >= config.first_k_dense_replace:
            shared = None
            if config.n_shared_experts:  # DeepSeek-V3 runs its shared experts as one wider MLP
                shared = MLP(config.n_embd, config.moe_intermediate_size * config.n_shared_experts)
            self.feed_forward = MoE(config, shared)
        else:
            self.feed_forward = MLP(config.n_embd, config.intermediate_size)
        self.moe = isinstance(self.feed_forward, MoE)

    def forward(self, x, ctx: Context):
        """-> (x, aux): aux is the MoE layer's routing record (moe.MoEAux), None in a dense block."""
        x = x + self.attention(self.attention_norm(x), ctx)
        h = self.ffn_norm(x)
        y, aux = self.feed_forward(h) if self.moe else (self.feed_forward(h), None)
        return x + y, aux


class MTP(nn.Module):
    """DeepSeek-V3 multi-token prediction module k (arXiv 2412.19437, section 2.2). From the hidden state
    h_{k-1} at position t (module k-1's output; the main model's final-norm hidden state for k = 1) and
    the embedding of token t+k, it predicts token t+k+1:

        h_k = norm(block(eh_proj([enorm(emb(x_{t+k})), hnorm(h_{k-1})])))    logits = output(h_k)

    The embedding and the LM head are the main model's; the two input norms, the projection, the block
    and the final norm are the module's own. The layout (embedding first in the concatenation, a final
    norm per module: `shared_head.norm` in DeepSeek's checkpoints) is that of DeepSeek-V3's released
    weights and of transformers' MtpLayer.
    """

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(config.n_embd, config.norm_eps)
        self.hnorm = RMSNorm(config.n_embd, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block = Block(config, layer_id)  # layer_id >= n_layer: a MoE block when the model has experts
        self.norm = RMSNorm(config.n_embd, config.norm_eps)

    def project(self, h, emb):
        """The block's input; Transformer runs the block (checkpointed like the others) and self.norm."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))


def _keep_expensive(ctx, func, *args, **kwargs):
    """Selective checkpointing's policy (torchtitan's idea): keep what costs FLOPs to recompute, the
    matmuls and the attention op, and recompute the elementwise rest, whose outputs are most of the
    bytes a block would otherwise keep."""
    keep = func in _EXPENSIVE_OPS
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


_EXPENSIVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                  torch.ops.aten._grouped_mm.default, torch.ops.nano.flash_attn.default}


def _shift_left(t, k, fill):
    """t (B, T) -> t[:, k:] padded back to T columns with `fill`."""
    return torch.cat([t[:, k:], t.new_full((t.shape[0], min(k, t.shape[1])), fill)], dim=1)


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
        # run only by the loss (targets given) and by mtp_draft: plain decoding never touches them
        self.mtp = nn.ModuleList(MTP(config, config.n_layer + k) for k in range(config.mtp_depth))
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.loss_terms = {}  # detached parts of the last loss: "lm", and "mtp" / "balance" when on
        self.grad_ckpt = "none"  # set_grad_ckpt
        self.cache_len = None  # slots of the decode caches (setup_cache)
        self.init_weights()

    def _inv_freq(self):
        c = self.config
        dim = c.qk_rope_head_dim if c.attn == "mla" else c.head_dim
        return rope_inv_freq(dim, c.rope_theta, c.rope_scaling)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every tensor (also after building on the meta device and `to_empty`).

        - tok_embeddings, and output when untied: normal(0, 0.02) (GPT-2).
        - every Linear: normal(0, 0.02) (attention wq/wk/wv, MLA wq or wq_a/wq_b, wkv_a, wkv_b, MLP and
          shared-expert w1/w3, MTP eh_proj); the projections that write into the residual stream
          (attention.wo, feed_forward.w2, shared_experts.w2) use 0.02 / sqrt(2 * n_layer), so the
          residual's variance does not grow with depth (GPT-2, section 2.3).
        - MoE (MoE.init_weights): router gate.weight normal(0, 0.02), gate.expert_bias 0; routed
          experts.w1/w3 normal(0, 0.02), experts.w2 0.02 / sqrt(2 * n_layer) (a residual write).
        - RMSNorm weights (incl. MLA q_norm/kv_norm and MTP enorm/hnorm/norm): 1.
        - buffers: inv_freq (RoPE) recomputed from the config; MoE load counters cleared.
        """
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, resid_std if name.endswith(("wo", "w2")) else std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, MoE):
                m.init_weights(std, resid_std)
        self.inv_freq.copy_(self._inv_freq().to(self.inv_freq.device))

    @torch.no_grad()
    def grow_vocab(self, vocab_size):
        """Append embedding (and untied head) rows for new tokens, e.g. the chat special tokens of a
        fine-tune, each the mean of the existing rows: a new token starts as an average token rather than
        noise, and its logit does not swamp the others (Hewitt 2021, "Initializing new word embeddings")."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return

        def grown(w):
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            return nn.Parameter(torch.cat([w, mean.expand(vocab_size - old, -1)]), requires_grad=w.requires_grad)
        self.tok_embeddings.weight = grown(self.tok_embeddings.weight)
        self.output.weight = (self.tok_embeddings.weight if self.config.tie_embeddings
                              else grown(self.output.weight))
        self.tok_embeddings.num_embeddings = self.output.out_features = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)

    def set_grad_ckpt(self, mode):
        """Gradient checkpointing of every block (the MTP modules' too), decided here and nowhere else:
        "none"; "full" keeps only each block's input and recomputes the block in the backward;
        "selective" keeps the outputs of the matmuls and of the attention op (the expensive ones) and
        recomputes everything else in the block (norms, RoPE, SwiGLU, routing arithmetic)."""
        self.grad_ckpt = mode

    def _blocks(self):
        return list(self.layers) + [m.block for m in self.mtp]

    def _block(self, block, x, ctx):
        """Run one block under the checkpointing mode: -> (x, MoE aux or None)."""
        if self.grad_ckpt == "none" or not torch.is_grad_enabled():
            return block(x, ctx)
        kw = {}
        if self.grad_ckpt == "selective":
            kw["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_expensive)
        return checkpoint(block, x, ctx, use_reentrant=False, **kw)

    # ---- decoding state

    def setup_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """Allocate a KV cache in every attention layer (the MTP modules' too, for mtp_draft); forward
        then takes `start_pos`."""
        p = self.output.weight
        self.cache_len = max_len or self.config.max_seq_len
        for block in self._blocks():
            block.attention.setup_cache(batch_size, self.cache_len, dtype or p.dtype, device or p.device)

    def move_cache(self, src, dst):
        """Copy the main layers' cache entries at slots src (B, n) to slots dst (B, n): after a tree
        verify forward, the accepted path moves from its nodes' slots to the slots of its positions."""
        for layer in self.layers:
            layer.attention.cache.move(src, dst)

    def clear_cache(self):
        self.cache_len = None
        for block in self._blocks():
            block.attention.cache = None

    def kv_cache_bytes_per_token(self, dtype=torch.bfloat16):
        """Decode-cache bytes per token over the main layers: 2 * n_kv_head * head_dim numbers per layer
        for GQA, kv_lora_rank + qk_rope_head_dim for MLA (the latent and the shared RoPE key)."""
        c = self.config
        per_layer = c.kv_lora_rank + c.qk_rope_head_dim if c.attn == "mla" else 2 * c.n_kv_head * c.head_dim
        return c.n_layer * per_layer * torch.empty((), dtype=dtype).element_size()

    # ---- forward

    def forward(self, idx, targets=None, *, cu_seqlens=None, max_seqlen=None, start_pos=None, prefill=False,
                tree=None, reduction="mean"):
        """idx (B, T) int64 -> (logits (B, T, V), loss or None).

        cu_seqlens: int32 (N+1,) document boundaries over the flattened B*T tokens; every row start is a
            boundary too, listed or not. No token attends across a boundary and RoPE positions restart at
            each one. Checked here when it lies in host memory (a CUDA tensor would cost a sync:
            train.py's loader makes it right).
        max_seqlen: the longest document, a host int; only a tuning hint for the kernel (its autotuning
            bucket), T (which bounds every document piece of a row) when not given, which is what
            train.py does: a new value per batch would be a new graph input.
        prefill: the prompts idx start at position 0 in every row: attend with the kernel and fill the
            KV cache (setup_cache).
        start_pos: decode with the KV cache: idx[:, 0] is at this position, an int or a (B,) tensor (rows
            may be at different lengths).
        tree: decode with the KV cache at explicit (positions (B, T), slots (B, T), mask (B, T, L)): token
            j gets RoPE position positions[:, j], is written to cache slot slots[:, j] and sees the slots
            where mask[:, j] is True (its own included). Tree speculation's verify forward: siblings
            share a position, each node has its own slot and sees the prefix and its ancestors only.
        With targets, loss = cross-entropy + mtp_weight * mean of the MTP modules' cross-entropies (when
        mtp_depth > 0) + the MoE balance losses (when aux_loss_alpha > 0); on CUDA with fused_ce the
        logits are None (see lm_loss). `self.loss_terms` then holds the detached parts ("lm", "mtp",
        "balance"): a validation loss comparable across models with and without MTP is loss_terms["lm"].
        reduction="none" (with targets): loss is each token's cross-entropy (B, T), 0 at -100 targets, and
        nothing else (no MTP or balance term): DPO's per-token log-probs are minus these. It goes through
        forward, not a side method, so that DDP, FSDP and torch.compile wrap it like the training loss.
        In training mode, each forward adds the tokens every MoE layer routed to each expert to the
        counters that update_moe_bias() consumes. No host sync anywhere on the training path.
        """
        ctx = self._context(idx, cu_seqlens, max_seqlen, start_pos, prefill, tree)
        h, aux = self._trunk(idx, ctx)
        if targets is None:
            logits, loss = self.output(h), None
        elif reduction == "none":
            logits, loss = self.lm_loss(h, targets, reduction="none")
        else:
            logits, loss = self.lm_loss(h, targets)
            terms = {"lm": loss.detach()}
            if len(self.mtp):
                mtp_loss, mtp_aux = self._mtp_loss(h, idx, targets, ctx)
                aux += mtp_aux
                terms["mtp"] = mtp_loss.detach()
                loss = loss + self.config.mtp_weight * mtp_loss
            balance = moe.balance_loss(aux)
            if balance is not None:
                terms["balance"] = balance.detach()
                loss = loss + balance
            self.loss_terms = terms
        if self.training:
            moe.record_loads([b.feed_forward for b in self._blocks()], aux)
        return logits, loss

    def lm_loss(self, h, targets, reduction="mean"):
        """(logits or None, cross-entropy) of hidden states h (B, T, D) against targets (B, T); -100
        targets are ignored. reduction "mean" or "none" (per token, (B, T), 0 where ignored). On CUDA
        (fused_ce) the loss comes from kernels.linear_cross_entropy, which never materialises the (B*T, V)
        logits, and logits is None."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if self.config.fused_ce and h.is_cuda:
            loss = kernels.linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.reshape(-1),
                                                reduction=reduction)
            return None, loss.view(targets.shape) if reduction == "none" else loss
        logits = self.output(h)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100,
                               reduction=reduction)
        return logits, loss.view(targets.shape) if reduction == "none" else loss

    def hidden_states(self, idx, *, cu_seqlens=None, max_seqlen=None, start_pos=None, prefill=False, tree=None):
        """The final-norm hidden states (B, T, n_embd) that the LM head (and MTP module 1) reads."""
        return self._trunk(idx, self._context(idx, cu_seqlens, max_seqlen, start_pos, prefill, tree))[0]

    def _context(self, idx, cu_seqlens, max_seqlen, start_pos, prefill, tree=None):
        """The forward's Context: its mode, from the arguments that name it, and what the mode needs."""
        B, T = idx.shape
        steps = torch.arange(T, device=idx.device)
        if (prefill or start_pos is not None or tree is not None) and self.cache_len is None:
            raise ValueError("prefill / start_pos / tree decode with the KV cache: call model.setup_cache(...) first")
        if tree is not None:
            if prefill or start_pos is not None or cu_seqlens is not None:
                raise ValueError("tree=(positions, slots, mask) is a decode of its own: pass no prefill, "
                                 "start_pos or cu_seqlens")
            positions, slots, mask = tree
            return Context("decode", self._rope(positions), slots=slots, mask=mask)
        if prefill:
            if start_pos is not None or cu_seqlens is not None:
                raise ValueError("prefill starts every row at position 0: pass no start_pos or cu_seqlens")
            slots = steps.expand(B, T)
            return Context("prefill", self._rope(slots), slots=slots)
        if start_pos is not None:
            if cu_seqlens is not None:
                raise ValueError("decoding with start_pos takes no cu_seqlens (one sequence per row)")
            start = torch.as_tensor(start_pos, device=idx.device).reshape(-1, 1).expand(B, 1)
            slots = start + steps  # (B, T): the chain's slot is its position
            mask = torch.arange(self.cache_len, device=idx.device) <= slots[:, :, None]  # (B, T, L)
            return Context("decode", self._rope(slots), slots=slots, mask=mask)
        if cu_seqlens is None:
            return Context("train", self._rope(steps.expand(B, T)))
        if not torch.compiler.is_compiling():
            check_cu_seqlens(cu_seqlens, B, T)
        # every row start is a boundary, listed or not: merge them in (a repeated one is an empty
        # document, which the kernels skip), a fixed N + 1 + B entries, no sync
        row_starts = torch.arange(0, B * T, T, device=idx.device, dtype=torch.int32)
        cu_seqlens = torch.cat([cu_seqlens.to(device=idx.device, dtype=torch.int32), row_starts]).sort().values
        positions = positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
        return Context("train", self._rope(positions), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen or T)

    def _rope(self, positions):
        return rope_cos_sin(positions, self.inv_freq)

    def _trunk(self, idx, ctx):
        """-> (final-norm hidden states, [MoE aux or None per layer])."""
        x, aux = self.tok_embeddings(idx), []
        for layer in self.layers:
            x, a = self._block(layer, x, ctx)
            aux.append(a)
        return self.norm(x), aux

    def _mtp_module(self, module, h, tokens, ctx):
        """MTP module `module` on h_{k-1} and the tokens it reads -> (h_k, MoE aux or None)."""
        x, aux = self._block(module.block, module.project(h, self.tok_embeddings(tokens)), ctx)
        return module.norm(x), aux

    # ---- multi-token prediction

    def _mtp_loss(self, h, idx, targets, ctx):
        """Mean over k = 1..mtp_depth of module k's cross-entropy -> (loss, [MoE aux per module]). At
        position t module k reads token t+k and is scored on token t+k+1, i.e. on targets[t+k]. That
        target counts only if the chain stays inside one document of the row: targets[t..t+k] are all
        kept (not -100; packed loaders put -100 where a document ends) and, with cu_seqlens, tokens t
        and t+k+1 are in one document. Positions past the end of the row read token 0 and have no
        target; causal attention keeps them from influencing any position that has one. A module with
        no target at all (a row of one-token documents) is left out of the mean, on the device."""
        B, T = idx.shape
        kept = targets != -100
        ok, doc = kept, None
        if ctx.cu_seqlens is not None:
            flat = torch.arange(B * T, device=idx.device)
            doc = torch.searchsorted(ctx.cu_seqlens.to(torch.int64), flat, right=True).view(B, T)
        total, counted, aux = 0.0, 0, []
        for k, module in enumerate(self.mtp, 1):
            ok = ok & _shift_left(kept, k, False)
            if doc is not None:
                ok = ok & (_shift_left(doc, k + 1, -1) == doc)  # the target is token t+k+1
            h, a = self._mtp_module(module, h, _shift_left(idx, k, 0), ctx)
            aux.append(a)
            loss = self.lm_loss(h, _shift_left(targets, k, -100).masked_fill(~ok, -100))[1]
            has = ok.any()
            total = total + torch.where(has, loss, 0.0)  # the NaN of an empty mean has zero gradient here
            counted = counted + has
        return total / torch.clamp(counted, min=1), aux

    def mtp_draft(self, h, tokens, *, start_pos=None, depth=1):
        """Draft logits from MTP module `depth`, for speculative decoding: (logits (B, T, V), h_depth).

        h (B, T, D): hidden states at positions p..p+T-1: for depth 1 the main model's
            `hidden_states()` (final norm applied), for depth k > 1 the h_{k-1} returned by the call
            for depth k-1 at the same positions.
        tokens (B, T): for each of those positions q, the token at q + depth.
        logits[:, j] is module `depth`'s distribution for the token at position p + j + depth + 1.

        With start_pos (an int or (B,) tensor, = p), the module's block uses its own KV cache, allocated
        by setup_cache() beside the main layers' (same rules: per-row positions, a query at position q
        sees entries 0..q, rolling back = calling again from an earlier position), so each call needs
        only the new positions. Without start_pos the module recomputes: it attends over the T given
        positions only, which must then be the whole prefix from position 0.

        Example: the main model has read x_0..x_n (h = its hidden states there) and sampled x_{n+1}.
        Module 1 at position n reads h_n and x_{n+1}: `logits, h1 = model.mtp_draft(h[:, n:n+1],
        x[:, n+1:n+2], start_pos=n)` (with the cache, positions before n must have been fed earlier),
        and logits[:, -1] drafts x_{n+2}. Module 2 at position n reads h1 and that draft, and drafts
        x_{n+3}. A module's entry at position t depends on the tokens up to t + depth: after a rejection,
        feed it again from the first position whose tokens changed.
        """
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"depth must be in 1..{len(self.mtp)} (the model's mtp_depth), got {depth}")
        ctx = self._context(tokens, None, None, start_pos, False)
        h = self._mtp_module(self.mtp[depth - 1], h, tokens, ctx)[0]
        return self.output(h), h

    # ---- MoE load balancing (train.py calls these; no-ops for dense models)

    def _moe(self):
        """(name, MoE module) of every MoE layer, the MTP modules' included."""
        named = [(f"layer{i}", b.feed_forward) for i, b in enumerate(self.layers)]
        named += [(f"mtp{k}", m.block.feed_forward) for k, m in enumerate(self.mtp)]
        return [(n, m) for n, m in named if isinstance(m, MoE)]

    @torch.no_grad()
    def update_moe_bias(self):
        """After each optimizer step: move every MoE layer's selection bias by the sign rule, using the
        expert loads counted by the training forwards since the last call (summed over all ranks under
        torch.distributed, so the replicas stay identical)."""
        moe.update_biases([m for _, m in self._moe()])

    def moe_stats(self):
        """Expert load balance for logging, as 0-d device tensors (read them with the step's other
        scalars): "moe/max_load", "moe/min_load" over all MoE layers and "moe/max_load/<layer>" per
        layer, each as load / mean load (1.0 = even), of the loads counted since the last
        update_moe_bias(), or those it used when called right after it. Empty for dense models."""
        return moe.load_stats(self._moe())

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n
