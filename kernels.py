"""Triton kernels with plain-PyTorch references beside them.

Dispatch: CUDA tensors run the fast path; CPU tensors run the PyTorch reference, except that with
TRITON_INTERPRET=1 set before import the Triton kernels run on CPU tensors (interpreted), which is how
the tests reach them. `FORCE_REFERENCE = True` (or the model's attn_impl="reference") forces the
references everywhere, for debugging.
"""
import functools
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
        cu = cu_seqlens.tolist() if cu_seqlens.dim() == 1 else []  # one host sync; N is small
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != q.shape[0] or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError("flash_attention: cu_seqlens must be 1-D (N+1,), non-decreasing from 0 to the "
                             f"total tokens ({q.shape[0]}), got {cu[:8]}{'...' if len(cu) > 8 else ''}")
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
    with a key-padding mask, and scattered back; nothing attends across a document boundary. That
    takes the longest document's length on the host (a sync): the model calls `_rows_reference`
    instead, which needs none.
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


def _rows_reference(q, k, v, cu_seqlens, causal, scale, row_len):
    """Varlen attention when every row of row_len tokens starts at a document boundary (the packed
    training batch): the tokens are viewed as (total / row_len, row_len) rows and each row gets a
    block-diagonal (T, T) mask from the document ids. Static shapes, no host sync, and never a
    (total, total) mask."""
    B, T = q.shape[0] // row_len, row_len
    cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
    doc = (torch.searchsorted(cu, torch.arange(B * T, device=q.device), right=True) - 1).view(B, T)
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    rows = lambda x: x.view(B, T, *x.shape[1:])  # noqa: E731
    return _dense_attention(rows(q), rows(k), rows(v), causal, scale, same_doc).flatten(0, 1)


# -----------------------------------------------------------------------------
# Flash attention: Triton forward and backward (FlashAttention-2, Dao 2023)
#
# Forward: a program owns BLOCK_M query rows of one head and streams the key/value blocks through an
# online softmax (Milakov & Gimelshein 2018) in base 2 (exp2 is the native instruction). The scores are
# scaled by c = scale * log2(e) only inside exp2(s * c - m), one FMA, with m = c * max(s) per row: that
# needs c > 0 (attention() sends other scales to the reference). It writes O and the log-sum-exp per row
# (LSE, base 2); a row that sees no key writes O = 0 and LSE = +inf, so that the backward's
# P = exp2(S - LSE) is 0 there, not NaN.
# Backward: delta = rowsum(dO * O) first (a small pre-pass), then two kernels, so that no output is
# shared between programs (no atomics: for one block config the gradients are bitwise deterministic;
# across processes that takes pinned configs, see below):
#   dK/dV: a program owns BLOCK_N keys of one KV head and loops over the query blocks of the G query
#          heads that share it (GQA), recomputing P from Q, K and LSE;
#   dQ:    a program owns BLOCK_M query rows and loops over the key blocks, like the forward.
# Both kernels compute Q K^T and dP = dO V^T: 1.4x the backward FLOPs of FA2, which adds into dQ atomically.
#
# Layouts: dense (B, T, H, D) and varlen (total, H, D) with cu_seqlens share the kernels: a program finds
# its batch row (dense: program_id(2)) or document (varlen: a host-built table of (document, block) tiles)
# and never reads outside it. Causal masks are aligned to the bottom right, as in the reference: query i
# sees keys j <= i + Tk - Tq. Blocks that need no mask (fully visible, in range) take a loop without one.
# Head dims: a dim that is not a power of two is split into two power-of-two chunks with two dots
# (96 = 64 + 32, 192 = 128 + 64), so MLA's 192 costs no padding; only Dv (and odd remainders) is padded,
# with masked loads. Any T: every load is masked by the row count, no power-of-two assumption on T.
# Precision: fp16/bf16 dots accumulate in fp32. fp32 inputs on CUDA use "tf32x3" dots (three tf32 products,
# about fp32's accuracy: "ieee" dots are FMA loops that spilled 57.8 KB at hd 128), or plain "tf32" when
# torch.get_float32_matmul_precision() allows it (~1e-3 relative errors, like bf16); "ieee" when interpreted.
# Offsets are int64 wherever they can pass 2^31 elements (rows * stride in _tile, the batch/start bases).

if triton is not None:

    @triton.jit
    def _tile(base, rows, stride, n_rows, C0: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
              TRANS: tl.constexpr):
        # columns C0..C0+C of rows `rows` of a (rows, D) matrix, zero outside rows < n_rows and columns < D;
        # TRANS loads the (C, rows) transpose
        # int64 offsets: rows * stride passes 2^31 in long packed batches (131,072 tokens x 128 heads x 128)
        cols = C0 + tl.arange(0, C)
        off = rows.to(tl.int64) * stride
        if TRANS:
            mask = rows[None, :] < n_rows
            if C0 + C > D:
                mask = mask & (cols[:, None] < D)
            return tl.load(base + off[None, :] + cols[:, None], mask=mask, other=0.0)
        else:
            mask = rows[:, None] < n_rows
            if C0 + C > D:
                mask = mask & (cols[None, :] < D)
            return tl.load(base + off[:, None] + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store_tile(base, rows, stride, n_rows, x, C0: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
        cols = C0 + tl.arange(0, C)
        mask = rows[:, None] < n_rows
        if C0 + C > D:
            mask = mask & (cols[None, :] < D)
        off = rows.to(tl.int64)[:, None] * stride
        tl.store(base + off + cols[None, :], x.to(base.dtype.element_ty), mask=mask)

    @triton.jit
    def _program_tile(CU, TILES, T_Q, T_K, VARLEN: tl.constexpr, REVERSE: tl.constexpr):
        # -> (doc, z, blk, start, q_len, k_len): this program's document (< 0: padding tile, nothing to do),
        # batch row z, block index in the document, first token (varlen) and the q/k lengths
        pid = tl.program_id(0)
        if VARLEN:
            doc = tl.load(TILES + 2 * pid)
            blk = tl.load(TILES + 2 * pid + 1)
            start = tl.load(CU + tl.maximum(doc, 0))
            n = tl.load(CU + tl.maximum(doc, 0) + 1) - start
            return doc, doc * 0, blk, start, n, n
        else:
            z = tl.program_id(2)
            blk = pid
            if REVERSE:  # causal: the last query blocks have the most keys, start them first
                blk = tl.num_programs(0) - 1 - pid
            return z, z, blk, z * 0, T_Q, T_K

    @triton.jit
    def _fwd_loop(acc, l_i, m_i, q0, q1, k_ptr, v_ptr, s_kt, s_vt, lo, hi, offs_m, k_len, offset, scale_log2,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                  D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr,
                  PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = tl.dot(q0, _tile(k_ptr, offs_n, s_kt, k_len, 0, D0, DQK, True), input_precision=PREC)
            if D1 > 0:  # second chunk of the head dim (e.g. 192 = 128 + 64)
                s = tl.dot(q1, _tile(k_ptr, offs_n, s_kt, k_len, D0, D1, DQK, True), s, input_precision=PREC)
            if MASK:  # keys past the end, and (causal) keys after the query
                keep = offs_n[None, :] < k_len
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
                s = tl.where(keep, s, float("-inf"))
            # the raw scores' max, scaled once per row; the scale then rides in the subtraction's FMA
            # (s * scale - m), as in Triton's tutorial, instead of a multiply over the whole tile
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
            m_ref = m_new
            if MASK:  # a row that has seen no key yet subtracts 0, not -inf (-inf - -inf = nan)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s * scale_log2 - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)  # rescales what was accumulated under the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(v_ptr, offs_n, s_vt, k_len, 0, DVP, DV, False)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, CU, TILES,
                         s_qz, s_qt, s_qh, s_kz, s_kt, s_kh, s_vz, s_vt, s_vh, s_oz, s_ot, s_oh,
                         T_Q, T_K, GROUP, scale_log2, T_BUCKET,
                         CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                         D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        doc, z, blk, start, q_len, k_len = _program_tile(CU, TILES, T_Q, T_K, VARLEN, CAUSAL)
        if doc < 0:
            return
        h = tl.program_id(1)
        hk = h // GROUP  # GQA: query head h reads KV head h // G; K and V are never repeated
        z, start = z.to(tl.int64), start.to(tl.int64)
        q_ptr = Q + z * s_qz + start * s_qt + h * s_qh
        k_ptr = K + z * s_kz + start * s_kt + hk * s_kh
        v_ptr = V + z * s_vz + start * s_vt + hk * s_vh
        start_m = blk * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # load q: it stays on chip for the whole loop
        q0 = _tile(q_ptr, offs_m, s_qt, q_len, 0, D0, DQK, False)
        q1 = q0
        if D1 > 0:
            q1 = _tile(q_ptr, offs_m, s_qt, q_len, D0, D1, DQK, False)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DVP], tl.float32)
        # keys [0, mid) are visible to every row of the block and in range: no mask; [mid, hi) need one
        offset = k_len - q_len
        if CAUSAL:
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), k_len)
            mid = tl.minimum(tl.maximum(start_m + 1 + offset, 0), k_len) // BLOCK_N * BLOCK_N
        else:
            hi = k_len
            mid = k_len // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q0, q1, k_ptr, v_ptr, s_kt, s_vt, 0, mid, offs_m, k_len,
                                  offset, scale_log2, False, CAUSAL, DQK, D0, D1, DV, DVP, BLOCK_N, PREC)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q0, q1, k_ptr, v_ptr, s_kt, s_vt, mid, hi, offs_m, k_len,
                                  offset, scale_log2, True, CAUSAL, DQK, D0, D1, DV, DVP, BLOCK_N, PREC)
        # rows that saw no key (l = 0): O = 0 and LSE = +inf
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o_ptr = O + z * s_oz + start * s_ot + h * s_oh
        _store_tile(o_ptr, offs_m, s_ot, q_len, acc / l_safe[:, None], 0, DVP, DV)
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe))
        lse_ptr = LSE + (z * tl.num_programs(1) + h) * T_Q + start
        tl.store(lse_ptr + offs_m, lse, mask=offs_m < q_len)

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, s_oz, s_ot, s_oh, s_dz, s_dt, s_dh, T,
                               DV: tl.constexpr, DVP: tl.constexpr, BLOCK_M: tl.constexpr):
        # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax backward's row term
        h, z = tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        o = _tile(O + z * s_oz + h * s_oh, offs_m, s_ot, T, 0, DVP, DV, False).to(tl.float32)
        do = _tile(DO + z * s_dz + h * s_dh, offs_m, s_dt, T, 0, DVP, DV, False).to(tl.float32)
        tl.store(DELTA + (z * tl.num_programs(1) + h) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _dkdv_loop(dk0, dk1, dv, k0, k1, v, q_ptr, do_ptr, lse_ptr, delta_ptr, s_qt, s_dot, lo, hi, offs_n,
                   q_len, offset, scale_log2, MASK: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                   D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_M: tl.constexpr,
                   PREC: tl.constexpr):
        # everything transposed (keys along rows), so that P^T and dS^T feed dV = P^T dO and dK = dS^T Q
        # directly. Keys past the end need no mask: they only touch their own rows of dK/dV, never stored.
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qt0 = _tile(q_ptr, offs_m, s_qt, q_len, 0, D0, DQK, True)  # (D0, BLOCK_M)
            st = tl.dot(k0, qt0, input_precision=PREC)  # (BLOCK_N, BLOCK_M)
            qt1 = qt0
            if D1 > 0:
                qt1 = _tile(q_ptr, offs_m, s_qt, q_len, D0, D1, DQK, True)
                st = tl.dot(k1, qt1, st, input_precision=PREC)
            if MASK:  # causal
                st = tl.where(offs_m[None, :] + offset >= offs_n[:, None], st, float("-inf"))
            # rows past the end load LSE = +inf: their P is 0
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
            pt = tl.math.exp2(st * scale_log2 - lse[None, :])  # one FMA per element
            do = _tile(do_ptr, offs_m, s_dot, q_len, 0, DVP, DV, False)  # (BLOCK_M, DVP)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)  # dP^T = V dO^T
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < q_len, other=0.0)
            dst = (pt * (dpt - delta[None, :])).to(qt0.dtype)  # dS = P * (dP - delta)
            dk0 = tl.dot(dst, tl.trans(qt0), dk0, input_precision=PREC)
            if D1 > 0:
                dk1 = tl.dot(dst, tl.trans(qt1), dk1, input_precision=PREC)
        return dk0, dk1, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV_, LSE, DELTA, CU, TILES,
                              s_qz, s_qt, s_qh, s_kz, s_kt, s_kh, s_vz, s_vt, s_vh, s_doz, s_dot, s_doh,
                              s_dkz, s_dkt, s_dkh, s_dvz, s_dvt, s_dvh,
                              T_Q, T_K, GROUP, N_HEAD, scale, scale_log2, T_BUCKET,
                              CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                              D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PREC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        doc, z, blk, start, q_len, k_len = _program_tile(CU, TILES, T_Q, T_K, VARLEN, False)
        if doc < 0:
            return
        hk = tl.program_id(1)
        z, start = z.to(tl.int64), start.to(tl.int64)
        k_ptr = K + z * s_kz + start * s_kt + hk * s_kh
        v_ptr = V + z * s_vz + start * s_vt + hk * s_vh
        start_n = blk * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # load k and v: they stay on chip while every query block that sees them streams past
        k0 = _tile(k_ptr, offs_n, s_kt, k_len, 0, D0, DQK, False)
        k1 = k0
        if D1 > 0:
            k1 = _tile(k_ptr, offs_n, s_kt, k_len, D0, D1, DQK, False)
        v = _tile(v_ptr, offs_n, s_vt, k_len, 0, DVP, DV, False)
        dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dk1 = dk0
        if D1 > 0:
            dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dv = tl.zeros([BLOCK_N, DVP], tl.float32)
        # causal: rows [lo, mid) see part of this key block (mask), rows [mid, q_len) all of it
        offset = k_len - q_len
        lo = 0
        mid = 0
        if CAUSAL:
            lo = tl.minimum(tl.maximum(start_n - offset, 0), q_len) // BLOCK_M * BLOCK_M
            mid = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), q_len), BLOCK_M) * BLOCK_M
        for g in range(GROUP):  # the query heads that share this KV head
            h = hk * GROUP + g
            q_ptr = Q + z * s_qz + start * s_qt + h * s_qh
            do_ptr = DO + z * s_doz + start * s_dot + h * s_doh
            lse_ptr = LSE + (z * N_HEAD + h) * T_Q + start
            delta_ptr = DELTA + (z * N_HEAD + h) * T_Q + start
            dk0, dk1, dv = _dkdv_loop(dk0, dk1, dv, k0, k1, v, q_ptr, do_ptr, lse_ptr, delta_ptr, s_qt, s_dot,
                                      lo, mid, offs_n, q_len, offset, scale_log2, True, DQK, D0, D1, DV, DVP,
                                      BLOCK_M, PREC)
            dk0, dk1, dv = _dkdv_loop(dk0, dk1, dv, k0, k1, v, q_ptr, do_ptr, lse_ptr, delta_ptr, s_qt, s_dot,
                                      mid, q_len, offs_n, q_len, offset, scale_log2, False, DQK, D0, D1, DV,
                                      DVP, BLOCK_M, PREC)
        dk_ptr = DK + z * s_dkz + start * s_dkt + hk * s_dkh
        _store_tile(dk_ptr, offs_n, s_dkt, k_len, dk0 * scale, 0, D0, DQK)  # dS/dK = scale * dS Q
        if D1 > 0:
            _store_tile(dk_ptr, offs_n, s_dkt, k_len, dk1 * scale, D0, D1, DQK)
        _store_tile(DV_ + z * s_dvz + start * s_dvt + hk * s_dvh, offs_n, s_dvt, k_len, dv, 0, DVP, DV)

    @triton.jit
    def _dq_loop(dq0, dq1, q0, q1, do, lse, delta, k_ptr, v_ptr, s_kt, s_vt, lo, hi, offs_m, k_len, offset,
                 scale_log2, MASK: tl.constexpr, CAUSAL: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                 D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt0 = _tile(k_ptr, offs_n, s_kt, k_len, 0, D0, DQK, True)  # (D0, BLOCK_N)
            s = tl.dot(q0, kt0, input_precision=PREC)
            kt1 = kt0
            if D1 > 0:
                kt1 = _tile(k_ptr, offs_n, s_kt, k_len, D0, D1, DQK, True)
                s = tl.dot(q1, kt1, s, input_precision=PREC)
            if MASK:  # keys past the end (their P would multiply zeros, but could overflow to inf first)
                keep = offs_n[None, :] < k_len
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
                s = tl.where(keep, s, float("-inf"))
            p = tl.math.exp2(s * scale_log2 - lse[:, None])
            dp = tl.dot(do, _tile(v_ptr, offs_n, s_vt, k_len, 0, DVP, DV, True), input_precision=PREC)
            ds = (p * (dp - delta[:, None])).to(kt0.dtype)
            dq0 = tl.dot(ds, tl.trans(kt0), dq0, input_precision=PREC)
            if D1 > 0:
                dq1 = tl.dot(ds, tl.trans(kt1), dq1, input_precision=PREC)
        return dq0, dq1

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU, TILES,
                            s_qz, s_qt, s_qh, s_kz, s_kt, s_kh, s_vz, s_vt, s_vh, s_doz, s_dot, s_doh,
                            s_dqz, s_dqt, s_dqh, T_Q, T_K, GROUP, scale, scale_log2, T_BUCKET,
                            CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DQK: tl.constexpr, D0: tl.constexpr,
                            D1: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        doc, z, blk, start, q_len, k_len = _program_tile(CU, TILES, T_Q, T_K, VARLEN, CAUSAL)
        if doc < 0:
            return
        h = tl.program_id(1)
        hk = h // GROUP
        z, start = z.to(tl.int64), start.to(tl.int64)
        lse_ptr = LSE + (z * tl.num_programs(1) + h) * T_Q + start
        delta_ptr = DELTA + (z * tl.num_programs(1) + h) * T_Q + start
        q_ptr = Q + z * s_qz + start * s_qt + h * s_qh
        k_ptr = K + z * s_kz + start * s_kt + hk * s_kh
        v_ptr = V + z * s_vz + start * s_vt + hk * s_vh
        start_m = blk * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q0 = _tile(q_ptr, offs_m, s_qt, q_len, 0, D0, DQK, False)
        q1 = q0
        dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
        dq1 = dq0
        if D1 > 0:
            q1 = _tile(q_ptr, offs_m, s_qt, q_len, D0, D1, DQK, False)
            dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
        do = _tile(DO + z * s_doz + start * s_dot + h * s_doh, offs_m, s_dot, q_len, 0, DVP, DV, False)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < q_len, other=0.0)
        offset = k_len - q_len  # the same block split as the forward
        if CAUSAL:
            hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), k_len)
            mid = tl.minimum(tl.maximum(start_m + 1 + offset, 0), k_len) // BLOCK_N * BLOCK_N
        else:
            hi = k_len
            mid = k_len // BLOCK_N * BLOCK_N
        dq0, dq1 = _dq_loop(dq0, dq1, q0, q1, do, lse, delta, k_ptr, v_ptr, s_kt, s_vt, 0, mid, offs_m,
                            k_len, offset, scale_log2, False, CAUSAL, DQK, D0, D1, DV, DVP, BLOCK_N, PREC)
        dq0, dq1 = _dq_loop(dq0, dq1, q0, q1, do, lse, delta, k_ptr, v_ptr, s_kt, s_vt, mid, hi, offs_m,
                            k_len, offset, scale_log2, True, CAUSAL, DQK, D0, D1, DV, DVP, BLOCK_N, PREC)
        dq_ptr = DQ + z * s_dqz + start * s_dqt + h * s_dqh
        _store_tile(dq_ptr, offs_m, s_dqt, q_len, dq0 * scale, 0, D0, DQK)
        if D1 > 0:
            _store_tile(dq_ptr, offs_m, s_dqt, q_len, dq1 * scale, D0, D1, DQK)

    # Autotuning. A program's own block (BLOCK_M of the forward and dQ, BLOCK_N of dK/dV) is chosen on the
    # host by head dim, as FlashAttention-2 does, because the varlen tile table is built for it; the
    # streamed block and the pipeline depth are tuned per (head dims, causal, layout, seqlen bucket). The
    # space is small on purpose (every config of every head-dim/causal/layout/dtype combination compiles
    # once): compiled for sm_90 with Triton 3.9, 4 warps spilled registers on the 128-row tiles and 8
    # warps did not (or barely), so only 8. dK/dV owning 128 keys streams only 16 or 32 queries (ptxas:
    # 255 registers, no spills; a streamed 64 spills). keep() drops pipelines that overflow shared memory;
    # when none fits (fp32 at head dim 256) a minimal config runs.
    def _smem_limit():  # per block, opt-in (H100: 227 KB); read once per tuning key
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        return props["max_shared_mem"]

    def _smem(own, streamed, stages, dqk, dvp, resident_v, elt):
        """Shared memory of a config: the streamed tiles of each stage plus the resident ones."""
        return elt * (stages * streamed * (dqk + dvp) + own * (dqk + dvp * resident_v)) + 1024

    def _tuned(name, sizes, stages, resident_v):
        if INTERPRET:  # one small fixed config (passed at launch): the interpreter is slow
            return lambda fn: fn
        configs = [triton.Config({name: b}, num_warps=8, num_stages=s) for b in sizes for s in stages]

        def keep(c, kw, elt):
            own, streamed = kw["BLOCK_N" if name == "BLOCK_M" else "BLOCK_M"], c.kwargs[name]
            if name == "BLOCK_M" and own == 128 and streamed > 32:  # dK/dV: registers (see above)
                return False
            return _smem(own, streamed, c.num_stages, kw["D0"] + kw["D1"], kw["DVP"], resident_v,
                         elt) <= _smem_limit()

        def prune(configs, named_args, **kw):
            kept = [c for c in configs if keep(c, kw, named_args["Q"].element_size())]
            return kept or [triton.Config({name: 16}, num_warps=4, num_stages=1)]

        return triton.autotune(configs, key=["DQK", "DV", "CAUSAL", "VARLEN", "T_BUCKET"],
                               prune_configs_by={"early_config_prune": prune})

    _attn_fwd = _tuned("BLOCK_N", (64, 128), (2, 3), resident_v=0)(_attn_fwd_kernel)  # q resident
    _attn_bwd_dkdv = _tuned("BLOCK_M", (16, 32, 64), (2, 3, 4), resident_v=1)(_attn_bwd_dkdv_kernel)  # k, v
    _attn_bwd_dq = _tuned("BLOCK_N", (32, 64), (2, 3), resident_v=1)(_attn_bwd_dq_kernel)  # q, dO resident


# Pinned configs: one known-good config per kernel instead of autotuning, when NANO_PIN_CONFIGS=1 (a GPU
# check in minutes rather than ~400 compilations first) or under torch.use_deterministic_algorithms(True):
# the autotuner may pick another streamed block in another process, and so another summation order.
# (streamed block, pipeline stages) from the sm_90 ptxas review: no spills, shared memory within 227 KB
# (dK/dV at hd 128: 32 x 3 stages, 115 KB); fewer stages where a head dim would overflow it.
PIN_CONFIGS = os.environ.get("NANO_PIN_CONFIGS") == "1"
_PINNED = {"fwd": (64, 3), "dkdv": (32, 3), "dq": (32, 3)}
_RESIDENT_V = {"fwd": 0, "dkdv": 1, "dq": 1}


def _launch_config(kernel, own, meta, elt):
    """Launch kwargs of the streamed block, or None to let the autotuner choose."""
    name = "BLOCK_M" if kernel == "dkdv" else "BLOCK_N"
    if INTERPRET:  # fixed, and unequal to the owned block, so that misaligned blocks' masks are exercised
        return {name: 16}
    if not (PIN_CONFIGS or torch.are_deterministic_algorithms_enabled()):
        return None
    return _pinned_config(kernel, name, own, meta["D0"] + meta["D1"], meta["DVP"], elt)


@functools.lru_cache  # launches happen every layer and step; the device's shared memory does not change
def _pinned_config(kernel, name, own, dqk, dvp, elt):
    streamed, stages = _PINNED[kernel]
    while stages > 1 and _smem(own, streamed, stages, dqk, dvp, _RESIDENT_V[kernel], elt) > _smem_limit():
        stages -= 1
    return {name: streamed, "num_warps": 8, "num_stages": stages}


_LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * _LOG2E)


def _own_block(kernel, dqk, dv):
    """The block a program owns: query rows of the forward and dQ ("q"), keys of dK/dV ("kv"). dK/dV
    keeps two fp32 accumulators (own x Dqk and own x Dv) in registers: 128 keys up to hd 128 with a
    streamed block of 16 or 32 (with 64 keys, 8 warps re-read each query block twice as often)."""
    if INTERPRET:
        return 32
    if kernel == "q":
        return 128 if dqk <= 192 else 64
    return 128 if dqk <= 128 else 64 if dqk <= 192 else 32


def _split_dim(d):
    """Head dim -> (D0, D1): power-of-two chunks, each >= 16 (tl.dot's minimum), covering d."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


_WORK = {"q": lambda b, n: b + 1, "kv": lambda b, n: n - b, "full": lambda b, n: n}  # causal q, causal kv


def _varlen_tiles(cu, total, block, work):
    """Work list of a varlen launch: one (document, block) pair per `block`-token tile of each document,
    int32 (n, 2), built on the device without a host sync. Its length is the bound total // block + N;
    the unused tail holds document -1 (the program returns). Tiles are sorted by decreasing work
    (_WORK[work](blk, nblk), in key or query blocks), so the longest programs start first."""
    cu = cu.long()
    n_doc = cu.numel() - 1
    nblk = (cu[1:] - cu[:-1] + block - 1) // block  # tiles per document
    ends = nblk.cumsum(0)
    i = torch.arange(total // block + n_doc, device=cu.device)
    doc = torch.searchsorted(ends, i, right=True)  # tile i belongs to the first document ending after it
    used = doc < n_doc
    doc = doc.clamp(max=n_doc - 1)
    blk = i - (ends - nblk)[doc]
    order = torch.argsort(torch.where(used, _WORK[work](blk, nblk[doc]), -1), descending=True, stable=True)
    return torch.stack((torch.where(used, doc, -1), blk), 1)[order].int().contiguous()


_TILE_CACHE = {}  # (where cu_seqlens lives, its version, total, block, work) -> (cu_seqlens, tiles)


def _tiles(cu, total, block, work):
    """_varlen_tiles, built once per batch: the model passes one cu_seqlens to every layer, so all layers'
    forward and backward launches of a step share two tables (query tiles, key tiles) instead of building
    three per layer. The key is the tensor's memory and version counter (an in-place change rebuilds);
    each entry keeps its cu_seqlens alive, so that memory cannot hold another batch meanwhile. Not while
    a CUDA graph is captured: a replay must rebuild the tables from the batch it is given."""
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return _varlen_tiles(cu, total, block, work)
    key = (cu.device, cu.data_ptr(), cu.stride(0), cu.numel(), cu._version, total, block, work)
    if key not in _TILE_CACHE:
        if len(_TILE_CACHE) >= 8:  # the oldest first: dicts keep insertion order
            del _TILE_CACHE[next(iter(_TILE_CACHE))]
        _TILE_CACHE[key] = cu, _varlen_tiles(cu, total, block, work)
    return _TILE_CACHE[key][1]


def _layout(x, varlen):
    """(batch, token, head) strides: varlen tensors (total, H, D) are one batch row."""
    return (0, *x.stride()[:2]) if varlen else x.stride()[:3]


def _dot_precision(dtype):
    """tl.dot's input_precision: it matters only for fp32 inputs (see the precision note above)."""
    if dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if INTERPRET else "tf32x3"


def _attn_shape(q, k, v, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    Z, T_Q, T_K = (1, q.shape[0], k.shape[0]) if varlen else (q.shape[0], q.shape[1], k.shape[1])
    seq = (max_seqlen or T_Q) if varlen else max(T_Q, T_K)
    d0, d1 = _split_dim(q.shape[-1])
    meta = dict(VARLEN=varlen, DQK=q.shape[-1], D0=d0, D1=d1, DV=v.shape[-1],
                DVP=max(16, triton.next_power_of_2(v.shape[-1])),
                PREC=_dot_precision(q.dtype))
    return Z, T_Q, T_K, min(max(128, triton.next_power_of_2(seq)), 8192), meta


def _flash_fwd(q, k, v, causal, scale, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    Z, T_Q, T_K, bucket, meta = _attn_shape(q, k, v, cu_seqlens, max_seqlen)
    Hq, G = q.shape[-2], q.shape[-2] // k.shape[-2]
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = torch.empty(Z, Hq, T_Q, device=q.device, dtype=torch.float32)
    bm = _own_block("q", q.shape[-1], v.shape[-1])
    if varlen:
        tiles = _tiles(cu_seqlens, T_Q, bm, "q" if causal else "full")
        grid = (tiles.shape[0], Hq, 1)
    else:
        tiles = cu_seqlens = o  # unused pointers
        grid = (triton.cdiv(T_Q, bm), Hq, Z)
    config = _launch_config("fwd", bm, meta, q.element_size())
    kernel = _attn_fwd if config is None else _attn_fwd_kernel
    kernel[grid](q, k, v, o, lse, cu_seqlens, tiles, *_layout(q, varlen), *_layout(k, varlen),
                 *_layout(v, varlen), *_layout(o, varlen), T_Q, T_K, G, scale * _LOG2E, bucket,
                 CAUSAL=causal, BLOCK_M=bm, **meta, **(config or {}))
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal, scale, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    Z, T_Q, T_K, bucket, meta = _attn_shape(q, k, v, cu_seqlens, max_seqlen)
    Hq, Hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    o_strides, do_strides = _layout(o, varlen), _layout(do, varlen)
    _attn_bwd_delta_kernel[(triton.cdiv(T_Q, 64), Hq, Z)](o, do, delta, *o_strides, *do_strides, T_Q,
                                                          DV=meta["DV"], DVP=meta["DVP"], BLOCK_M=64)
    strides = (*_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen), *_layout(do, varlen))
    bn, bm = _own_block("kv", q.shape[-1], v.shape[-1]), _own_block("q", q.shape[-1], v.shape[-1])
    if varlen:  # dK/dV tiles: the first key blocks have the most queries; dQ tiles: the forward's
        kv_tiles = _tiles(cu_seqlens, T_K, bn, "kv" if causal else "full")
        q_tiles = _tiles(cu_seqlens, T_Q, bm, "q" if causal else "full")
        kv_grid, q_grid = (kv_tiles.shape[0], Hkv, 1), (q_tiles.shape[0], Hq, 1)
    else:
        kv_tiles = q_tiles = cu_seqlens = dq  # unused pointers
        kv_grid, q_grid = (triton.cdiv(T_K, bn), Hkv, Z), (triton.cdiv(T_Q, bm), Hq, Z)
    config = _launch_config("dkdv", bn, meta, q.element_size())
    kernel = _attn_bwd_dkdv if config is None else _attn_bwd_dkdv_kernel
    kernel[kv_grid](q, k, v, do, dk, dv, lse, delta, cu_seqlens, kv_tiles, *strides, *_layout(dk, varlen),
                    *_layout(dv, varlen), T_Q, T_K, Hq // Hkv, Hq, scale, scale * _LOG2E, bucket,
                    CAUSAL=causal, BLOCK_N=bn, **meta, **(config or {}))
    config = _launch_config("dq", bm, meta, q.element_size())
    kernel = _attn_bwd_dq if config is None else _attn_bwd_dq_kernel
    kernel[q_grid](q, k, v, do, dq, lse, delta, cu_seqlens, q_tiles, *strides, *_layout(dq, varlen),
                   T_Q, T_K, Hq // Hkv, scale, scale * _LOG2E, bucket, CAUSAL=causal, BLOCK_M=bm, **meta,
                   **(config or {}))
    return dq, dk, dv


def _use_kernel(q, k, v):
    """Triton or the reference, from what is known while tracing too (device, dtype, shapes)."""
    if triton is None or FORCE_REFERENCE or q.numel() == 0 or k.shape[-3] == 0:
        return False
    if not (q.is_cuda or (INTERPRET and q.device.type == "cpu")):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        return False
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's tl.dot on bf16 is wrong (triton#11584)
        return False
    return max(q.shape[-1], v.shape[-1]) <= 256  # larger head dims do not fit on chip: reference


# The kernels as torch.library custom ops: opaque to torch.compile (it calls them, never traces inside),
# each with a fake implementation (output shapes) and its autograd formula, so a compiled model keeps one
# graph through the attention. Where the kernels do not run, `attention` runs the PyTorch reference as
# plain ops, which torch.compile traces like the rest of the model.

@torch.library.custom_op("nano::flash_attn", mutates_args=())
def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, causal: bool,
                scale: float, max_seqlen: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _flash_fwd(q, k, v, causal, scale, cu_seqlens, max_seqlen)


@_flash_attn.register_fake
def _(q, k, v, cu_seqlens, causal, scale, max_seqlen):
    Z, T = (1, q.shape[0]) if cu_seqlens is not None else q.shape[:2]
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(Z, q.shape[-2], T, dtype=torch.float32)


@torch.library.custom_op("nano::flash_attn_backward", mutates_args=())
def _flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens: torch.Tensor | None, causal: bool, scale: float,
                         max_seqlen: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do = do if do.stride(-1) == 1 else do.contiguous()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _flash_bwd(do, q, k, v, o, lse, causal, scale, cu_seqlens, max_seqlen)


@_flash_attn_backward.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, causal, scale, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attn_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, scale, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)  # output: (o, lse)
    ctx.args = causal, scale, max_seqlen


def _flash_attn_grad(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_attn_backward(do, q, k, v, o, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None


_flash_attn.register_autograd(_flash_attn_grad, setup_context=_flash_attn_setup)


def attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None, row_len=0):
    """flash_attention without the argument checks, for callers that checked their arguments once (the
    model checks cu_seqlens once per batch). row_len > 0 promises that every row_len-token row starts at
    a document boundary (the packed training batch): the reference then needs no host sync."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if _use_kernel(q, k, v) and scale > 0:  # the kernels scale after the row max, which needs scale > 0
        if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
            cu_seqlens = cu_seqlens.to(torch.int32)
        return _flash_attn(q, k, v, cu_seqlens, causal, scale, max_seqlen)[0]
    if cu_seqlens is None:
        return _dense_attention(q, k, v, causal, scale)
    if row_len:
        return _rows_reference(q, k, v, cu_seqlens, causal, scale, row_len)
    return attention_reference(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=cu_seqlens)


# -----------------------------------------------------------------------------
# Public entry point

def flash_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Attention: dense q (B, T, Hq, Dqk), k (B, T, Hkv, Dqk), v (B, T, Hkv, Dv) -> (B, T, Hq, Dv),
    or varlen (total, H, D) with cu_seqlens (N+1,) int32 document boundaries. Hkv divides Hq.

    The Triton kernels above run for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), in fp16,
    bf16 or fp32, head dims up to 256; anything else, or FORCE_REFERENCE, runs attention_reference.
    max_seqlen is only a tuning hint here (the kernels read the document lengths from cu_seqlens).
    The arguments are checked (a host read of cu_seqlens) except while torch.compile traces.
    """
    if not torch.compiler.is_compiling():
        _check_attention_args(q, k, v, cu_seqlens, max_seqlen)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen)


# -----------------------------------------------------------------------------
# Linear + cross-entropy
#
# loss = mean over non-ignored rows of logsumexp(s * h W^T) - s * (h W^T)[target], s = softmax_scale.
# Eager PyTorch materialises the (N, V) logits in bf16, an fp32 copy, the fp32 log-softmax saved for
# the backward and its fp32 gradient: at N = 16k tokens and Llama-3's V = 128k that is ~25 GB, far more
# than the rest of a 1B model's activations.
#
# Two designs, chosen by the public function: a mean that needs gradients (the training loss) takes the
# fused one, anything else (evaluation, reduction="sum" / "none": per-token log-probs for DPO) the recompute.
#
# Fused (Liger-Kernel's design): the forward also computes the gradients, row chunk by row chunk over the
# whole vocabulary, through one reused (R, V) buffer (R rows = LCE_CHUNK_BYTES of logits):
#   x_r = h_r @ W^T (cuBLAS); _ce_lse_kernel over the full row; _ce_grad_kernel turns x_r into
#   g_r = (softmax - onehot) * s in place; dh_r = g_r @ W; dW += g_r^T @ h_r (fp32 outputs, fp32 dW)
# and saves dh and dW in fp32 (about 1 GB of dW at V = 128256, D = 2048) with the count of valid rows; the
# backward only multiplies them by d loss / n_valid and rounds once. 3 GEMMs, as eager, and no recompute.
# g leaves out 1/n_valid (and d loss, unknown in the forward): |g| <= s, so fp16 neither overflows nor
# underflows more than eager, which includes a GradScaler's scale over n_valid, a factor of the same size.
#
# Recompute: save only (N,) floats (each row's log-sum-exp; h, W and the targets are inputs that autograd
# holds anyway) and recompute the logits in the backward. The op returns each row's loss; the mean (or
# sum) is taken outside it, so its backward receives d loss / d loss_row per row. Both passes
# walk the vocabulary in chunks of C columns through one reused (N, C) buffer in h's dtype:
#   forward   x_c = h @ W_c^T                      cuBLAS
#             _ce_lse_kernel: per row, online max / sum-exp over the chunk's tiles, carried from chunk to
#                             chunk (Milakov & Gimelshein 2018), target logit picked in its chunk;
#                             the last chunk writes lse and loss_r = lse - s * x[target]
#   backward  x_c = h @ W_c^T                      cuBLAS: the recompute
#             _ce_grad_kernel: x_c <- (exp(s * x_c - lse) - onehot) * s * dloss_row, in place, in
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
# Cost of the recompute: 4 GEMMs of 2 N V D FLOPs against eager's 3, plus three bf16 passes over the
# logits (one read in the forward, a read and a write in the backward). Eager adds about ten passes over
# (N, V), most of them fp32 (upcast, log_softmax, its backward, the downcast: ~80 GB moved at the
# full shape, by arithmetic about two GEMMs' time on an H100). torch.compile fuses those passes into a
# few bf16 ones, so against it the extra GEMM is the whole price: hence the fused design for training,
# whose time target is <= 1.1x compile. Neither is measured yet (bench/loss.py). Ignored rows still
# ride through the GEMMs (dropping them would need their count on the host, a sync); the Triton kernels
# skip their loads.
# The chunk size trades memory for speed: narrow chunks make thin GEMMs and more launches and passes
# over the dh accumulator; a chunk of ~1 GB gives GEMMs of at least 16k x 32k x D at the full shape.
# fp16 (recompute): g is formed in fp32 and multiplied by dloss (which carries a GradScaler's scale) and
# 1/n_valid before its one rounding to fp16, exactly as eager rounds its fp32 gradient: the scale lifts small
# values above fp16's underflow. (Leaving 1/n_valid for after the GEMMs would overflow instead: the
# target column's (p - 1) * 2^16 is below fp16's -65504.)

LCE_CHUNK_BYTES = 1 << 30  # logits chunk size: larger = wider GEMMs and fewer passes, more memory


def linear_cross_entropy_reference(h, weight, targets, *, ignore_index=-100, softmax_scale=None,
                                   reduction="mean"):
    """F.cross_entropy(h @ weight.T * scale, targets): materialises the (N, V) logits."""
    _check_lce_args(h, weight, targets)
    logits = h @ weight.T
    if softmax_scale is not None:
        logits = logits * softmax_scale
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction)


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
    if PIN_CONFIGS:  # one config (no benchmarking): 16 elements per thread, read at full width
        _LSE_CONFIGS = [triton.Config({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=8)]
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
        # in place on a logits chunk: x <- (softmax(s x) - onehot) * gscale[row], 0 on ignored rows;
        # gscale = s * d loss / d loss_row, per row on the device (reading it on the host would cost a sync)
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
        gscale = tl.load(gscale_ptr + rows, mask=valid, other=0.0)
        g = (tl.exp(x * scale - lse[:, None]) - onehot) * gscale[:, None]
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
    # which costs cuBLAS its fastest kernels (nanoGPT pads the vocabulary itself for the same reason).
    # The padding must hold zeros, never uninitialised memory: some GEMMs read a row-strided operand up to
    # its stride and multiply the extra columns by zero (torch 2.13's CPU bf16 mm does), which is harmless
    # for finite values and turns a whole row into NaN when the bits happen to spell one.
    buf = torch.zeros(N, -(-C // 64) * 64, dtype=h.dtype, device=h.device)
    for v0 in range(0, V, C):
        v1 = min(v0 + C, V)
        buf[:, v1 - v0:C].zero_()  # a narrower last chunk: the previous chunk's columns become padding
        x = buf[:, :v1 - v0]
        torch.mm(h, weight[v0:v1].T, out=x)
        yield v0, v1, x


def _lce_forward(h, weight, targets, ignore_index, scale):
    """(loss_rows, lse): each row's loss (0 where ignored) and fp32 log-sum-exp of the scaled logits."""
    N, V = h.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    lse, loss_rows = torch.empty(N, **f32), torch.zeros(N, **f32)
    m, d, x_t = (torch.empty(N, **f32) for _ in range(3))  # each row's running state between chunks
    if N:
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        for v0, v1, x in _lce_chunks(h, weight):
            _ce_lse_kernel[grid](x, targets, m, d, x_t, lse, loss_rows, N, v1 - v0, x.stride(0), v0,
                                 ignore_index, scale, FIRST=v0 == 0, LAST=v1 == V)
    return loss_rows, lse


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


def _mm_f32(a, b):
    """a @ b summed and returned in fp32 (one rounding, as cuBLAS's fp32 accumulator has it)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # a torch without mm(out_dtype=): round to a's dtype first, then widen
            return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())  # CPU has no low-precision mm with an fp32 output


def _lce_fused(h, weight, targets, ignore_index, scale, need_dh, need_dw):
    """The training loss with its gradients in the same pass (see "Fused" above): (loss, dh, dw, n_valid),
    dh and dw in fp32 and not yet divided by n_valid (the backward folds that into d loss)."""
    N, D = h.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    lse, loss_rows, unused = torch.empty(N, **f32), torch.zeros(N, **f32), torch.empty(1, **f32)
    gscale = torch.full((N,), scale, **f32)  # g = (softmax - onehot) * s: no 1/n_valid, no fp16 underflow
    dh = torch.empty(N, D, **f32) if need_dh else h.new_empty(0, dtype=torch.float32)
    dw = torch.zeros(V, D, **f32) if need_dw else h.new_empty(0, dtype=torch.float32)
    rows = max(1, min(N, LCE_CHUNK_BYTES // (V * h.element_size())))
    buf = torch.zeros(rows, -(-V // 64) * 64, dtype=h.dtype, device=h.device)  # padded as in _lce_chunks
    bn, bv = _GRAD_BLOCKS["BLOCK_N"], _GRAD_BLOCKS["BLOCK_V"]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, t_c, x = h[r0:r1], targets[r0:r1], buf[:r1 - r0, :V]
        torch.mm(h_c, weight.T, out=x)
        grid = lambda META: (triton.cdiv(r1 - r0, META["BLOCK_N"]),)  # noqa: E731
        _ce_lse_kernel[grid](x, t_c, unused, unused, unused, lse[r0:r1], loss_rows[r0:r1], r1 - r0, V,
                             x.stride(0), 0, ignore_index, scale, FIRST=True, LAST=True)  # the whole row
        _ce_grad_kernel[(triton.cdiv(r1 - r0, bn), triton.cdiv(V, bv))](
            x, t_c, lse[r0:r1], gscale, r1 - r0, V, x.stride(0), 0, ignore_index, scale, **_GRAD_BLOCKS)
        if need_dh:
            dh[r0:r1] = _mm_f32(x, weight)
        if need_dw:
            dw += _mm_f32(x.T, h_c)
    n_valid = (targets != ignore_index).sum(dtype=torch.float32)
    return loss_rows.sum() / n_valid, dh, dw, n_valid  # 0 / 0 = NaN when every row is ignored, as torch


# The ops. Recompute: (loss_rows, lse), its backward a second op taking d loss / d loss_row (see flash
# attention's ops above); the mean is taken outside, in plain ops. Fused: (loss, dh, dw, n_valid), whose
# backward only scales the saved gradients.

@torch.library.custom_op("nano::linear_ce", mutates_args=())
def _linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(h.device.type, enabled=False):  # the chunk GEMMs run in the dtype of h and weight
        return _lce_forward(h, weight, targets.contiguous(), ignore_index, scale)


@_linear_ce.register_fake
def _(h, weight, targets, ignore_index, scale):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("nano::linear_ce_backward", mutates_args=())
def _linear_ce_backward(dloss_rows: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        lse: torch.Tensor, ignore_index: int, scale: float, need_dh: bool,
                        need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # every factor of d loss / d logit but (softmax - onehot), per row on the device; ignored rows are
    # masked to 0 (an all-ignored mean sends inf = 1 / 0 there: zero gradients, as torch)
    gscale = (dloss_rows.float() * scale).contiguous()
    with torch.autocast(h.device.type, enabled=False):
        dh, dw = _lce_backward(h, weight, targets.contiguous(), lse, gscale, ignore_index, scale, need_dh,
                               need_dw)
    return (dh if need_dh else h.new_empty(0)), (dw if need_dw else weight.new_empty(0))  # ops return tensors


@_linear_ce_backward.register_fake
def _(dloss_rows, h, weight, targets, lse, ignore_index, scale, need_dh, need_dw):
    return (torch.empty_like(h) if need_dh else h.new_empty(0)), \
        (torch.empty_like(weight) if need_dw else weight.new_empty(0))


def _linear_ce_setup(ctx, inputs, output):
    h, weight, targets, ignore_index, scale = inputs
    ctx.save_for_backward(h, weight, targets, output[1])  # the inputs and (N,) floats: no logits
    ctx.args = ignore_index, scale


def _linear_ce_grad(ctx, dloss_rows, _dlse):
    h, weight, targets, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    dh, dw = _linear_ce_backward(dloss_rows, h, weight, targets, lse, *ctx.args, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


_linear_ce.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


@torch.library.custom_op("nano::linear_ce_fused", mutates_args=())
def _linear_ce_fused(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                     scale: float, need_dh: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor, torch.Tensor]:
    with torch.autocast(h.device.type, enabled=False):
        return _lce_fused(h, weight, targets.contiguous(), ignore_index, scale, need_dh, need_dw)


@_linear_ce_fused.register_fake
def _(h, weight, targets, ignore_index, scale, need_dh, need_dw):
    f32 = dict(dtype=torch.float32)
    return (h.new_empty((), **f32), h.new_empty(h.shape if need_dh else (0,), **f32),
            h.new_empty(weight.shape if need_dw else (0,), **f32), h.new_empty((), **f32))


def _linear_ce_fused_setup(ctx, inputs, output):
    h, weight = inputs[:2]
    ctx.save_for_backward(*output[1:])  # dh, dw (fp32) and n_valid: h, W and no logits
    ctx.dtypes = h.dtype, weight.dtype


def _linear_ce_fused_grad(ctx, dloss, _ddh, _ddw, _dn):
    dh, dw, n_valid = ctx.saved_tensors
    g = dloss.float() / n_valid.clamp(min=1)  # one fp32 product, then one rounding: as eager's fp16
    dh = (dh * g).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dw = (dw * g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None


_linear_ce_fused.register_autograd(_linear_ce_fused_grad, setup_context=_linear_ce_fused_setup)


def _lce_use_triton(h):
    if triton is None or FORCE_REFERENCE:
        return False
    return h.is_cuda or (INTERPRET and h.device.type == "cpu")


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, softmax_scale=None, reduction="mean"):
    """Mean cross-entropy of the logits h @ weight.T (h (N, D), weight (V, D), targets (N,) int64) over
    the targets that are not ignore_index, without materialising the (N, V) logits on the fast path.

    softmax_scale multiplies the logits before the softmax. reduction: "mean" (the signature's default),
    "sum", or "none" for each row's loss (0 where ignored; DPO's per-token log-probs are minus these).
    Every target ignored: NaN mean and zero gradients (torch's mean over no elements). Under torch.autocast,
    h and weight are cast to the autocast dtype first, as F.linear would be. A target outside [0, V) gives a
    NaN loss on the fast path (eager PyTorch raises or asserts). The arguments are checked except while
    torch.compile traces. A mean that needs gradients takes the fused path (gradients in the forward);
    anything else the recompute path (see the design note above).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not torch.compiler.is_compiling():
        _check_lce_args(h, weight, targets)
    if not _lce_use_triton(h):
        return linear_cross_entropy_reference(h, weight, targets, ignore_index=ignore_index,
                                              softmax_scale=softmax_scale, reduction=reduction)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}; cast one or "
                         "run under torch.autocast")
    scale = 1.0 if softmax_scale is None else float(softmax_scale)
    grad = torch.is_grad_enabled()
    need_dh, need_dw = grad and h.requires_grad, grad and weight.requires_grad
    if reduction == "mean" and (need_dh or need_dw) and h.shape[0]:
        return _linear_ce_fused(h, weight, targets, ignore_index, scale, need_dh, need_dw)[0]
    rows = _linear_ce(h, weight, targets, ignore_index, scale)[0]
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (targets != ignore_index).sum(dtype=torch.float32)  # 0 / 0 = NaN, as torch
