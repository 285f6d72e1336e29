"""DeepSeek-V3 parts: MLA, MoE, MTP. Parity with transformers, decode paths, dispatch, balancing, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from nano.config import ModelConfig, preset
from nano.model import MLA, Context, Transformer, rope_cos_sin, rope_inv_freq
from nano.moe import MoE

transformers = pytest.importorskip("transformers")

from nano.convert import load_hf  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: one thread is faster than two (no fork/join per small matmul) and keeps
    # the timing steady when other processes share the two cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    c = dict(vocab_size=67, n_layer=2, n_head=4, n_embd=32, max_seq_len=64, attn="mla", q_lora_rank=16,
             kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=6,
             n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, n_group=3, topk_group=2,
             routed_scaling_factor=1.5, first_k_dense_replace=1, intermediate_size=48, mtp_depth=1,
             attn_impl="reference")
    c.update(kw)
    return ModelConfig(**c)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(_cfg(**kw))
    with torch.no_grad():  # nonzero biases and norms, so a dropped one would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.uniform_(-0.1, 0.1)
    return model.eval()


# -----------------------------------------------------------------------------
# Parity with transformers' DeepseekV3ForCausalLM (and its MtpModel for the MTP modules)

def _hf_deepseek(seed=0, **kw):
    torch.manual_seed(seed)
    c = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4,
             topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=64,
             initializer_range=0.1)
    c.update(kw)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**c)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
        for n, b in hf.named_buffers():
            if "e_score_correction_bias" in n:  # nonzero, so that selection != weighting matters
                b.copy_(torch.rand_like(b) * 0.5)
    return hf


@pytest.mark.parametrize("kw", [
    {},  # q_lora, group-limited routing, 1 shared expert, 1 dense layer, interleaved rope
    {"q_lora_rank": None, "norm_topk_prob": False, "n_shared_experts": 2, "first_k_dense_replace": 2},
    {"rope_interleave": False, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.0},
])
def test_deepseek_v3_parity(tmp_path, kw):
    hf = _hf_deepseek(**kw)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_hf(str(tmp_path))
    assert model.config.attn == "mla" and model.config.mtp_depth == 0
    idx = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx)
        assert (ours - ref).abs().max().item() <= 1e-4
        # controls: the correction bias and the group limit both change the logits of this model, so the
        # match above depends on implementing them
        moe = [b.feed_forward for b in model.layers if isinstance(b.feed_forward, MoE)]
        saved = [m.gate.expert_bias.clone() for m in moe]
        for m in moe:
            m.gate.expert_bias.zero_()
        assert (model(idx)[0] - ref).abs().max().item() > 1e-3
        for m, b in zip(moe, saved):
            m.gate.expert_bias.copy_(b)
            m.gate.n_group = 1
        assert (model(idx)[0] - ref).abs().max().item() > 1e-3


def test_mtp_parity_with_transformers(tmp_path):
    """MTP layers as DeepSeek-V3 stores them (model.layers.{n_layer + k}), checked against transformers'
    MtpModel: module logits, the chain to depth 2, and nano's MTP loss."""
    from safetensors.torch import save_file
    from transformers.modeling_layers import MtpModel
    hf = _hf_deepseek(num_hidden_layers=2, num_mtp_layers=2)
    mtp = MtpModel(hf, 2).eval()
    with torch.no_grad():
        for n, p in mtp.named_parameters():
            if n.startswith("layers."):
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0.0, 0.1)
        for n, b in mtp.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.rand_like(b) * 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    extra, L = {}, 2
    for n, t in mtp.state_dict().items():
        if not n.startswith("layers."):
            continue
        _, k, rest = n.split(".", 2)
        rest = rest.replace("mtp_block.", "").replace("post_norm", "shared_head.norm")
        pre = f"model.layers.{L + int(k)}."
        if k == "0" and rest.startswith("mlp.experts."):  # module 0 per expert (DeepSeek's release layout);
            for e in range(t.shape[0]):                    # module 1 keeps transformers' fused layout
                if rest.endswith("gate_up_proj"):
                    g, u = t[e].chunk(2, dim=0)
                    extra[pre + f"mlp.experts.{e}.gate_proj.weight"] = g.contiguous()
                    extra[pre + f"mlp.experts.{e}.up_proj.weight"] = u.contiguous()
                else:
                    extra[pre + f"mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
            continue
        extra[pre + rest] = t.contiguous()
    for k in range(2):  # DeepSeek's MTP layers carry copies of the embedding and head: nano drops them
        extra[f"model.layers.{L + k}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
        extra[f"model.layers.{L + k}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(extra, str(tmp_path / "mtp.safetensors"))
    model = load_hf(str(tmp_path))
    assert model.config.mtp_depth == 2
    T = 19
    idx = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = hf.model(idx).last_hidden_state
        pos = torch.arange(T - 1)[None]
        h1 = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=idx[:, 1:])
        h2 = mtp.forward_layer(1, h1[:, :-1], pos[:, :-1], None, input_ids=idx[:, 2:])
        ref1, ref2 = hf.lm_head(h1), hf.lm_head(h2)
        ours1, g1 = model.mtp_draft(model.hidden_states(idx)[:, :-1], idx[:, 1:], depth=1)
        ours2, _ = model.mtp_draft(g1[:, :-1], idx[:, 2:], depth=2)
        assert (ours1 - ref1).abs().max().item() <= 1e-4
        assert (ours2 - ref2).abs().max().item() <= 1e-4
        y = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)
        _, loss = model(idx, y)
    want = (F.cross_entropy(ref1[:, :-1].reshape(-1, 97), idx[:, 2:].reshape(-1))
            + F.cross_entropy(ref2[:, :-1].reshape(-1, 97), idx[:, 3:].reshape(-1))) / 2
    lm = F.cross_entropy(hf(idx).logits[:, :-1].reshape(-1, 97), idx[:, 1:].reshape(-1))
    assert abs(model.loss_terms["mtp"].item() - want.item()) < 1e-5
    assert abs(loss.item() - (lm + model.config.mtp_weight * want).item()) < 1e-5


def test_load_hf_deepseek_errors(tmp_path):
    import json
    hf = _hf_deepseek(num_hidden_layers=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, match in [({"quantization_config": {"quant_method": "fp8"}}, "dequantize"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                           "yarn")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            load_hf(str(tmp_path))


# -----------------------------------------------------------------------------
# MLA: absorbed decode == expanded computation; KV-cache decode == full forward

def test_mla_absorbed_decode_equals_expanded():
    """float64: the expanded per-head K/V path (training/prefill) against the absorbed latent-cache
    path (decoding), prefill of 5 then one token at a time, for q_lora on and off."""
    for q_lora in (16, 0):
        torch.manual_seed(0)
        cfg = _cfg(q_lora_rank=q_lora)
        mla = MLA(cfg).double()
        for p in mla.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
        B, T = 2, 13
        x = torch.randn(B, T, cfg.n_embd, dtype=torch.float64)
        pos = torch.arange(T).expand(B, T)
        rope = [t.double() for t in rope_cos_sin(pos, rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta))]
        def decode(a, b):  # the tokens a..b-1 over the cache
            slots = pos[:, a:b]
            return mla(x[:, a:b], Context("decode", [r[:, a:b] for r in rope], slots=slots,
                                          mask=torch.arange(16) <= slots[:, :, None]))
        with torch.no_grad():
            full = mla(x, Context("train", rope))
            mla.setup_cache(B, 16, torch.float64, "cpu")
            parts = [decode(0, 5)] + [decode(t, t + 1) for t in range(5, T)]
        assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-10
        # the cache holds only the latent and the RoPE key: r + d_rope numbers per token
        assert mla.cache.kv.shape == (B, 1, 16, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 0, "mtp_depth": 0}])
def test_kv_cache_decode_equals_full_forward(kw):
    model = _model(**kw)
    idx = torch.randint(0, 67, (3, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(3, 32)
        first, _ = model(idx[:, :7], prefill=True)
        steps = [model(idx[:, t:t + 1], start_pos=t)[0] for t in range(7, 20)]
        model.clear_cache()
    assert (torch.cat([first] + steps, dim=1) - full).abs().max() < 1e-5


def test_kv_cache_rows_at_different_positions_and_rollback():
    model = _model()
    a, b = torch.randint(0, 67, (1, 12)), torch.randint(0, 67, (1, 9))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0][0, -1], model(b)[0][0, -1]
        model.setup_cache(2, 16)
        model(torch.cat([a[:, :9], b]), prefill=True)
        model(a[:, 9:11].expand(2, 2).clone(), start_pos=9)  # row 1 gets junk that must be rolled back
        out = model(torch.stack([a[0, 11], b[0, 8]])[:, None], start_pos=torch.tensor([11, 8]))[0]
    assert (out[0, 0] - ref_a).abs().max() < 1e-5
    assert (out[1, 0] - ref_b).abs().max() < 1e-5


def test_kv_cache_bytes_per_token():
    """MLA caches kv_lora_rank + qk_rope_head_dim numbers per token and layer, GQA 2 * n_kv_head * head_dim:
    the formula against the buffers setup_cache actually allocates."""
    for model in (_model(mtp_depth=0), Transformer(ModelConfig(vocab_size=67, n_layer=2, n_head=4, n_kv_head=2,
                                                                n_embd=32))):
        model.setup_cache(3, 10, dtype=torch.bfloat16)
        allocated = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".cache." in n)
        assert model.kv_cache_bytes_per_token(torch.bfloat16) == allocated / 30
        model.clear_cache()
    assert _model().kv_cache_bytes_per_token(torch.bfloat16) == 2 * (12 + 6) * 2


def test_packed_documents_equal_documents_alone():
    """MLA + MoE through attend() on the kernels path (not the reference), Dqk 24 != Dv 16."""
    model = _model(attn_impl="auto", mtp_depth=0, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    B, T = 2, 24
    idx = torch.randint(0, 67, (B, T))
    cu = torch.tensor([0, 1, 9, 24, 30, 47, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = model(idx, cu_seqlens=cu)[0].view(B * T, -1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone, _ = model(idx.view(-1)[a:b][None])
            assert (packed[a:b] - alone[0]).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# MoE: router, dispatch, balancing

def _naive_route(x, weight, bias, cfg):
    """Per token, float64, as DeepSeek-V3 section 2.1.2 and Mixtral describe it."""
    out = []
    E, G = weight.shape[0], cfg.n_group
    for t in range(x.shape[0]):
        logits = [sum(float(x[t, d]) * float(weight[e, d]) for d in range(x.shape[1])) for e in range(E)]
        if cfg.score_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            z = sum(math.exp(v) for v in logits)
            s = [math.exp(v) / z for v in logits]
        c = [s[e] + float(bias[e]) for e in range(E)]
        size = E // G
        gscore = [sum(sorted(c[g * size:(g + 1) * size])[-2:]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: -gscore[g])[:cfg.topk_group]
        eligible = [e for e in range(E) if e // size in groups]
        chosen = sorted(eligible, key=lambda e: -c[e])[:cfg.num_experts_per_tok]
        w = {e: s[e] for e in chosen}
        if cfg.norm_topk_prob:
            w = {e: v / sum(w.values()) for e, v in w.items()}
        out.append({e: v * cfg.routed_scaling_factor for e, v in w.items()})
    return out


@pytest.mark.parametrize("kw", [{}, {"score_func": "softmax", "n_group": 1, "topk_group": 1},
                                {"norm_topk_prob": False, "n_group": 2, "topk_group": 1}])
def test_router_against_naive_reference(kw):
    torch.manual_seed(0)
    cfg = _cfg(**kw)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, 0.0, 0.5)
    moe.gate.expert_bias.uniform_(-0.2, 0.2)
    x = torch.randn(40, cfg.n_embd)
    weights, idx, _ = moe.gate(x)
    ref = _naive_route(x, moe.gate.weight.detach(), moe.gate.expert_bias, cfg)
    for t in range(40):
        got = dict(zip(idx[t].tolist(), weights[t].tolist()))
        assert set(got) == set(ref[t])
        assert all(abs(got[e] - ref[t][e]) < 1e-6 for e in got)


def _dispatch_run(moe, x, impl):
    moe.experts.impl = impl
    moe.zero_grad()
    x = x.detach().requires_grad_()
    y = moe(x)[0]
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}


@pytest.mark.parametrize("impl", ["grouped", "bmm"])
def test_dispatch_equals_loop(impl, monkeypatch):
    """fp32, forward and every gradient (input, router, experts, shared) to 1e-5, with an expert that
    gets no token. The grouped path must really run torch._grouped_mm (here its CPU fallback)."""
    if impl == "grouped":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no torch._grouped_mm")
        try:
            offs = torch.tensor([1, 4], dtype=torch.int32)
            torch._grouped_mm(torch.ones(4, 8), torch.ones(2, 8, 4), offs=offs)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._grouped_mm does not run on CPU in this torch: {e}")
    torch.manual_seed(0)
    moe = MoE(_cfg(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    moe.gate.expert_bias[5] = -10.0  # expert 5 never chosen: empty group
    x = torch.randn(3, 17, 32)
    ref = _dispatch_run(moe, x, "loop")
    calls = []
    real = getattr(torch, "_grouped_mm", None)
    if real is not None:
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _dispatch_run(moe, x, impl)
    assert (impl == "grouped") == (len(calls) == 3)
    assert (got[0] - ref[0]).abs().max() < 1e-5
    assert (got[1] - ref[1]).abs().max() < 1e-5
    for n, g in ref[2].items():
        assert (got[2][n] - g).abs().max() < 1e-5, n
    assert ref[2]["experts.w1"][5].abs().max() == 0


def test_bias_steers_selection_only():
    """A large bias forces an expert in, but its weight is its own score, not score + bias."""
    torch.manual_seed(0)
    cfg = _cfg(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, 0.0, 0.5)
    x = torch.randn(10, cfg.n_embd)
    moe.gate.expert_bias[3] = 5.0
    weights, idx, scores = moe.gate(x)
    assert (idx == 3).any(-1).all()
    assert torch.allclose(weights, torch.sigmoid(x @ moe.gate.weight.T).gather(1, idx))


def test_update_moe_bias_sign_rule_and_stats():
    model = _model(bias_update_rate=0.01).train()
    assert all(v == 0 for v in model.moe_stats().values())  # nothing counted yet
    moe = [b.feed_forward for b in model.layers[1:]] + [model.mtp[0].block.feed_forward]
    before = [m.gate.expert_bias.clone() for m in moe]
    idx = torch.randint(0, 67, (2, 16))
    with torch.no_grad():
        model(idx, idx)
        model(idx, idx)
        model.eval()
        model(idx)  # eval forwards do not count
        model.train()
    loads = [m.load.clone() for m in moe]
    assert all(load.sum() == 2 * 2 * 16 * 2 for load in loads)  # 2 forwards x 32 tokens x k=2
    stats = model.moe_stats()
    model.update_moe_bias()
    for m, b0, load in zip(moe, before, loads):
        want = b0 + 0.01 * torch.sign(load.mean() - load)
        assert torch.allclose(m.gate.expert_bias, want)
        assert m.load.sum() == 0
    stats = {k: v.item() for k, v in stats.items()}
    assert stats == {k: v.item() for k, v in model.moe_stats().items()}  # right after the update: the load it used
    assert stats["moe/max_load"] == max((load.max() / load.mean()).item() for load in loads)
    assert set(stats) == {"moe/max_load", "moe/min_load", "moe/max_load/layer1", "moe/max_load/mtp0"}
    dense = Transformer(ModelConfig(vocab_size=67, n_layer=1, n_head=2, n_embd=16))
    dense.update_moe_bias()
    assert dense.moe_stats() == {}


def test_balance_loss_matches_formula():
    """DeepSeek-V3 eq. 17-20, computed from the router outputs by hand, and added to forward's loss."""
    model = _model(aux_loss_alpha=0.01, mtp_depth=0).train()
    idx = torch.randint(0, 67, (3, 11))
    captured = {}
    moe = model.layers[1].feed_forward
    hook = moe.gate.register_forward_hook(lambda m, i, o: captured.update(idx=o[1], scores=o[2]))
    _, loss = model(idx, idx)
    hook.remove()
    E, K, B, T = 6, 2, 3, 11
    s = captured["scores"].view(B, T, E).double()
    chosen = captured["idx"].view(B, T, K)
    want = 0.0
    for b in range(B):
        f = [E / (K * T) * (chosen[b] == i).sum().item() for i in range(E)]
        P = [(s[b, :, i] / s[b].sum(-1)).mean().item() for i in range(E)]
        want += 0.01 * sum(fi * pi for fi, pi in zip(f, P)) / B
    assert abs(model.loss_terms["balance"].item() - want) < 1e-6
    assert abs(loss.item() - model.loss_terms["lm"].item() - want) < 1e-5


def test_bias_rule_evens_out_a_skewed_router():
    """A router skewed toward experts 0 and 1 (+3 on their logits along the mean direction of the router's
    inputs), trained 40 steps: with the sign rule the loads of the last 10 steps are nearly even; without
    it they stay skewed. (Router init std 0.3, so that tokens' scores spread wider than the bias steps.)"""
    def train(update):
        torch.manual_seed(0)
        model = Transformer(_cfg(n_layer=2, mtp_depth=0, n_routed_experts=8, n_group=1, topk_group=1,
                                 bias_update_rate=0.03)).train()
        moe = model.layers[1].feed_forward
        seen = []
        hook = moe.gate.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
        with torch.no_grad():
            model(torch.randint(0, 67, (4, 32)))
            mu = seen[0].mean(0)
            torch.nn.init.normal_(moe.gate.weight, 0.0, 0.3)
            moe.gate.weight[:2] += 3.0 * mu / mu.pow(2).sum()
        hook.remove()
        moe.load.zero_()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        first, tail = None, torch.zeros(8)
        for step in range(40):
            x = torch.randint(0, 67, (4, 32))
            _, loss = model(x, torch.roll(x, -1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            first = moe.load.clone() if first is None else first
            if step >= 30:
                tail += moe.load
            if update:
                model.update_moe_bias()
            else:
                moe.load.zero_()
        return (first.max() / first.mean()).item(), (tail.max() / tail.mean()).item()
    (start, skewed), (start2, balanced) = train(False), train(True)
    assert start == start2 and start > 2.0  # max / mean load at the first step (4.0: two experts take all)
    assert skewed > 1.6, skewed
    assert balanced < 1.3, balanced


# -----------------------------------------------------------------------------
# MTP: targets, decoding interface; gradient checkpointing; training

@pytest.mark.parametrize("marks", ["-100", "cu_seqlens only"])
def test_mtp_loss_stays_inside_documents(marks):
    """The MTP loss of a packed batch equals the one computed document by document (each document alone,
    every depth-k target inside it), for depth 2: the chain never crosses a boundary."""
    model = _model(mtp_depth=2)
    B, T = 2, 20
    idx = torch.randint(0, 67, (B, T))
    cu = torch.tensor([0, 7, 8, 20, 23, 40], dtype=torch.int32)
    flat = idx.view(-1)
    y = torch.cat([flat[1:], flat[:1]]).clone()
    if marks == "-100":
        y[cu[1:] - 1] = -100  # the last token of each document has no next token
    else:
        y[T - 1::T] = -100  # only row ends are marked; cu_seqlens says where documents end
    with torch.no_grad():
        model(idx, y.view(B, T), cu_seqlens=cu)
        got = model.loss_terms["mtp"].item()
        per_depth = {1: [], 2: []}
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            doc = flat[a:b][None]
            h = model.hidden_states(doc)
            for k in (1, 2):
                if doc.shape[1] <= k:
                    break
                logits, h = model.mtp_draft(h[:, :doc.shape[1] - k], doc[:, k:], depth=k)
                # position t of module k predicts doc[t + k + 1]
                per_depth[k].append(-torch.log_softmax(logits[0, :-1].double(), -1)
                                    .gather(1, doc[0, k + 1:, None]))
        want = sum(torch.cat(v).mean().item() for v in per_depth.values()) / 2
    assert abs(got - want) < 1e-5


def test_mtp_targets_skip_ignored_positions():
    """Without cu_seqlens: module k at position t is scored on targets[t+k] only if none of
    targets[t..t+k] is -100 (a -100 in between may be a document end); naive float64 reference."""
    model = _model(mtp_depth=2)
    B, T = 2, 16
    idx = torch.randint(0, 67, (B, T))
    y = torch.cat([idx[:, 1:], torch.full((B, 1), -100)], 1)
    y[0, 4] = y[0, 9] = y[1, 2] = -100
    with torch.no_grad():
        model(idx, y)
        h = model.hidden_states(idx)
        nll = {}
        for k in (1, 2):
            logits, h = model.mtp_draft(h, torch.cat([idx[:, k:], torch.zeros(B, k, dtype=torch.long)], 1),
                                        depth=k)
            lp = torch.log_softmax(logits.double(), -1)
            nll[k] = [-lp[b, t, y[b, t + k]].item() for b in range(B) for t in range(T - k)
                      if all(y[b, t + j] != -100 for j in range(k + 1))]
    want = sum(sum(v) / len(v) for v in nll.values()) / 2
    assert abs(model.loss_terms["mtp"].item() - want) < 1e-5


def test_mtp_draft_cache_equals_recompute():
    """mtp_draft with its own KV cache (incremental, per-row positions, a rollback) equals the recompute
    path over the whole prefix, at depths 1 and 2."""
    model = _model(mtp_depth=2)
    B, T = 2, 14
    idx = torch.randint(0, 67, (B, T + 2))
    with torch.no_grad():
        h = model.hidden_states(idx[:, :T])
        ref1, ref_h1 = model.mtp_draft(h, idx[:, 1:T + 1], depth=1)
        ref2, _ = model.mtp_draft(ref_h1, idx[:, 2:T + 2], depth=2)
        model.setup_cache(B, 20)
        l1a, h1a = model.mtp_draft(h[:, :9], idx[:, 1:10], start_pos=0, depth=1)
        model.mtp_draft(h[:, 9:11], torch.randint(0, 67, (B, 2)), start_pos=9, depth=1)  # junk: rolled back
        l1b, h1b = model.mtp_draft(h[:, 9:], idx[:, 10:T + 1], start_pos=9, depth=1)
        h1 = torch.cat([h1a, h1b], 1)
        l2 = torch.cat([model.mtp_draft(h1[:, t:t + 1], idx[:, t + 2:t + 3], start_pos=t, depth=2)[0]
                        for t in range(T)], 1)
        model.clear_cache()
    assert (torch.cat([l1a, l1b], 1) - ref1).abs().max() < 1e-5
    assert (l2 - ref2).abs().max() < 1e-5
    with pytest.raises(ValueError, match="depth"):
        model.mtp_draft(h, idx[:, 1:T + 1], depth=3)
    with pytest.raises(ValueError, match="setup_cache"):
        model.mtp_draft(h, idx[:, 1:T + 1], start_pos=0)


def test_mtp_modules_not_run_without_targets():
    model = _model(mtp_depth=1)
    calls = []
    model.mtp[0].block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randint(0, 67, (1, 5)))
        assert not calls
        model(torch.randint(0, 67, (1, 5)), torch.randint(0, 67, (1, 5)))
        assert calls


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_grad_ckpt_gradients_identical(mode):
    model = _model(mtp_depth=1, aux_loss_alpha=0.01).train()
    idx = torch.randint(0, 67, (2, 16))
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32)

    def grads():
        model.zero_grad()
        model(idx, idx, cu_seqlens=cu)[1].backward()
        loads = [m.load.clone() for _, m in model._moe()]
        return {n: p.grad.clone() for n, p in model.named_parameters()}, loads
    plain, plain_load = grads()
    model.set_grad_ckpt(mode)
    assert model.grad_ckpt == mode
    ckpt, ckpt_load = grads()
    model.set_grad_ckpt("none")
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
    for a, b in zip(plain_load, ckpt_load):  # recomputation in the backward does not count tokens again
        assert torch.equal(2 * a, b)


def test_init_weights_on_meta_device():
    with torch.device("meta"):
        model = Transformer(_cfg(mtp_depth=1))
    model.to_empty(device="cpu")
    model.init_weights()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(t).all(), n
    moe = model.layers[1].feed_forward
    assert moe.gate.expert_bias.abs().max() == 0 and moe.load.sum() == 0
    assert abs(moe.experts.w2.std().item() - 0.02 / math.sqrt(4)) < 0.004
    assert torch.equal(model.mtp[0].enorm.weight, torch.ones(32))


def test_deepseek_tiny_trains():
    """A scaled-down deepseek-tiny (MLA + MoE with group routing + MTP) in a plain loop on packed rows
    (cu_seqlens, -100 at document ends): every parameter gets a gradient, and the loss (main + MTP) of
    a learnable task, documents that follow x -> 5x + 3 mod 32 from a random start, falls from ~ln 32."""
    torch.manual_seed(0)
    cfg = preset("deepseek-tiny", n_layer=2, n_embd=64, vocab_size=32, q_lora_rank=32, kv_lora_rank=16,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                 intermediate_size=128, attn_impl="reference")
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    B, T = 4, 32
    cu = torch.tensor([0, 20, 32, 60, 64, 90, 128], dtype=torch.int32)
    losses = []
    for step in range(25):
        g = torch.Generator().manual_seed(step)
        flat = torch.empty(B * T, dtype=torch.long)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            x = torch.randint(0, 32, (1,), generator=g)
            for i in range(a, b):
                flat[i] = x
                x = (5 * x + 3) % 32
        y = torch.cat([flat[1:], flat[:1]])
        y[cu[1:] - 1] = -100
        _, loss = model(flat.view(B, T), y.view(B, T), cu_seqlens=cu)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        opt.zero_grad()
        model.update_moe_bias()
        losses.append(loss.item())
    assert set(model.loss_terms) == {"lm", "mtp"}
    assert losses[0] > 3.0 and max(losses[-3:]) < 0.5, losses
    assert model.loss_terms["mtp"] < 0.5  # the MTP module learned the two-step map too
