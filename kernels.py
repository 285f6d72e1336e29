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
# Design: chunk over the N rows in PyTorch and do the whole forward AND backward of a chunk at once
# (the loss is a scalar, so its gradient is known up to the factor dloss, applied in the backward):
#   logits_c = h_c @ W^T                          cuBLAS, (C, V) in h's dtype, one buffer reused
#   _ce_rows_kernel: per row, online max/sum-exp over vocab tiles -> lse, loss_r = lse - x[target];
#                    then overwrites logits_c in place with g = (softmax - onehot) * s (* 1/n_valid)
#   dh_c = g @ W                                  cuBLAS, written once into dh
#   dW  += g^T @ h_c                              cuBLAS, accumulated over chunks in fp32
# Why not one fused Triton GEMM per direction (forward over (row block x vocab tiles), backward
# recomputing the tiles for dh and again for dW)? That costs 5 GEMMs of 2*N*V*D FLOPs (4 with atomics,
# whose traffic on a (V, D) or (N, D) fp32 buffer is worse) against eager's 3, in Triton GEMMs that
# reach less of the H100's peak than cuBLAS. Chunking keeps eager's 3 cuBLAS GEMMs and replaces its
# chain of fp32 passes over (N, V) with two bf16 passes over a (C, V) chunk, while the memory stays
# bounded by LCE_CHUNK_BYTES + the (V, D) fp32 accumulator; no (N, V) tensor ever exists.
# The price: dh and dW are held from the forward to the backward (the size of h and of W), and the
# backward work is spent even if backward is never called (so it is skipped under no_grad).

LCE_CHUNK_BYTES = 1 << 30  # logits chunk size: larger = fewer passes over the dW accumulator, more memory


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
    if targets.shape != h.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64 (or int32) of shape ({h.shape[0]},), "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if not (h.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: h, weight, targets are on {h.device}, {weight.device}, "
                         f"{targets.device}; move them to one device")


if triton is not None:
    def _keep_ce(conf):
        # 8..64 elements per thread: narrower loads do not stream at full bandwidth, wider tiles spill
        tile = conf.kwargs["BLOCK_N"] * conf.kwargs["BLOCK_V"]
        return tile <= 16384 and 8 <= tile // (32 * conf.num_warps) <= 64

    _CE_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
                   for bn in (1, 4) for bv in (2048, 4096, 8192) for w in (4, 8, 16)]
    _CE_CONFIGS = [c for c in _CE_CONFIGS if _keep_ce(c)]
    if INTERPRET:  # the interpreter pays per op, not per element: one config, many rows per program
        _CE_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 512}, num_warps=1)]

    # the kernel overwrites the logits with the gradient: autotuning must restore them between trials
    @triton.autotune(configs=_CE_CONFIGS, key=["V", "WRITE_GRAD"], restore_value=["logits_ptr"])
    @triton.jit
    def _ce_rows_kernel(logits_ptr, targets_ptr, loss_ptr, n_valid_ptr, n_rows, stride, V, ignore_index,
                        scale, WRITE_GRAD: tl.constexpr, NORMALISE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_V)
        row_ok = rows < n_rows
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        # ignored rows are masked out of every load: they cost no memory traffic and no exp
        valid = row_ok & (target != ignore_index)
        row_ptr = logits_ptr + rows.to(tl.int64)[:, None] * stride  # (BLOCK_N, 1)

        # pass 1: online max and sum of exp over the vocab tiles (Milakov & Gimelshein 2018)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            col_ok = (v0 + cols < V)[None, :]
            x = tl.load(row_ptr + v0 + cols[None, :], mask=valid[:, None] & col_ok, other=0.0).to(tl.float32)
            x = tl.where(col_ok, x * scale, float("-inf"))  # every tile has a real column: m stays finite
            m_new = tl.maximum(m, tl.max(x, 1))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new
        lse = m + tl.log(d)
        # a target outside [0, V) gives a NaN loss (checking on the host would cost a sync)
        in_range = (target >= 0) & (target < V)
        x_t = tl.load(logits_ptr + rows.to(tl.int64) * stride + target, mask=valid & in_range,
                      other=float("nan")).to(tl.float32) * scale
        tl.store(loss_ptr + rows, tl.where(valid, lse - x_t, 0.0), mask=row_ok)

        if WRITE_GRAD:
            # pass 2: d loss_r / d logit = s * (softmax - onehot), times 1/n_valid unless fp16; 0 if ignored
            g_scale = scale
            if NORMALISE:
                g_scale = scale / tl.maximum(tl.load(n_valid_ptr), 1.0)  # no valid row: unused
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols[None, :]
                col_ok = offs < V
                x = tl.load(row_ptr + offs, mask=valid[:, None] & col_ok, other=0.0).to(tl.float32) * scale
                g = (tl.exp(x - lse[:, None]) - (offs == target[:, None]).to(tl.float32)) * g_scale
                g = tl.where(valid[:, None], g, 0.0)
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


def _lce_chunk_rows(N, V, itemsize):
    """Rows per logits chunk: about LCE_CHUNK_BYTES of logits, chunks of equal size (so the last one is
    not a sliver), whole 128-row GEMM tiles once they are that large."""
    n_chunks = max(1, -(-N * V * itemsize // LCE_CHUNK_BYTES))
    rows = -(-N // n_chunks)
    return min(N, -(-rows // 128) * 128) if rows > 128 else max(rows, 1)


def _lce_forward(h, weight, targets, ignore_index, scale, need_dh, need_dw):
    """(loss, dh, dw, n_valid): the loss and, when asked, its gradients for dloss = 1 (times n_valid for
    fp16 inputs), chunk by chunk; see the design note above."""
    N, D = h.shape
    V = weight.shape[0]
    write_grad = need_dh or need_dw
    # fp16 has too little range for (softmax - onehot) / n_valid (~1e-10 at V=128k, N=16k): the
    # GradScaler's dloss would have lifted those values above underflow in eager PyTorch, but dloss is
    # only known in the backward. So fp16 keeps g unnormalised and the backward applies dloss / n_valid.
    normalise = h.dtype != torch.float16
    valid = targets != ignore_index
    n_valid = valid.sum(dtype=torch.float32)  # a tensor: no host sync
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    C = _lce_chunk_rows(N, V, h.element_size())
    n_chunks = -(-N // C)
    # rows padded to 64 elements: an odd V (50257) would leave the GEMMs' leading dimension unaligned,
    # which costs cuBLAS its fastest kernels (nanoGPT pads the vocabulary itself for the same reason)
    logits = torch.empty(C, -(-V // 64) * 64, dtype=h.dtype, device=h.device)[:, :V]
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None
    dw = None
    if need_dw:  # fp32 accumulator unless one chunk writes dW in one GEMM (as eager does)
        dw_dtype = weight.dtype if n_chunks == 1 and h.dtype != torch.float16 else torch.float32
        dw = (torch.empty if N else torch.zeros)(V, D, dtype=dw_dtype, device=h.device)  # N = 0: no chunk
    for i, r0 in enumerate(range(0, N, C)):
        r1 = min(r0 + C, N)
        hc, lc = h[r0:r1], logits[:r1 - r0]
        torch.mm(hc, weight.T, out=lc)
        grid = lambda META: (triton.cdiv(r1 - r0, META["BLOCK_N"]),)  # noqa: E731
        _ce_rows_kernel[grid](lc, targets[r0:r1], loss_rows[r0:r1], n_valid, r1 - r0, lc.stride(0), V,
                              ignore_index, scale, WRITE_GRAD=write_grad, NORMALISE=normalise)
        if need_dh:
            torch.mm(lc, weight, out=dh[r0:r1])
        if need_dw:
            if dw.dtype == lc.dtype:
                dw.addmm_(lc.T, hc, beta=0 if i == 0 else 1)  # beta=0 ignores the uninitialised dw
            elif i == 0:
                dw.copy_(torch.mm(lc.T, hc))
            else:
                dw.add_(torch.mm(lc.T, hc))
    if dw is not None and h.dtype != torch.float16:
        dw = dw.to(weight.dtype)  # normalised already: bf16 has fp32's range
    return loss_rows.sum() / n_valid, dh, dw, n_valid  # 0 / 0 = NaN when every row is ignored, as torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, scale, grad_enabled):
        need_dh, need_dw = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        loss, dh, dw, n_valid = _lce_forward(h, weight, targets.contiguous(), ignore_index, scale,
                                             need_dh, need_dw)
        ctx.unnormalised = h.dtype == torch.float16
        ctx.dtypes = h.dtype, weight.dtype
        ctx.save_for_backward(dh, dw, n_valid)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw, n_valid = ctx.saved_tensors
        # gradients were formed for dloss = 1; all-ignored batches have zero gradients, as in torch.
        # In place, to not hold two copies of dW (a second backward through this graph then raises)
        f = dloss / n_valid.clamp(min=1) if ctx.unnormalised else dloss
        dh = dh.mul_(f).to(ctx.dtypes[0]) if dh is not None else None
        dw = dw.mul_(f).to(ctx.dtypes[1]) if dw is not None else None
        return dh, dw, None, None, None, None


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
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, scale, torch.is_grad_enabled())
