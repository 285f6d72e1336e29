"""Triton kernels with plain-PyTorch references beside them.

Dispatch: CUDA tensors run the fast path; CPU tensors run the PyTorch reference, except that with
TRITON_INTERPRET=1 set before import the Triton kernels run on CPU tensors (interpreted), which is how
the tests reach them. `FORCE_REFERENCE = True` (or the model's attn_impl="reference") forces the
references everywhere, for debugging.
"""
import math
import os

import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FORCE_REFERENCE = os.environ.get("NANO_FORCE_REFERENCE") == "1"


def _check_attention_args(q, k, v, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    want = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, T, H, D)"
    if not (q.dim() == k.dim() == v.dim() == want):
        raise ValueError(f"flash_attention: q, k, v must be {layout}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"flash_attention: q/k head dims or k/v shapes differ: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"flash_attention: Hkv ({k.shape[-2]}) must divide Hq ({q.shape[-2]})")
    if varlen:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError("flash_attention: cu_seqlens must be 1-D (N+1,) from 0 to total tokens "
                             f"({q.shape[0]}), got {cu_seqlens.tolist()[:8]}")
        if k.shape[0] != q.shape[0]:
            raise ValueError("flash_attention: varlen q and k must have the same number of tokens")
    elif q.shape[0] != k.shape[0]:
        raise ValueError("flash_attention: q and k batch sizes differ")


# -----------------------------------------------------------------------------
# Attention reference (plain PyTorch): the CPU path and the oracle for the Triton kernel

def _dense_attention(q, k, v, causal, scale, key_mask=None):
    """q (B, Tq, Hq, D), k (B, Tk, Hkv, D), v (B, Tk, Hkv, Dv) -> (B, Tq, Hq, Dv).

    GQA without repeating K/V: q is viewed as (B, Hkv, G, Tq, D) and broadcast against k's
    (B, Hkv, 1, Tk, D). Scores and softmax in fp32 (at least). Causal masks are aligned to the
    bottom right (query i sees keys up to i + Tk - Tq), as in flash-attention. key_mask (B, Tq, Tk)
    is ANDed in. A query row that can see no key returns zeros (not NaN).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(acc).view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, Tq, D)
    kh = k.to(acc).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Tk, D)
    vh = v.to(acc).permute(0, 2, 1, 3)[:, :, None]  # (B, Hkv, 1, Tk, Dv)
    s = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hkv, G, Tq, Tk)
    mask = None
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        mask = (j <= i + (Tk - Tq)).expand(B, Tq, Tk)
    if key_mask is not None:
        mask = key_mask if mask is None else mask & key_mask
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
        empty = ~mask.any(-1)  # (B, Tq): rows that see nothing
        s = s.masked_fill(empty[:, None, None, :, None], 0.0)  # keep softmax finite there
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(empty[:, None, None, :, None], 0.0)
    o = p @ vh  # (B, Hkv, G, Tq, Dv)
    return o.permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, -1).to(q.dtype)


def attention_reference(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Plain-PyTorch attention with the signature of `flash_attention`.

    Varlen (cu_seqlens given): documents are gathered into a padded (N, max_seqlen) batch, attended
    with a key-padding mask, and scattered back; nothing attends across a document boundary.
    """
    _check_attention_args(q, k, v, cu_seqlens, max_seqlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _dense_attention(q, k, v, causal, scale)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    L = int(lens.max()) if max_seqlen is None else max(int(max_seqlen), int(lens.max()))
    N = lens.numel()
    t = torch.arange(L, device=q.device)
    valid = t[None, :] < lens[:, None]  # (N, L)
    src = (cu[:-1, None] + t[None, :]).clamp(max=q.shape[0] - 1)  # (N, L) token index, padded -> clamped
    pad = lambda x: x[src] * valid[..., None, None].to(x.dtype)  # noqa: E731 - (N, L, H, D)
    key_mask = valid[:, None, :].expand(N, L, L)
    o = _dense_attention(pad(q), pad(k), pad(v), causal, scale, key_mask)  # (N, L, Hq, Dv)
    return o[valid]  # (total, Hq, Dv), documents back in order


# -----------------------------------------------------------------------------
# Public entry point

def flash_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Attention: dense q (B, T, Hq, Dqk), k (B, T, Hkv, Dqk), v (B, T, Hkv, Dv) -> (B, T, Hq, Dv),
    or varlen (total, H, D) with cu_seqlens (N+1,) int32 document boundaries. Hkv divides Hq.
    """
    _check_attention_args(q, k, v, cu_seqlens, max_seqlen)
    if q.is_cuda and not FORCE_REFERENCE and cu_seqlens is None and q.shape[1] == k.shape[1]:
        # until the Triton kernel lands: PyTorch's fused SDPA (flash / cuDNN / efficient backends)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, scale=softmax_scale,
                                           enable_gqa=k.shape[2] != q.shape[2])
        return y.transpose(1, 2)
    return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen)


# -----------------------------------------------------------------------------
# Linear + cross-entropy

def linear_cross_entropy_reference(h, weight, targets, *, ignore_index=-100, softmax_scale=None):
    """F.cross_entropy(h @ weight.T * scale, targets): materialises the (N, V) logits."""
    logits = h @ weight.T
    if softmax_scale is not None:
        logits = logits * softmax_scale
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, softmax_scale=None):
    """Mean cross-entropy of the logits h @ weight.T (h (N, D), weight (V, D), targets (N,) int64) over
    the targets that are not ignore_index, without materialising the (N, V) logits on the fast path."""
    return linear_cross_entropy_reference(h, weight, targets, ignore_index=ignore_index,
                                          softmax_scale=softmax_scale)
