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

try:  # optional: without Triton (macOS, Windows) every public function runs its PyTorch reference
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

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
#
# loss = mean over non-ignored rows of logsumexp(s * h W^T) - s * (h W^T)[target], s = softmax_scale.
# Eager PyTorch materialises the (N, V) logits in bf16, an fp32 copy, the fp32 log-softmax saved for
# the backward and its fp32 gradient: at N = 16k tokens and Llama-3's V = 128k that is ~25 GB, far more
# than the rest of a 1B model's activations.
#
# Design: save only (N,) floats (each row's log-sum-exp, and the count of valid rows; h, W and the
# targets are inputs that autograd holds anyway) and recompute the logits in the backward. Both passes
# walk the vocabulary in chunks of C columns through one reused (N, C) buffer in h's dtype:
#   forward   x_c = h @ W_c^T                      cuBLAS
#             _ce_lse_kernel: per row, online max / sum-exp over the chunk's tiles, carried from chunk to
#                             chunk (Milakov & Gimelshein 2018), target logit picked in its chunk;
#                             the last chunk writes lse and loss_r = lse - s * x[target]
#   backward  x_c = h @ W_c^T                      cuBLAS: the recompute
#             _ce_grad_kernel: x_c <- (exp(s * x_c - lse) - onehot) * s * dloss / n_valid, in place, in
#                             fp32 from the saved lse (no second max / sum pass), 0 on ignored rows
#             dW_c = g_c^T @ h                     cuBLAS, each slice written once (eager's numerics)
#             dh  += g_c @ W_c                     cuBLAS, an fp32 (N, D) accumulator for bf16 / fp16
# Memory: the chunk (LCE_CHUNK_BYTES) + the (N, D) accumulator + (N,) floats; no (N, V) tensor exists.
# Why chunks of vocabulary and not of rows: with row chunks every chunk adds into an fp32 (V, D) dW
# (1 GB at V = 128k, D = 2k, read and written once per chunk); vocabulary chunks write each dW slice
# once and accumulate only dh, which is (N, D) (128 MB at N = 16k).
# Why cuBLAS GEMMs and not one fused Triton kernel per direction (Cut Cross-Entropy's way, which also
# saves the chunk's round trip through memory): tl.dot GEMMs reach less of the H100's peak than cuBLAS,
# and the GEMMs are nearly all of the time here.
# Cost: 4 GEMMs of 2 N V D FLOPs against eager's 3 (the recompute), plus three bf16 passes over the
# logits (one read in the forward, a read and a write in the backward). Eager adds about ten passes over
# (N, V), most of them fp32 (upcast, log_softmax, its backward, the downcast: ~80 GB moved at the
# full shape, by arithmetic about two GEMMs' time on an H100), so the fused path should beat it.
# torch.compile fuses those passes into a few bf16 ones, so against it the extra GEMM is the whole
# price: the "<= 1.1x compile" holds only if compile's own passes cost about as much as a GEMM.
# Not yet measured (bench/loss.py). Ignored rows still ride through the GEMMs (dropping them would need
# their count on the host, a sync); the Triton kernels skip their loads.
# The chunk size trades memory for speed: narrow chunks make thin GEMMs and more launches and passes
# over the dh accumulator; a chunk of ~1 GB gives GEMMs of at least 16k x 32k x D at the full shape.
# fp16: g is formed in fp32 and multiplied by dloss (which carries a GradScaler's scale) and 1/n_valid
# before its one rounding to fp16, exactly as eager rounds its fp32 gradient: the scale lifts small
# values above fp16's underflow. (Leaving 1/n_valid for after the GEMMs would overflow instead: the
# target column's (p - 1) * 2^16 is below fp16's -65504.)

LCE_CHUNK_BYTES = 1 << 30  # logits chunk size: larger = wider GEMMs and fewer passes, more memory


def linear_cross_entropy_reference(h, weight, targets, *, ignore_index=-100, softmax_scale=None):
    """F.cross_entropy(h @ weight.T * scale, targets): materialises the (N, V) logits."""
    _check_lce_args(h, weight, targets)
    logits = h @ weight.T
    if softmax_scale is not None:
        logits = logits * softmax_scale
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index)


def _check_lce_args(h, weight, targets):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h must be (N, D) and weight (V, D), got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}; flatten the batch first (h.flatten(0, 1))")
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has no rows (V = 0); pass the output projection")
    if targets.shape != h.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64 (or int32) of shape ({h.shape[0]},), "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if not (h.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: h, weight, targets are on {h.device}, {weight.device}, "
                         f"{targets.device}; move them to one device")


if triton is not None:
    def _keep_lse(conf):
        # 8..64 elements per thread: narrower loads do not stream at full bandwidth, wider tiles spill
        tile = conf.kwargs["BLOCK_N"] * conf.kwargs["BLOCK_V"]
        return tile <= 16384 and 8 <= tile // (32 * conf.num_warps) <= 64

    _LSE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
                    for bn in (1, 4) for bv in (2048, 4096, 8192) for w in (4, 8, 16)]
    _LSE_CONFIGS = [c for c in _LSE_CONFIGS if _keep_lse(c)]
    # the gradient kernel is not autotuned: it is elementwise (any tile that streams will do) and rewrites
    # its input, so every trial would first copy the whole chunk back, and that copy would be the timing
    _GRAD_BLOCKS = dict(BLOCK_N=4, BLOCK_V=1024, num_warps=4)
    if INTERPRET:  # the interpreter pays per op, not per element: one config, many rows per program
        _LSE_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512}, num_warps=1)]
        _GRAD_BLOCKS = dict(BLOCK_N=16, BLOCK_V=512, num_warps=1)

    # each row's running (max, sum of exp, target logit) waits in m / d / x_t between chunks: autotuning
    # restores them between trials, which would otherwise fold the chunk in several times
    @triton.autotune(configs=_LSE_CONFIGS, key=["n_cols"], restore_value=["m_ptr", "d_ptr", "xt_ptr"])
    @triton.jit
    def _ce_lse_kernel(x_ptr, targets_ptr, m_ptr, d_ptr, xt_ptr, lse_ptr, loss_ptr, n_rows, n_cols, stride,
                       col0, ignore_index, scale, FIRST: tl.constexpr, LAST: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # x is one logits chunk, (h W^T)[:, col0:col0 + n_cols], its rows `stride` elements apart
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_V)
        row_ok = rows < n_rows
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        # ignored rows are masked out of every load: they cost no memory traffic
        valid = row_ok & (target != ignore_index)
        row_ptr = x_ptr + rows.to(tl.int64)[:, None] * stride  # (BLOCK_N, 1)
        if FIRST:
            m = tl.full([BLOCK_N], float("-inf"), tl.float32)
            d = tl.zeros([BLOCK_N], tl.float32)
            x_t = tl.full([BLOCK_N], float("nan"), tl.float32)  # stays NaN if the target is not in [0, V)
        else:
            m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
            d = tl.load(d_ptr + rows, mask=row_ok, other=0.0)
            x_t = tl.load(xt_ptr + rows, mask=row_ok, other=0.0)

        # online max and sum of exp over the chunk's tiles (Milakov & Gimelshein 2018)
        for v0 in range(0, n_cols, BLOCK_V):
            col_ok = (v0 + cols < n_cols)[None, :]
            x = tl.load(row_ptr + v0 + cols[None, :], mask=valid[:, None] & col_ok, other=0.0).to(tl.float32)
            x = tl.where(col_ok, x * scale, float("-inf"))  # every tile has a real column: m stays finite
            m_new = tl.maximum(m, tl.max(x, 1))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new
        # the target logit, from the chunk that holds it (a host-side range check would cost a sync)
        local = target - col0
        here = valid & (local >= 0) & (local < n_cols)
        x_here = tl.load(x_ptr + rows.to(tl.int64) * stride + local, mask=here, other=0.0).to(tl.float32)
        x_t = tl.where(here, x_here * scale, x_t)

        if LAST:
            lse = m + tl.log(d)
            tl.store(lse_ptr + rows, lse, mask=row_ok)
            tl.store(loss_ptr + rows, tl.where(valid, lse - x_t, 0.0), mask=row_ok)
        else:
            tl.store(m_ptr + rows, m, mask=row_ok)
            tl.store(d_ptr + rows, d, mask=row_ok)
            tl.store(xt_ptr + rows, x_t, mask=row_ok)

    @triton.jit
    def _ce_grad_kernel(x_ptr, targets_ptr, lse_ptr, gscale_ptr, n_rows, n_cols, stride, col0, ignore_index,
                        scale, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # in place on a recomputed logits chunk: x <- (softmax(s x) - onehot) * gscale, 0 on ignored rows;
        # gscale = s * dloss / n_valid, a device scalar (reading it on the host would cost a sync)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (target != ignore_index)
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        x = tl.load(ptrs, mask=ok & valid[:, None], other=0.0).to(tl.float32)  # ignored rows: write only
        onehot = (col0 + cols[None, :] == target[:, None]).to(tl.float32)
        g = (tl.exp(x * scale - lse[:, None]) - onehot) * tl.load(gscale_ptr)
        tl.store(ptrs, tl.where(valid[:, None], g, 0.0).to(x_ptr.dtype.element_ty), mask=ok)


def _lce_chunk_cols(N, V, itemsize):
    """Vocabulary columns per logits chunk: about LCE_CHUNK_BYTES of (N, C) logits, chunks of about equal
    width (so the last one is not a sliver), whole 128-column GEMM tiles; V when one chunk holds it all."""
    n_chunks = max(1, -(-N * V * itemsize // LCE_CHUNK_BYTES))
    cols = -(-V // n_chunks)
    return min(V, -(-cols // 128) * 128)


def _lce_chunks(h, weight):
    """Yield (v0, v1, x) per vocabulary chunk, x = h @ weight[v0:v1].T in one reused (N, C) buffer."""
    N, V = h.shape[0], weight.shape[0]
    C = _lce_chunk_cols(N, V, h.element_size())
    # rows padded to 64 elements: an odd V (50257) would leave the GEMMs' leading dimension unaligned,
    # which costs cuBLAS its fastest kernels (nanoGPT pads the vocabulary itself for the same reason)
    buf = torch.empty(N, -(-C // 64) * 64, dtype=h.dtype, device=h.device)
    for v0 in range(0, V, C):
        v1 = min(v0 + C, V)
        x = buf[:, :v1 - v0]
        torch.mm(h, weight[v0:v1].T, out=x)
        yield v0, v1, x


def _lce_forward(h, weight, targets, ignore_index, scale):
    """(loss, lse, n_valid): the mean loss, each row's fp32 log-sum-exp of the scaled logits, and the
    number of rows that count (a device tensor: no host sync)."""
    N, V = h.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    lse, loss_rows = torch.empty(N, **f32), torch.zeros(N, **f32)
    m, d, x_t = (torch.empty(N, **f32) for _ in range(3))  # each row's running state between chunks
    if N:
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        for v0, v1, x in _lce_chunks(h, weight):
            _ce_lse_kernel[grid](x, targets, m, d, x_t, lse, loss_rows, N, v1 - v0, x.stride(0), v0,
                                 ignore_index, scale, FIRST=v0 == 0, LAST=v1 == V)
    n_valid = (targets != ignore_index).sum(dtype=torch.float32)
    return loss_rows.sum() / n_valid, lse, n_valid  # 0 / 0 = NaN when every row is ignored, as torch


def _lce_backward(h, weight, targets, lse, gscale, ignore_index, scale, need_dh, need_dw):
    """(dh, dw), each None unless asked for: the recompute, chunk by chunk; see the design note above."""
    N, D = h.shape
    V = weight.shape[0]
    if N == 0:  # no rows, no chunks: zero gradients (and a NaN loss), as torch
        return (torch.zeros_like(h) if need_dh else None), (torch.zeros_like(weight) if need_dw else None)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    dh = None
    if need_dh:  # several chunks sum their dh in fp32: bf16 / fp16 partial sums would round once a chunk
        one_chunk = _lce_chunk_cols(N, V, h.element_size()) == V
        dh_dtype = h.dtype if one_chunk else torch.promote_types(h.dtype, torch.float32)
        dh = torch.empty(N, D, dtype=dh_dtype, device=h.device)
    bn, bv = _GRAD_BLOCKS["BLOCK_N"], _GRAD_BLOCKS["BLOCK_V"]
    for v0, v1, x in _lce_chunks(h, weight):
        _ce_grad_kernel[(triton.cdiv(N, bn), triton.cdiv(v1 - v0, bv))](
            x, targets, lse, gscale, N, v1 - v0, x.stride(0), v0, ignore_index, scale, **_GRAD_BLOCKS)
        w_c = weight[v0:v1]
        if need_dw:
            torch.mm(x.T, h, out=dw[v0:v1])  # one GEMM per slice: cuBLAS sums over the N rows in fp32
        if need_dh:
            if dh.dtype == x.dtype:
                dh.addmm_(x, w_c, beta=0 if v0 == 0 else 1)  # beta=0 ignores the uninitialised dh
            elif v0 == 0:
                dh.copy_(torch.mm(x, w_c))
            else:
                dh.add_(torch.mm(x, w_c))
    return (dh.to(h.dtype) if need_dh else None), dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, scale):
        loss, lse, n_valid = _lce_forward(h, weight, targets, ignore_index, scale)
        ctx.save_for_backward(h, weight, targets, lse, n_valid)  # the inputs and (N,) floats: no logits
        ctx.ignore_index, ctx.scale = ignore_index, scale
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss):
        h, weight, targets, lse, n_valid = ctx.saved_tensors
        # every factor of d loss / d logit but (softmax - onehot), kept on the device. An all-ignored
        # batch has zero gradients, as in torch: every row is masked to 0; the clamp keeps gscale finite
        gscale = dloss.float() * ctx.scale / n_valid.clamp(min=1)
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh, dw = _lce_backward(h, weight, targets, lse, gscale, ctx.ignore_index, ctx.scale, need_dh, need_dw)
        return dh, dw, None, None, None


def _lce_use_triton(h):
    if triton is None or FORCE_REFERENCE:
        return False
    return h.is_cuda or (INTERPRET and h.device.type == "cpu")


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, softmax_scale=None):
    """Mean cross-entropy of the logits h @ weight.T (h (N, D), weight (V, D), targets (N,) int64) over
    the targets that are not ignore_index, without materialising the (N, V) logits on the fast path.

    softmax_scale multiplies the logits before the softmax. Every target ignored: NaN loss and zero
    gradients (torch's mean over no elements). Under torch.autocast, h and weight are cast to the
    autocast dtype first, as F.linear would be. A target outside [0, V) gives a NaN loss on the fast
    path (eager PyTorch raises or asserts).
    """
    _check_lce_args(h, weight, targets)
    if not _lce_use_triton(h):
        return linear_cross_entropy_reference(h, weight, targets, ignore_index=ignore_index,
                                              softmax_scale=softmax_scale)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}; cast one or "
                         "run under torch.autocast")
    scale = 1.0 if softmax_scale is None else float(softmax_scale)
    return _linear_cross_entropy_fused(h, weight, targets, ignore_index, scale)


@torch.compiler.disable  # torch.compile'd models break the graph here rather than trace the chunk loop
def _linear_cross_entropy_fused(h, weight, targets, ignore_index, scale):
    with torch.autocast(h.device.type, enabled=False):  # the chunk GEMMs run in the dtype chosen above
        return _LinearCrossEntropy.apply(h, weight, targets.contiguous(), ignore_index, scale)
