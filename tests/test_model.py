"""Model semantics: packed documents, KV cache, RoPE scaling, init."""
import math

import pytest
import torch

from nano.config import ModelConfig
from nano.model import Transformer, rope_inv_freq


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "n_kv_head": 1}, {"tie_embeddings": False}])
def test_packed_documents_equal_documents_alone(kw):
    model = _model(**kw)
    B, T = 2, 24
    idx = torch.randint(0, 61, (B, T))
    # boundaries over the flattened 48 tokens; every row start (0, 24) is a boundary
    cu = torch.tensor([0, 1, 9, 24, 30, 47, 48], dtype=torch.int32)
    with torch.no_grad():
        packed, _ = model(idx, cu_seqlens=cu)
        flat_logits, flat_idx = packed.view(B * T, -1), idx.view(-1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone, _ = model(flat_idx[a:b][None])
            assert (flat_logits[a:b] - alone[0]).abs().max() < 1e-5
        # changing one document changes no logit of another
        idx2 = idx.clone().view(-1)
        idx2[9:24] = torch.randint(0, 61, (15,))
        packed2, _ = model(idx2.view(B, T), cu_seqlens=cu)
        changed = (packed2.view(B * T, -1) - flat_logits).abs().amax(-1) > 0
        assert changed[9:24].any() and not changed[:9].any() and not changed[24:].any()


def test_loss_matches_cross_entropy_and_ignore_index():
    model = _model()
    idx = torch.randint(0, 61, (2, 10))
    tgt = torch.randint(0, 61, (2, 10))
    tgt[0, :3] = -100
    logits, loss = model(idx, tgt)
    lp = torch.log_softmax(logits.double(), -1)
    keep = tgt != -100
    ref = -lp[keep].gather(-1, tgt[keep][:, None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}])
def test_kv_cache_decode_equals_full_forward(kw):
    model = _model(**kw)
    idx = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(3, 32)
        first, _ = model(idx[:, :7], prefill=True)
        steps = [model(idx[:, t:t + 1], start_pos=t)[0] for t in range(7, 20)]
        model.clear_cache()
    got = torch.cat([first] + steps, dim=1)
    assert (got - full).abs().max() < 1e-5


def test_kv_cache_rows_at_different_positions():
    model = _model()
    a, b = torch.randint(0, 61, (1, 12)), torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0][0, -1], model(b)[0][0, -1]
        model.setup_cache(2, 16)
        model(torch.cat([a[:, :9], b]), prefill=True)  # both rows 9 tokens
        model(a[:, 9:11].expand(2, 2).clone(), start_pos=9)  # row 1 gets junk that must be rolled back
        nxt = torch.stack([a[0, 11], b[0, 8]])[:, None]
        out = model(nxt, start_pos=torch.tensor([11, 8]))[0]
    assert (out[0, 0] - ref_a).abs().max() < 1e-5
    assert (out[1, 0] - ref_b).abs().max() < 1e-5


def test_llama3_rope_scaling_against_formula():
    """Independent float64 transcription of Llama-3.1's apply_scaling (per-frequency branches)."""
    sc = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    got = rope_inv_freq(64, 500000.0, sc).double()
    base = [1.0 / 500000.0 ** (i / 64) for i in range(0, 64, 2)]
    lo_wl, hi_wl = 8192 / 1.0, 8192 / 4.0
    for g, f in zip(got.tolist(), base):
        wl = 2 * math.pi / f
        if wl < hi_wl:
            want = f
        elif wl > lo_wl:
            want = f / 32.0
        else:
            s = (8192 / wl - 1.0) / (4.0 - 1.0)
            want = (1 - s) * f / 32.0 + s * f
        assert abs(g - want) <= 1e-6 * want


def test_init_weights_scheme():
    model = _model(n_layer=8, n_embd=64)
    w = model.layers[0].attention.wq.weight
    wo = model.layers[0].attention.wo.weight
    assert abs(w.std().item() - 0.02) < 0.004
    assert abs(wo.std().item() - 0.02 / math.sqrt(16)) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert model.output.weight is model.tok_embeddings.weight


def test_gradients_flow_everywhere():
    model = _model(tie_embeddings=False, qk_norm=True).train()
    idx = torch.randint(0, 61, (2, 12))
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_grad_ckpt_gradients_identical(mode):
    model = _model(qk_norm=True).train()
    idx = torch.randint(0, 61, (2, 16))
    cu = torch.tensor([0, 5, 16, 32], dtype=torch.int32)

    def grads():
        model.zero_grad()
        model(idx, idx, cu_seqlens=cu)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    plain = grads()
    model.set_grad_ckpt(mode)
    ckpt = grads()
    model.set_grad_ckpt("none")
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n
