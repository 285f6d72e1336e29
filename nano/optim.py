"""Optimizers and the learning-rate schedule: Muon, the AdamW parameter groups, `lr_at`.

Muon (Keller Jordan, 2024, "Muon: An optimizer for hidden layers in neural networks") is SGD with
Nesterov momentum whose update for a weight matrix is replaced by the nearest semi-orthogonal matrix:
for momentum M = U S V^T the step is U V^T (every singular value set to ~1). A plain gradient step is
dominated by a few large singular directions; the orthogonalised step moves every direction the same
amount, which trains hidden matrices in fewer steps. It only makes sense for matrices, so train.py
with `--optimizer muon` gives Muon the hidden weights (every >= 2-D tensor but the embedding and the
output head: attention and MLA projections, MLP, routers, experts as stacks, MTP projections and
blocks) and AdamW the rest (embedding, head, norms, biases).
"""
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from nano.lora import is_lora

# Quintic Newton-Schulz coefficients of Keller Jordan's Muon: p(x) = a x + b x^3 + c x^5 is steep at 0
# (slope a = 3.4445) so that small singular values grow fast, at the price of not converging to 1: after
# 5 steps, every singular value x >= 3e-3 of G / ||G||_F lands in [0.68, 1.21] (tests/test_optim.py
# checks this band). That is close enough: the update's direction matters, not an exact 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, dtype=None):
    """Approximate orthogonalisation U V^T of G = U S V^T, for a matrix (m, n) or a stack (E, m, n).

    Runs in bf16 on CUDA (the iteration tolerates its rounding, as in Keller Jordan's Muon), in fp32
    elsewhere; `dtype` overrides. Returns G's shape in G's dtype.
    """
    a, b, c = NS_COEFFS
    dtype = dtype or (torch.bfloat16 if G.is_cuda else torch.float32)
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: X X^T is then the smaller (min(m, n))^2 Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # ||X||_2 <= ||X||_F = 1: inside p's basin
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X  # = p(X), acting on each singular value alone
    if tall:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Orthogonalised Nesterov momentum for matrices and stacks of matrices (MoE experts, (E, m, n)).

    Per step, with gradient g of a weight W of shape (rows, cols), or (E, rows, cols):
        buf = momentum * buf + g
        u   = g + momentum * buf   (Nesterov)     or   buf
        W  -= lr * (weight_decay * W + 0.2 * sqrt(max(rows, cols)) * newton_schulz(u))

    The scale is Moonlight's RMS matching (Liu et al. 2025, arXiv 2502.16982, section 2.2): an m x n
    orthogonal matrix has RMS 1 / sqrt(max(m, n)), so the scaled update has RMS 0.2 whatever the shape,
    about that of an AdamW update. One learning rate then suits every shape, and an AdamW learning rate
    and weight decay are a good start. (modded-nanogpt's sqrt(max(1, rows/cols)) keeps the update's
    spectral norm instead; its learning rates are then not comparable with AdamW's, by a factor that
    depends on the shape.) Weight decay is decoupled, as in AdamW.

    Distributed: under DDP every process holds the full, all-reduced gradient and does the same
    orthogonalisation (redundant, simplest: no extra communication). Under FSDP2 parameters, gradients
    and momentum are sharded DTensors: the momentum update is elementwise on the local shard, then the
    full update matrix is gathered (`full_tensor()`), orthogonalised on every process, and each process
    keeps its own shard of the result.
    """

    def __init__(self, params, lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes matrices (2-D) and stacks of them (3-D), got shape "
                                     f"{tuple(p.shape)}; give it to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)
                u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                if isinstance(u, DTensor):  # FSDP2: orthogonalise the whole matrix, keep this shard
                    full = newton_schulz(u.full_tensor(), group["ns_steps"])
                    u = distribute_tensor(full, u.device_mesh, u.placements, src_data_rank=None)
                else:
                    u = newton_schulz(u, group["ns_steps"])
                rows, cols = p.shape[-2:]
                p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))
        return loss


# -----------------------------------------------------------------------------
# Building the optimizers of a model

def param_groups(model, muon=False):
    """The model's trainable parameters, split for the optimizers (disjoint lists):
    - "muon" (only when `muon`): the hidden matrices, every >= 2-D tensor but the embedding and the head;
    - "decay" (AdamW with weight decay): the other >= 2-D tensors but the embedding (the untied head, or
      every matrix without Muon);
    - "no_decay" (AdamW without): norms, biases, scalars, and the embedding (tied: the head too). An
      embedding row is trained only by its own token: decaying rows shrinks the rare tokens (nanoGPT).

    Frozen parameters (requires_grad False) are left out. A LoRA model (nano/lora.py) trains only its
    adapters and new-token rows, all "no_decay": decay would pull A and B toward zero, i.e. the whole
    fine-tune back toward the base (alpha / r already sets the update's size), and the rows are embedding
    rows. Muon is refused there: its orthogonalised step is meant for full hidden matrices,
    not for rank-r factors.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if is_lora(model):
        if muon:
            raise ValueError("--optimizer muon does not apply to LoRA adapters: use adamw")
        return {"decay": [], "no_decay": params}
    embedding, head = model.tok_embeddings.weight, model.output.weight
    matrices = [p for p in params if p.dim() >= 2 and p is not embedding]  # the head too, when untied
    groups = {"no_decay": [p for p in params if p.dim() < 2 or p is embedding]}
    if muon:
        groups["muon"] = [p for p in matrices if p is not head]
        groups["decay"] = [p for p in matrices if p is head]
    else:
        groups["decay"] = matrices
    return groups


def build_optimizers(model, cfg, fused=False):
    """{"adamw": AdamW} or, with cfg.optimizer == "muon", {"adamw": AdamW for the rest, "muon": Muon for
    the hidden matrices}. The lr set here is the peak; train.py sets each step's from `lr_at`."""
    groups = param_groups(model, muon=cfg.optimizer == "muon")
    adamw = [{"params": groups["decay"], "weight_decay": cfg.weight_decay},
             {"params": groups["no_decay"], "weight_decay": 0.0}]
    # no empty group (tied embeddings under Muon leave "decay" empty): torch.distributed's optimizer
    # state dicts refuse them when there are several optimizers
    optimizers = {"adamw": torch.optim.AdamW([g for g in adamw if g["params"]], lr=cfg.lr,
                                             betas=(cfg.beta1, cfg.beta2), fused=fused)}
    if "muon" in groups:
        optimizers["muon"] = Muon(groups["muon"], lr=peak_lr("muon", cfg), weight_decay=cfg.weight_decay)
    return optimizers


def peak_lr(name, cfg):
    """The peak learning rate of optimizer `name` ("adamw" | "muon"): --lr, or --muon-lr (default --lr)."""
    if name == "muon" and cfg.muon_lr is not None:
        return cfg.muon_lr
    return cfg.lr


def lr_at(step, cfg, peak=None):
    """Learning rate at `step` (0-based) for a peak of `peak` (default cfg.lr): linear warmup over
    warmup_steps, then cosine down to peak * min_lr_ratio at max_steps (schedule "cosine"), or flat
    until 80% of max_steps and then linear down to it (warmup-stable-decay, "wsd": Hu et al. 2024,
    MiniCPM; a run can be extended from a checkpoint taken before the decay)."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    lo = peak * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = int(0.8 * cfg.max_steps)
        frac = max(0.0, (step - start) / max(1, cfg.max_steps - start))
        return peak - (peak - lo) * frac
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * frac))
