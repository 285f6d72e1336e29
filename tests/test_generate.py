"""KV-cache generation against naive full recomputation; the sampling transform against its definition."""
import pytest
import torch

from nano.config import ModelConfig
from nano.generate import generate, logits_to_probs
from nano.model import Transformer


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=53, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def naive_generate(model, idx, n, temperature, top_k, top_p, seed):
    """No cache: the whole sequence again for every token, same sampling transform and RNG use."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits = model(idx)[0][:, -1]
        probs = logits_to_probs(logits, temperature, top_k, top_p)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return idx


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "n_kv_head": 1}])
@pytest.mark.parametrize("temperature,top_k,top_p,impl", [(0.0, None, None, "auto"), (1.0, None, None, "reference"),
                                                          (0.8, 5, None, "reference"),
                                                          (1.2, None, 0.7, "reference")])
def test_kv_cache_generation_equals_full_recompute(kw, temperature, top_k, top_p, impl):
    # the cache against recomputation on the kernel path (Triton interpreted: slow) once per config; the
    # sampling transforms do not depend on the attention's implementation, so they run on the reference
    model = _model(attn_impl=impl, **kw)
    prompt = torch.randint(0, 53, (3, 5))
    with torch.no_grad():
        want = naive_generate(model, prompt, 12, temperature, top_k, top_p, seed=7)
    got = generate(model, prompt, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=7)
    assert got.shape == (3, 17) and torch.equal(got[:, :5], prompt)
    assert torch.equal(got, want)


def test_generate_is_seeded_and_zero_tokens_is_prompt():
    model = _model()
    prompt = torch.randint(0, 53, (2, 4))
    assert torch.equal(generate(model, prompt, 6, seed=3), generate(model, prompt, 6, seed=3))
    assert torch.equal(generate(model, prompt, 0), prompt)


def test_logits_to_probs_definition():
    torch.manual_seed(0)
    logits = torch.randn(4, 30, dtype=torch.float64)
    p = logits_to_probs(logits, 0.7, top_k=6).double()
    for row, lrow in zip(p, logits):
        keep = lrow.topk(6).indices
        want = torch.zeros(30, dtype=torch.float64)
        want[keep] = torch.softmax(lrow[keep] / 0.7, 0)
        assert torch.allclose(row, want, atol=1e-6)
    p = logits_to_probs(logits, 1.0, top_p=0.5).double()
    for row, lrow in zip(p, logits):
        full = torch.softmax(lrow, 0)
        order = full.argsort(descending=True)
        n = int((full[order].cumsum(0) < 0.5).sum()) + 1  # smallest prefix whose mass reaches 0.5
        want = torch.zeros(30, dtype=torch.float64)
        want[order[:n]] = full[order[:n]] / full[order[:n]].sum()
        assert torch.allclose(row, want, atol=1e-6)
    greedy = logits_to_probs(logits, 0.0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(4))
