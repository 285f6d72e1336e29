"""Mixture-of-experts feed-forward, DeepSeek-V3 style (arXiv 2412.19437, section 2.1.2).

Every token goes through the shared experts (a plain SwiGLU MLP, always on) and through the k routed
experts its router picks. The router scores each expert with a sigmoid (or a softmax: Mixtral, Qwen3-MoE),
keeps only the best `topk_group` of `n_group` expert groups (group-limited routing bounds how many
devices a token is sent to), picks the top k among those, and weights the k experts by their scores,
renormalised and multiplied by `routed_scaling_factor`.

Load balancing is auxiliary-loss-free (Wang et al. 2024, arXiv 2408.15664): a per-expert bias is added to
the scores for the *selection* only (never to the weights), and after each optimizer step it moves by
gamma toward balance: down for experts that got more than the mean load, up for those that got less
(`MoE.update_bias`, called for every layer by `Transformer.update_moe_bias`). An optional sequence-wise
balance loss (`aux_loss_alpha`, DeepSeek-V3 eq. 17-20) can be added on top. Routing is dropless: no
capacity limit, no token is dropped.

Dispatch (the routed experts' SwiGLU on the rows routed to them), `moe_impl`:
- "loop": one matmul per expert, rows gathered with torch.where (data-dependent shapes). The eager CPU
  path and the test oracle.
- "dense": every expert on every token, each output weighted by the token's routing weight for that
  expert (zero unless chosen): static shapes that torch.compile traces, for E/k times the routed
  FLOPs. What "auto" takes on CPU under torch.compile.
- "grouped": sort the (token, expert) pairs by expert and run each projection as one
  `torch._grouped_mm` over the sorted rows, no Python loop over experts. Its fast CUDA kernel is bf16 on
  sm90+ (Hopper, Blackwell) in current torch; it also runs (slowly) on CPU in fp32, which is how the
  tests reach it.
- "bmm": the same sort, then a padded batched matmul: each expert's rows are packed into an (E, C, D)
  buffer, C = the busiest expert's row count. For CUDA without a usable `_grouped_mm` (pre-Hopper, fp16,
  fp32, older torch); it spends FLOPs on the padding and reads C with one device-to-host sync.
"auto" takes "grouped" on CUDA when `_grouped_mm` has a fast kernel for the dtype, "bmm" on other CUDA
setups, and "loop" on CPU ("dense" while torch.compile traces). "grouped" has no host sync: the row
offsets come from a scatter-add and a cumsum on the device.

The load counters (tokens routed to each expert since the last bias update) are device buffers; a
forward returns its routing record (MoEAux) instead of storing it, because a checkpointed block runs
its forward twice: Transformer passes the records of the forward it keeps to `record_loads` once.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def swiglu(a, b):
    return F.silu(a) * b


class MoEAux(NamedTuple):
    """What one MoE forward reports: load (E,) tokens routed to each expert; balance, the sequence-wise
    balance loss (None unless aux_loss_alpha > 0 in training)."""
    load: torch.Tensor
    balance: torch.Tensor | None


class Gate(nn.Module):
    """The router: (weights (N, k), expert ids (N, k), scores (N, E)) for N tokens."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.score_func, self.norm_topk_prob = config.score_func, config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.n_embd))
        # the balancing bias is state, not a parameter: no gradient, moved by the sign rule; saved in
        # checkpoints (HF name: e_score_correction_bias)
        self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x):
        N, E = x.shape[0], self.weight.shape[0]
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32: near-ties decide the top-k
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias.float()  # the bias steers the selection only
        if self.n_group > 1:
            # a group's score is the sum of its two best experts (DeepSeek-V3); keep the topk_group best
            groups = choice.view(N, self.n_group, E // self.n_group)
            group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # (N, n_group)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scale, idx, scores


# -----------------------------------------------------------------------------
# Dispatch: x (N, D), weights and idx (N, k), expert weights w1, w3 (E, H, D) and w2 (E, D, H) in
# nn.Linear's (out, in) layout -> (N, D). `act(a, b)` is the SwiGLU (checkpointed or not).

def moe_loop(x, weights, idx, w1, w2, w3, act):
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):  # empty experts run too: their weights get zero (not None) gradients
        tok, slot = torch.where(idx == e)
        xe = x[tok]
        ye = act(xe @ w1[e].T, xe @ w3[e].T) @ w2[e].T
        out.index_add_(0, tok, ye * weights[tok, slot, None])
    return out


def moe_dense(x, weights, idx, w1, w2, w3, act):
    gate = torch.zeros(x.shape[0], w1.shape[0], dtype=x.dtype, device=x.device)
    gate = gate.scatter(1, idx, weights)  # (N, E): the routing weight, 0 for the experts not chosen
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        out = out + (act(x @ w1[e].T, x @ w3[e].T) @ w2[e].T) * gate[:, e, None]
    return out


def _sort_by_expert(idx, n_experts):
    """Row order grouping the N*k (token, expert) pairs by expert, the token of each sorted row, and
    the row count of each expert."""
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    return order, order // idx.shape[1], count_tokens(idx, n_experts)


def count_tokens(idx, n_experts):
    """Rows per expert. Not torch.bincount: on CUDA it reads the max id back to the host (a sync)."""
    flat = idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=idx.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def moe_grouped(x, weights, idx, w1, w2, w3, act):
    order, tok, counts = _sort_by_expert(idx, w1.shape[0])
    offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group

    def mm(a, w):  # a (rows, in) @ w[e].T for each expert's rows
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
    xs = x[tok]  # (N*k, D), grouped by expert
    ys = mm(act(mm(xs, w1), mm(xs, w3)), w2) * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, ys)


def moe_bmm(x, weights, idx, w1, w2, w3, act):
    E = w1.shape[0]
    order, tok, counts = _sort_by_expert(idx, E)
    expert = idx.reshape(-1)[order]
    rank = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]  # row in expert
    C = int(counts.max())  # device-to-host sync: the padded buffer's size
    buf = x.new_zeros(E, C, x.shape[1])
    buf = buf.index_put((expert, rank), x[tok])  # (E, C, D), zero rows as padding
    h = act(torch.bmm(buf, w1.transpose(1, 2)), torch.bmm(buf, w3.transpose(1, 2)))
    ys = torch.bmm(h, w2.transpose(1, 2))[expert, rank] * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, ys)


DISPATCH = {"loop": moe_loop, "dense": moe_dense, "grouped": moe_grouped, "bmm": moe_bmm}


def grouped_mm_fast(x, w):
    """Whether torch._grouped_mm has a fast (fused, no host sync) CUDA kernel for these operands: bf16
    on sm90+ with 16-byte aligned rows. Elsewhere torch runs a per-group loop, or nothing at all."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == w.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0)


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: w1 (gate), w3 (up) (E, H, D) and w2 (down) (E, D, H)."""

    def __init__(self, n_experts, dim, hidden, impl="auto"):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x, weights, idx):
        return self.run(x, weights, idx, self.w1, self.w2, self.w3)

    def run(self, x, weights, idx, w1, w2, w3):
        """The routed experts' output with explicit weight stacks (this module's own in forward; LoRA
        passes its adapted W + s * B @ A, nano/lora.py)."""
        impl = self.impl
        if impl == "auto" and x.is_cuda:
            impl = "grouped" if grouped_mm_fast(x, w1) else "bmm"
        elif impl == "auto":
            impl = "dense" if torch.compiler.is_compiling() else "loop"
        return DISPATCH[impl](x, weights.to(x.dtype), idx, w1, w2, w3, swiglu)


class MoE(nn.Module):
    """Shared experts + routed experts: forward(x) -> (y, MoEAux)."""

    def __init__(self, config, shared_experts=None):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.n_embd, config.moe_intermediate_size,
                               config.moe_impl)
        self.shared_experts = shared_experts  # an MLP of width moe_intermediate_size * n_shared_experts
        self.k, self.alpha = config.num_experts_per_tok, config.aux_loss_alpha
        self.gamma = config.bias_update_rate
        # tokens routed to each expert since the last update_bias (training forwards only), and the load
        # that the last update_bias used (for logging right after the update). Not in checkpoints: they
        # are empty after every optimizer step. (train.py's DDP does not broadcast buffers: rank 0's
        # counts would overwrite every other rank's.)
        E = config.n_routed_experts
        self.register_buffer("load", torch.zeros(E), persistent=False)
        self.register_buffer("used_load", torch.zeros(E), persistent=False)

    @torch.no_grad()
    def init_weights(self, std, resid_std):
        """Router and routed experts normal(0, std), experts.w2 (a residual write) normal(0, resid_std);
        the balancing bias and the load counters zero. (The shared experts are an MLP: Transformer's.)"""
        nn.init.normal_(self.gate.weight, 0.0, std)
        nn.init.normal_(self.experts.w1, 0.0, std)
        nn.init.normal_(self.experts.w3, 0.0, std)
        nn.init.normal_(self.experts.w2, 0.0, resid_std)
        for t in (self.gate.expert_bias, self.load, self.used_load):
            t.zero_()

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, idx, scores = self.gate(flat)
        y = self.experts(flat, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        E = scores.shape[-1]
        balance = None
        if self.training and self.alpha > 0 and torch.is_grad_enabled():
            balance = self.alpha * self.balance_loss(scores.view(B, T, E), idx.view(B, T, -1))
        return y.view(B, T, D), MoEAux(count_tokens(idx, E).float(), balance)

    def balance_loss(self, scores, idx):
        """DeepSeek-V3's sequence-wise balance loss, per row: sum_i f_i P_i, with f_i the fraction of
        the row's tokens routed to expert i times E/k (1 when balanced) and P_i the mean of expert i's
        normalised score over the row; mean over rows. f has no gradient; P carries it to the router."""
        B, T, E = scores.shape
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, idx.reshape(B, -1), torch.ones(idx.reshape(B, -1).shape, device=scores.device))
        f = hits * E / (self.k * T)
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load=None):
        """The sign rule: bias_i += gamma * sign(mean load - load_i). `load` defaults to the tokens
        counted since the last call (update_biases passes them all-reduced across ranks)."""
        load = self.load if load is None else load
        bias = self.gate.expert_bias
        bias.add_((self.gamma * torch.sign(load.mean() - load)).to(bias.dtype))  # no load: sign(0) = 0
        # keep the last real load through calls with none (no host sync)
        self.used_load.copy_(torch.where(load.sum() > 0, load, self.used_load))
        self.load.zero_()

    def stats(self):
        """max/mean and min/mean of the expert loads (1.0 = perfectly balanced), 0-d device tensors: the
        load counted since the last update_bias, or the one that call used; 0 before any count."""
        load = torch.where(self.load.sum() > 0, self.load, self.used_load)
        mean = load.mean().clamp(min=1e-9)
        return {"max_load": load.max() / mean, "min_load": load.min() / mean}


# -----------------------------------------------------------------------------
# The interface Transformer uses: what one forward's routing records add up to, and the balancing.

def balance_loss(aux):
    """The sum of the balance losses in a forward's records (None entries are dense blocks), or None."""
    terms = [a.balance for a in aux if a is not None and a.balance is not None]
    return torch.stack(terms).sum() if terms else None


@torch.no_grad()
def record_loads(ffns, aux):
    """Add each MoE layer's routed-token counts from one training forward to its counters (ffns: the
    blocks' feed-forward modules, in the order of aux)."""
    for ffn, a in zip(ffns, aux):
        if a is not None:
            ffn.load.add_(a.load)


@torch.no_grad()
def update_biases(moes):
    """After an optimizer step: the sign rule in every layer, with loads summed over all ranks."""
    for m, load in zip(moes, all_reduce_loads([m.load for m in moes])):
        m.update_bias(load)


def load_stats(named):
    """Expert load balance over named MoE layers [(name, MoE)], as 0-d device tensors."""
    stats, lo = {}, []
    for name, m in named:
        s = m.stats()
        stats[f"moe/max_load/{name}"] = s["max_load"]
        lo.append(s["min_load"])
    if lo:
        stats["moe/max_load"] = torch.stack(list(stats.values())).max()
        stats["moe/min_load"] = torch.stack(lo).min()
    return stats


def all_reduce_loads(loads):
    """Sum the per-layer load counters of all ranks (one collective), so every rank moves its biases the
    same way and the replicas stay identical."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not loads:
        return loads
    flat = torch.stack(loads)
    dist.all_reduce(flat)
    return list(flat.unbind(0))
