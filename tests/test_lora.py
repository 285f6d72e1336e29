"""nano/lora.py: adapted and merged models against a float64 W + (alpha/r) B A rebuilt from the raw tensors,
gradients only where they belong, a frozen base, lora_disabled == the base, state-dict round trip with
bit-identical continued training, targets, grad checkpointing, torch.compile, bf16 autocast, fingerprint."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from nano.config import ModelConfig, TrainConfig
from nano.lora import (LoRAExperts, LoRALinear, TrainableRows, apply_lora, base_state_dict, fingerprint,
                       is_lora, load_lora_state_dict, lora_disabled, lora_state_dict, merge_lora,
                       trainable_rows)
from nano.model import Transformer
from nano.optim import build_optimizers, param_groups

RANK, ALPHA = 4, 12.0
NEW = [61, 62, 63]  # tokens added by grow_vocab(64): the chat special tokens of a fine-tune

CONFIGS = {
    "gqa_tied": dict(n_head=4, n_kv_head=2, tie_embeddings=True),
    "gqa_untied": dict(n_head=4, n_kv_head=2, tie_embeddings=False, qk_norm=True),
    "mla_moe": dict(n_head=4, attn="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
                    qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=4, n_shared_experts=1,
                    num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, mtp_depth=1,
                    tie_embeddings=False),
}


def _base(name):
    """A tiny random model with 3 new tokens appended (the integrator's order: grow_vocab, then LoRA)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_layer=2, n_embd=32, intermediate_size=48, max_seq_len=64,
               attn_impl="reference")
    model = Transformer(ModelConfig(**cfg, **CONFIGS[name]))
    model.grow_vocab(64)
    return model


def _batches(n, seed=1):
    """(idx, targets) with the new tokens present in both, so their rows get gradients."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 64, (2, 12), generator=g)
        idx[:, 3], idx[:, 7] = NEW[0], NEW[2]
        targets = idx.roll(-1, 1)
        targets[:, 5] = NEW[1]
        out.append((idx, targets))
    return out


def _train(model, opt, batches):
    model.train()
    for idx, targets in batches:
        loss = model(idx, targets)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_moe_bias()  # train.py's step: must leave the frozen router's bias alone
    model.eval()


def _lora(name, targets=None, token_ids=NEW):
    base = _base(name)
    model = apply_lora(copy.deepcopy(base), RANK, ALPHA, targets, token_ids)
    return base, model


def _opt(model):
    cfg = TrainConfig(lr=3e-2, weight_decay=0.1)
    return build_optimizers(model, cfg)["adamw"]


def _reference_state(base, model):
    """The merged weights in float64, written out from the raw tensors: W + (alpha/r) B @ A per adapted
    Linear (expert stacks: per expert), and the trained rows of the new tokens in the embedding and head."""
    sd = {k: v.double().clone() for k, v in base.state_dict().items()}
    params = dict(model.named_parameters())
    s = ALPHA / RANK
    for n, A in params.items():
        if n.endswith(".lora_A"):  # layers.0.attention.wq.lora_A -> layers.0.attention.wq.weight
            B = params[n[:-len("lora_A")] + "lora_B"]
            sd[n[:-len("lora_A")] + "weight"] += s * B.double() @ A.double()
        elif ".lora_A_" in n:  # ...experts.lora_A_w1 -> ...experts.w1, one B[e] @ A[e] per expert
            prefix, stack = n.split(".lora_A_")
            B = params[f"{prefix}.lora_B_{stack}"]
            sd[f"{prefix}.{stack}"] += s * torch.einsum("eor,eri->eoi", B.double(), A.double())
    emb_rows = params["tok_embeddings.rows"].double()
    head_rows = params["output.rows"].double() if "output.rows" in params else emb_rows
    sd["tok_embeddings.weight"][NEW] = emb_rows
    sd["output.weight"][NEW] = head_rows
    return sd


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_equals_float64_reference_and_unmerged(name):
    base, model = _lora(name)
    _train(model, _opt(model), _batches(4))
    for n, p in model.named_parameters():  # the adapters moved far from their init (B starts at 0)
        if "lora_B" in n:
            assert p.abs().max() > 0.02, n
    rows = model.tok_embeddings.rows.detach()
    assert (rows - base.tok_embeddings.weight[NEW]).abs().max() > 0.02
    idx = _batches(1, seed=7)[0][0]
    ref_state = _reference_state(base, model)  # from the adapters before the merge folds them away
    ref_model = Transformer(base.config).double().eval()
    ref_model.load_state_dict(ref_state)
    with torch.no_grad():
        unmerged = model(idx)[0]
        merged_model = merge_lora(model)
        merged = merged_model(idx)[0]
        ref = ref_model(idx)[0]
    assert merged_model is model and not is_lora(model)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (merged.double() - ref).abs().max() < 1e-5
    # a plain Transformer again: exactly its keys, loads strict, weights those of the reference
    plain = Transformer(base.config)
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    for k, v in model.state_dict().items():
        assert (v.double() - ref_state[k]).abs().max() < 1e-6, k
    if base.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    assert all(p.requires_grad for p in model.parameters())


def _plain_key(model_sd, key):
    """The LoRA model's state-dict name of the base tensor `key`: itself, or with ".base" before the leaf."""
    prefix, _, leaf = key.rpartition(".")
    return key if key in model_sd else f"{prefix}.base.{leaf}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_only_adapters_and_new_rows_train_and_the_base_stays_bit_identical(name):
    base, model = _lora(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expect = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")}
    expect |= {"tok_embeddings.rows"} | ({"output.rows"} if not base.config.tie_embeddings else set())
    assert trainable == expect
    # the default targets: every attention / MLA / MLP / expert projection, never router, norms, head
    wrapped = {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}
    plain_linears = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} - {"output"}
    assert wrapped == {n for n in plain_linears if not n.endswith("eh_proj")} | \
        {n for n, m in base.named_modules() if n.endswith(".experts")}
    opt = _opt(model)
    _train(model, opt, _batches(2))  # B = 0 at the start gives A no gradient yet: look after two steps
    idx, targets = _batches(1, seed=2)[0]
    model.train()
    opt.zero_grad(set_to_none=True)
    model(idx, targets)[1].backward()
    for n, p in model.named_parameters():
        if n in expect:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    _train(model, opt, _batches(2))
    sd = model.state_dict()
    for k, v in base.state_dict().items():  # weights and buffers (the MoE selection bias too)
        assert torch.equal(sd[_plain_key(sd, k)], v), k
    assert trainable_rows(model) == NEW


@pytest.mark.parametrize("name", ["gqa_tied", "mla_moe"])
def test_lora_disabled_is_the_base_model(name):
    base, model = _lora(name)
    _train(model, _opt(model), _batches(2))
    idx = _batches(1, seed=5)[0][0]
    with torch.no_grad():
        want = base.eval()(idx)[0]
        adapted = model(idx)[0]
        with lora_disabled(model):
            off = model(idx)[0]
        assert torch.equal(off, want)
        assert (adapted - want).abs().max() > 1e-3
        with pytest.raises(RuntimeError):
            with lora_disabled(model):
                raise RuntimeError("boom")
        assert torch.equal(model(idx)[0], adapted)  # restored after the exception


@pytest.mark.parametrize("name", ["gqa_tied", "mla_moe"])
def test_state_dict_round_trip_and_continued_training_bit_identical(name):
    base, model = _lora(name)
    opt = _opt(model)
    _train(model, opt, _batches(3))
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert torch.equal(sd["tok_embeddings.ids"], torch.tensor(NEW))
    assert ("output.rows" in sd) == (not base.config.tie_embeddings)
    assert not any(".base." in k for k in sd)
    opt_state = copy.deepcopy(opt.state_dict())

    fresh = apply_lora(copy.deepcopy(base), RANK, ALPHA, token_ids=NEW)
    load_lora_state_dict(fresh, sd)
    fresh_opt = _opt(fresh)
    fresh_opt.load_state_dict(opt_state)
    idx = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], model(idx)[0])
    more = _batches(2, seed=3)
    _train(model, opt, more)
    _train(fresh, fresh_opt, more)
    a, b = lora_state_dict(model), lora_state_dict(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in sd.items() if k != "tok_embeddings.rows"})
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(fresh, {**sd, "layers.0.attention.wx.lora_A": sd["tok_embeddings.ids"]})
    with pytest.raises(ValueError, match="token ids differ"):
        load_lora_state_dict(fresh, {**sd, "tok_embeddings.ids": torch.tensor([60, 62, 63])})


def test_targets_chosen_and_bad_ones_refused():
    _, model = _lora("gqa_untied", targets="wq, w2", token_ids=())
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["layers.0.attention.wq"] is LoRALinear and kinds["layers.1.feed_forward.w2"] is LoRALinear
    assert kinds["layers.0.attention.wk"] is kinds["layers.0.feed_forward.w1"] is torch.nn.Linear
    assert kinds["tok_embeddings"] is torch.nn.Embedding and lora_state_dict(model).keys() == {
        f"layers.{i}.{m}.{ab}" for i in range(2) for m in ("attention.wq", "feed_forward.w2")
        for ab in ("lora_A", "lora_B")}
    _, moe = _lora("mla_moe", targets=["experts.w1", "wkv_b"])
    experts = moe.layers[1].feed_forward.experts
    assert isinstance(experts, LoRAExperts) and experts.names == ("w1",)
    assert isinstance(moe.layers[1].feed_forward.shared_experts.w1, torch.nn.Linear)
    assert isinstance(moe.mtp[0].block.attention.wkv_b, LoRALinear)
    for bad in ("wq,foo", "wq_a", "gate", "output"):  # a GQA model has no wq_a; router, head: not targets
        with pytest.raises(ValueError, match=f"lora_targets: '{bad.split(',')[-1]}' matches no weight"):
            apply_lora(_base("gqa_tied"), RANK, ALPHA, bad)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, RANK, ALPHA)
    with pytest.raises(ValueError, match="grow_vocab"):
        apply_lora(_base("gqa_tied"), RANK, ALPHA, token_ids=[64])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_grad_ckpt_gradients_identical(mode):
    _, model = _lora("mla_moe")
    _train(model, _opt(model), _batches(1))
    idx, targets = _batches(1, seed=4)[0]
    cu = torch.tensor([0, 5, 12, 24], dtype=torch.int32)

    def grads():
        model.zero_grad(set_to_none=True)
        model.train()
        model(idx, targets, cu_seqlens=cu)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = grads()
    model.set_grad_ckpt(mode)
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and all(torch.equal(plain[n], ckpt[n]) for n in plain)


def test_compile_fullgraph_matches_eager():
    # one MLA + MoE block with tied rows: every LoRA module in one graph, and small enough to compile fast
    torch.manual_seed(0)
    cfg = {**CONFIGS["mla_moe"], "n_layer": 1, "first_k_dense_replace": 0, "mtp_depth": 0,
           "tie_embeddings": True}
    model = Transformer(ModelConfig(vocab_size=61, n_embd=32, intermediate_size=48, attn_impl="reference",
                                    **cfg))
    model.grow_vocab(64)
    apply_lora(model, RANK, ALPHA, token_ids=NEW)
    _train(model, _opt(model), _batches(1))
    idx, targets = _batches(1, seed=6)[0]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.train()
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = fn(idx, targets)[1]
        loss.backward()
        if fn is model:
            want, want_grads = loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert (loss.detach() - want).abs() < 1e-5
    got = [p.grad for p in model.parameters() if p.requires_grad]
    assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want_grads))
    with torch.no_grad(), lora_disabled(model):  # the switch recompiles; still one graph
        assert (compiled(idx)[0] - model(idx)[0]).abs().max() < 1e-5


def test_bf16_autocast_keeps_fp32_adapters():
    _, model = _lora("mla_moe")
    _train(model, _opt(model), _batches(1))
    idx, targets = _batches(1, seed=2)[0]
    model.train()
    fp32 = model(idx, targets)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets)[1]
    loss.backward()
    assert torch.isfinite(loss) and (loss.float() - fp32).abs() < 0.05
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n


def test_mla_absorbed_decode_sees_the_adapters():
    """MLA's cached decode reads wkv_b.weight directly: with LoRA on wkv_b it must be the adapted one."""
    _, model = _lora("mla_moe")
    _train(model, _opt(model), _batches(2))
    idx = _batches(1, seed=8)[0][0]
    with torch.no_grad():
        full = model(idx)[0]
        model.setup_cache(2, 16)
        first = model(idx[:, :5], prefill=True)[0]
        steps = [model(idx[:, t:t + 1], start_pos=t)[0] for t in range(5, 12)]
        model.clear_cache()
    assert (torch.cat([first] + steps, dim=1) - full).abs().max() < 1e-5


def test_optimizer_groups():
    _, model = _lora("gqa_untied")
    groups = param_groups(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert groups["decay"] == [] and {id(p) for p in groups["no_decay"]} == {id(p) for p in trainable}
    with pytest.raises(ValueError, match="--optimizer muon does not apply to LoRA adapters: use adamw"):
        build_optimizers(model, TrainConfig(optimizer="muon"))


def test_fingerprint(tmp_path):
    base, model = _lora("mla_moe")
    fp = fingerprint(base.state_dict())
    assert len(fp) == 64 and fingerprint(model.state_dict()) == fp == fingerprint(base_state_dict(model))
    _train(model, _opt(model), _batches(1))
    assert fingerprint(model.state_dict()) == fp  # the base did not move
    assert fingerprint(base.to(torch.bfloat16).state_dict()) != fp  # dtype is part of it
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layers[1].feed_forward.experts.base.w2[3, 0, 0] += 1e-3
    assert fingerprint(changed.state_dict()) != fp
    flat = {k: v.reshape(-1) for k, v in base.state_dict().items()}  # the same bytes in other shapes
    assert fingerprint(flat) != fingerprint(base.state_dict())
    # another process, from the saved tensors: the same hex digest
    torch.save(base_state_dict(model), tmp_path / "base.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = str(tmp_path / "base.pt")
    code = f"import torch; from nano.lora import fingerprint; print(fingerprint(torch.load({path!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == fp


@pytest.mark.parametrize("name", ["gqa_tied", "gqa_untied"])
def test_trainable_rows_weight_property(name):
    """.weight is the effective (V, D) matrix, differentiable in the rows: the fused CUDA loss reads
    output.weight instead of calling output. Tied: one rows parameter for both."""
    _, model = _lora(name)
    _train(model, _opt(model), _batches(1))
    emb, head = model.tok_embeddings, model.output
    assert isinstance(emb, TrainableRows) and isinstance(head, TrainableRows)
    tied = name == "gqa_tied"
    assert (head.rows is emb.rows) == tied and ("output.rows" in lora_state_dict(model)) == (not tied)
    h, idx = torch.randn(2, 5, 32), torch.tensor([[1, 61, 62, 5, 63]])
    g = torch.randn(2, 5, 64)
    grads = []
    for logits in (head(h), h @ head.weight.T):
        head.rows.grad = None
        (logits * g).sum().backward()
        grads.append(head.rows.grad.clone())
    assert (grads[0] - grads[1]).abs().max() < 1e-5 and grads[0].abs().sum() > 0
    assert torch.equal(emb(idx), torch.nn.functional.embedding(idx, emb.weight))
