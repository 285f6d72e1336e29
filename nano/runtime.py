"""Where the model runs: device and dtype (decided once, with the reason), autocast, FLOPs and MFU."""
from contextlib import nullcontext

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10G", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
]


def pick_device(device="auto", dtype="auto"):
    """(torch.device, torch.dtype, reason). CUDA with bf16 when it is supported, else fp16 with a
    GradScaler; CPU in fp32 (CPU autocast is slower than fp32 for small models)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dtype != "auto":
        if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use --dtype fp16 (with loss scaling)")
        return dev, DTYPES[dtype], f"--dtype {dtype} as asked"
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return dev, torch.bfloat16, "CUDA GPU with bf16 support: bf16 autocast, no loss scaling needed"
        return dev, torch.float16, "CUDA GPU without bf16: fp16 autocast with a GradScaler"
    return dev, torch.float32, f"{dev.type}: fp32 (low-precision autocast does not pay off there)"


def autocast(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device):
    """Dense bf16 peak of the GPU, or None when it is not in the table (MFU is then 'unknown')."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(model, seq_len, cu_seqlens=None):
    """Training FLOPs per token (forward + backward = 3x forward) of the actual architecture.

    Matmuls: 2 FLOPs per weight per token in the forward; the embedding lookup is free; routed
    experts count only the fraction of them a token visits (k of E). Attention: QK^T and PV cost
    2 * T_ctx * (Dqk + Dv) per head per token, T_ctx the mean number of keys a query sees under the
    causal mask: (T + 1) / 2 for rows of seq_len tokens, or, with packed documents (cu_seqlens on the
    host: a CPU tensor or array), sum L (L + 1) / 2 / sum L over the document lengths L, the work the
    varlen kernel does (counting full rows overstates MFU by ~20% at 124m, T = 2048).
    """
    cfg = model.config
    matmul = 0
    embedding = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if p.dim() < 2 or (p is embedding and not cfg.tie_embeddings):  # a lookup, unless tied to the head
            continue
        n = p.numel()
        if ".experts." in name and cfg.n_routed_experts:
            n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
        matmul += n
    matmul += cfg.mtp_depth * model.output.weight.numel()  # each MTP module reuses the LM head
    if cfg.attn == "mla":
        dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.head_dim
    if cu_seqlens is None:
        ctx = (seq_len + 1) / 2
    else:
        lens = np.diff(np.asarray(cu_seqlens, dtype=np.float64))
        ctx = (lens * (lens + 1) / 2).sum() / lens.sum()
    attn = cfg.n_layer * cfg.n_head * 2 * (dqk + dv) * ctx
    return 3 * (2 * matmul + attn)
