"""LoRA (Hu et al. 2021, arXiv 2106.09685): fine-tune a frozen base through low-rank adapters.

A wrapped weight W (out, in) acts as W + (alpha / r) * B @ A, with A (r, in) random and B (out, r) zero at
the start, so training starts from the base model exactly. Only A and B train (fp32 parameters, whatever
the base's dtype); the base weights are frozen (requires_grad False) and stored once, in the modules
they always lived in. MoE experts (3-D stacks, nano.moe.Experts) get one A, B pair per expert.

Tokens the base never trained (the chat special tokens added by Transformer.grow_vocab before
apply_lora) keep trainable embedding and output rows (TrainableRows), as PEFT's trainable_token_indices
do: with those rows frozen at their initial values a model never learns to emit its end-of-turn token.

Parameter names (stable; what lora_state_dict returns, train.py's checkpoints hold):
    <path>.base.weight                 the frozen nn.Linear weight          (LoRALinear)
    <path>.lora_A  (r, in)             <path>.lora_B  (out, r)              (LoRALinear)
    <experts>.base.w1/w2/w3            the frozen expert stacks             (LoRAExperts)
    <experts>.lora_A_w1 (E, r, in)     <experts>.lora_B_w1 (E, out, r)      (LoRAExperts, per adapted stack)
    tok_embeddings.base.weight, output.base.weight                          (TrainableRows: frozen base)
    tok_embeddings.rows (n, D), output.rows (untied only)                   (TrainableRows: trainable rows)
    tok_embeddings.ids (n,) buffer: the token ids of the rows
lora_state_dict() is the adapters, the rows and "tok_embeddings.ids"; base_state_dict() is the base
under a plain Transformer's names; merge_lora() folds everything back into a plain Transformer.

Tied embeddings (tok_embeddings.weight is output.weight): the two TrainableRows share one `rows`
parameter, as the base shares one weight, so the tied model's head row of a new token stays its
embedding row and a merge writes one tensor that stays tied.

The router (MoE gate and its balancing bias) belongs to the frozen base: apply_lora sets the MoE layers'
bias update rate to 0, so train.py's update_moe_bias leaves the base bit-identical (merge_lora restores
it).
"""
import hashlib
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nano.moe import Experts, MoE

# the attention (GQA and MLA) and MLP projections, the shared and routed experts' included; never the
# router, the norms, the embedding or the head (those are what TrainableRows is for)
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wkv_b", "w1", "w2", "w3")
EXPERT_WEIGHTS = ("w1", "w2", "w3")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * x A^T B^T around a frozen nn.Linear `base`."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        out_f, in_f = base.weight.shape
        dev = base.weight.device
        # A as nn.Linear initialises a weight (kaiming uniform, a=sqrt(5): U(+-1/sqrt(in))), as PEFT does;
        # B zero so that the adapted model starts as the base
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True  # lora_disabled() switches it (a recompile under torch.compile, once)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        # adapters in x's dtype (autocast casts them anyway); the scale on the small (.., r) tensor
        h = F.linear(x, self.lora_A.to(x.dtype)) * self.scale
        return y + F.linear(h, self.lora_B.to(h.dtype)).to(y.dtype)

    def delta(self):
        """(alpha / r) * B @ A, (out, in), fp32."""
        return self.scale * (self.lora_B @ self.lora_A)

    @property
    def weight(self):
        """The effective weight W + (alpha / r) B A in the base's dtype, differentiable in the adapters
        (MLA's absorbed decode reads wkv_b.weight); the base weight under lora_disabled."""
        w = self.base.weight
        return (w + self.delta().to(w.dtype)) if self.enabled else w


class LoRAExperts(nn.Module):
    """LoRA on nano.moe.Experts: for each adapted stack (w1, w2, w3 or a subset), one (A, B) per expert,
    A (E, r, in) and B (E, out, r). The forward folds them in on the fly, W + (alpha / r) * B @ A per
    expert, and runs the base's own dispatch with those weights: exact and simple, at the cost of one
    (E, out, in) weight stack per adapted stack per forward (fine for tiny and medium expert counts; a
    many-expert model would rather add the low-rank path inside the dispatch). The sum is in the base's
    dtype: with a bf16 base (no fp32 master weights) a small update is rounded as the bf16 matmul would
    round it anyway, and the gradient still reaches A and B in full."""

    def __init__(self, base: Experts, rank, alpha, names=EXPERT_WEIGHTS):
        super().__init__()
        self.base, self.rank, self.scale, self.names = base, rank, alpha / rank, tuple(names)
        for n in self.names:
            w = getattr(base, n)
            E, out_f, in_f = w.shape
            bound = 1 / math.sqrt(in_f)  # what kaiming_uniform(a=sqrt(5)) gives each expert's (r, in) A
            A = torch.empty(E, rank, in_f, device=w.device, dtype=torch.float32).uniform_(-bound, bound)
            self.register_parameter(f"lora_A_{n}", nn.Parameter(A))
            self.register_parameter(f"lora_B_{n}", nn.Parameter(torch.zeros(E, out_f, rank, device=w.device,
                                                                            dtype=torch.float32)))
        self.enabled = True

    def delta(self, name):
        """(alpha / r) * B @ A of stack `name`, (E, out, in), fp32."""
        return self.scale * (getattr(self, f"lora_B_{name}") @ getattr(self, f"lora_A_{name}"))

    def adapted(self, name):
        """Stack `name` as the forward uses it: W + (alpha / r) B A in the base's dtype, or W."""
        w = getattr(self.base, name)
        if not self.enabled or name not in self.names:
            return w
        return w + self.delta(name).to(w.dtype)

    w1 = property(lambda self: self.adapted("w1"))
    w2 = property(lambda self: self.adapted("w2"))
    w3 = property(lambda self: self.adapted("w3"))

    def forward(self, x, weights, idx):
        return self.base.run(x, weights, idx, self.adapted("w1"), self.adapted("w2"), self.adapted("w3"))


class TrainableRows(nn.Module):
    """A frozen nn.Embedding or nn.Linear head `base` whose rows for the token ids `ids` train, through a
    small fp32 parameter `rows` (len(ids), D) that replaces them (initialised to the base's rows, so the
    model starts as the base). `rows` may be given: the tied head shares the embedding's."""

    def __init__(self, base, ids, rows=None):
        super().__init__()
        self.base, self.embedding = base, isinstance(base, nn.Embedding)
        V = base.weight.shape[0]
        ids = torch.as_tensor(ids, dtype=torch.long, device=base.weight.device)
        self.register_buffer("ids", ids)
        # slot[token] = its row in `rows`, -1 for the base's own tokens (a lookup with no search)
        slot = torch.full((V,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("slot", slot, persistent=False)
        self.rows = rows if rows is not None else nn.Parameter(base.weight.detach()[ids].float().clone())
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        if self.embedding:  # x: token ids; swap in the rows of the new tokens
            s = self.slot[x]
            return torch.where((s >= 0)[..., None], self.rows[s.clamp(min=0)].to(y.dtype), y)
        # the head: recompute the new tokens' logits (index_copy's backward gives the base's none)
        return y.index_copy(-1, self.ids, F.linear(x, self.rows.to(x.dtype)).to(y.dtype))

    @property
    def weight(self):
        """The effective (V, D) weight, the rows swapped in (model.lm_loss's fused CUDA loss reads
        output.weight); the base weight under lora_disabled."""
        w = self.base.weight
        return w.index_put((self.ids,), self.rows.to(w.dtype)) if self.enabled else w


LORA_MODULES = (LoRALinear, LoRAExperts, TrainableRows)


# -----------------------------------------------------------------------------
# Applying, switching off, saving, merging

def _candidates(model):
    """{name: module} of every weight LoRA can wrap: each nn.Linear but the head, and each stack of the
    routed experts ("layers.1.feed_forward.experts.w1" -> the Experts module)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "output":
            out[name] = m
        elif isinstance(m, Experts):
            out.update({f"{name}.{n}": m for n in EXPERT_WEIGHTS})
    return out


def _matches(name, target):
    return name == target or name.endswith("." + target)


def apply_lora(model, rank, alpha, targets=None, token_ids=()):
    """Freeze every parameter of `model` (in place) and wrap the weights named by `targets` with rank-`rank`
    adapters scaled by alpha / rank; give the tokens `token_ids` trainable embedding and head rows.

    targets: names or dotted name suffixes ("wq", "attention.wo", "shared_experts.w1"), a list or a comma
    string; None or "" = DEFAULT_TARGETS, those the model has. A target that matches no weight is refused.
    Returns the model."""
    if rank <= 0:
        raise ValueError(f"lora rank must be positive, got {rank} (0 means: do not call apply_lora)")
    if is_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cands = _candidates(model)
    if targets:
        for t in targets:
            if not any(_matches(n, t) for n in cands):
                names = ",".join(sorted({n.rsplit(".", 1)[-1] for n in cands}))
                raise ValueError(f"lora_targets: {t!r} matches no weight of this model (names: {names})")
    else:
        targets = DEFAULT_TARGETS
    chosen = [n for n in cands if any(_matches(n, t) for t in targets)]

    for p in model.parameters():
        p.requires_grad_(False)
    experts = {}  # Experts module name -> the stacks to adapt
    for name in chosen:
        if isinstance(cands[name], Experts):
            parent, stack = name.rsplit(".", 1)
            experts.setdefault(parent, []).append(stack)
        else:
            _replace(model, name, LoRALinear(cands[name], rank, alpha))
    for name, stacks in experts.items():
        _replace(model, name, LoRAExperts(model.get_submodule(name), rank, alpha, sorted(stacks)))

    if len(token_ids):
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        V = model.tok_embeddings.weight.shape[0]
        if ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token_ids must be distinct ids below the vocabulary size {V}, got "
                             f"{ids.tolist()[:8]}: call model.grow_vocab(...) before apply_lora")
        tied = model.output.weight is model.tok_embeddings.weight
        model.tok_embeddings = TrainableRows(model.tok_embeddings, ids)
        model.output = TrainableRows(model.output, ids, model.tok_embeddings.rows if tied else None)
    # the router is the base's: its balancing bias stays frozen too (update_bias moves it by gamma * sign)
    for m in model.modules():
        if isinstance(m, MoE):
            m.lora_saved_gamma, m.gamma = m.gamma, 0.0
    return model


def _replace(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def is_lora(model):
    return any(isinstance(m, LORA_MODULES) for m in model.modules())


def trainable_rows(model):
    """The token ids whose embedding and head rows train ([] without any)."""
    emb = model.tok_embeddings
    return emb.ids.tolist() if isinstance(emb, TrainableRows) else []


@contextmanager
def lora_disabled(model):
    """Under it, forward computes the base model alone (adapters and trainable rows off): DPO's
    reference. Restored on exit, also on an exception. Under torch.compile the switch recompiles once."""
    mods = [m for m in model.modules() if isinstance(m, LORA_MODULES)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def _is_adapter(name):
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("lora_") or leaf == "rows"


def lora_state_dict(model):
    """{name: tensor} of the adapters and trainable rows (a tied model's shared rows once, as
    "tok_embeddings.rows"), and "tok_embeddings.ids" when there are rows. Small: a LoRA checkpoint."""
    sd = {n: p.detach() for n, p in model.named_parameters() if _is_adapter(n)}
    if isinstance(model.tok_embeddings, TrainableRows):
        sd["tok_embeddings.ids"] = model.tok_embeddings.ids
    return sd


def load_lora_state_dict(model, sd):
    """Load lora_state_dict's output into a model with the same apply_lora; strict."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit this model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]} (apply_lora with the run's rank, targets and token ids first)")
    for name, t in own.items():
        if t.shape != sd[name].shape:
            raise ValueError(f"LoRA state dict: {name} has shape {tuple(sd[name].shape)}, this model's is "
                             f"{tuple(t.shape)} (another lora_rank or base model?)")
    ids = own.get("tok_embeddings.ids")
    if ids is not None and not torch.equal(ids.cpu(), sd["tok_embeddings.ids"].cpu()):
        raise ValueError("LoRA state dict: its trainable token ids differ from this model's: pass "
                         "token_ids=trainable ids of the checkpoint to apply_lora")
    with torch.no_grad():
        for name, t in own.items():
            if name != "tok_embeddings.ids":
                t.copy_(sd[name])


@torch.no_grad()
def merge_lora(model):
    """Fold adapters and rows into the base weights (in place, computed in float64) and put the plain
    nn.Linear / Experts / nn.Embedding modules back: the model is a plain Transformer again (its
    state_dict loads strict into Transformer(config)), every parameter trainable, MoE balancing back on.
    Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            w = m.base.weight
            w.copy_(w.double() + m.scale * (m.lora_B.double() @ m.lora_A.double()))
        elif isinstance(m, LoRAExperts):
            for n in m.names:
                w = getattr(m.base, n)
                A, B = getattr(m, f"lora_A_{n}"), getattr(m, f"lora_B_{n}")
                w.copy_(w.double() + m.scale * (B.double() @ A.double()))
        elif isinstance(m, TrainableRows):
            m.base.weight[m.ids] = m.rows.to(m.base.weight.dtype)  # tied: the same rows into the same tensor
        else:
            continue
        _replace(model, name, m.base)
    for m in model.modules():
        if isinstance(m, MoE) and hasattr(m, "lora_saved_gamma"):
            m.gamma = m.lora_saved_gamma
            del m.lora_saved_gamma
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _base_entries(state_dict):
    """A (LoRA) model's state dict without adapters, rows and ids, under plain names (".base." dropped)."""
    return {n.replace(".base.", "."): t for n, t in state_dict.items()
            if not _is_adapter(n) and not n.endswith(".ids")}


def base_state_dict(model):
    """The base weights (and persistent buffers) under a plain Transformer's names: what the model was
    before apply_lora. Tensors are shared with the model, not copied."""
    return _base_entries(model.state_dict())


def fingerprint(state_dict):
    """sha256 (hex) of a base model's weights: every tensor's name, shape, dtype and bytes, in name order.
    Stable across processes and machines. A LoRA model's state_dict gives its base's fingerprint (the
    adapters, rows and ids are left out, ".base." names read as plain ones).

    Caveats: the bytes are hashed as stored, so the same weights in bf16 and fp32 fingerprint differently
    (fingerprint the base in the dtype it is loaded in, e.g. from its checkpoint file); grow_vocab
    changes the embedding (fingerprint before it, or after it on both sides); FSDP shards (DTensor) must
    be gathered first (full_tensor)."""
    h = hashlib.sha256()
    plain = _base_entries(state_dict)
    for name in sorted(plain):
        t = plain[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
