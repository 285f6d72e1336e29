"""Compiled decoding (CPU inductor): token for token the eager output, and one compilation for prompts of
different lengths (the caches come in a few static sizes, positions are tensor inputs)."""
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import nano.generate as G
from nano.config import ModelConfig
from nano.generate import generate, speculative_generate
from nano.model import Transformer


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


def _fresh():
    torch._dynamo.reset()
    counters.clear()
    G._COMPILED.clear()


def test_compiled_generate_equals_eager_and_compiles_once():
    _fresh()
    model = _model()
    for T in (5, 9):  # two prompt lengths, one graph
        prompt = torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(T))
        want = generate(model, prompt, 12, temperature=0, compile=False)
        assert torch.equal(generate(model, prompt, 12, temperature=0, compile=True), want)
    assert counters["stats"]["unique_graphs"] == 1  # a silent fallback to eager would count 0


def test_compiled_tree_verify_equals_eager_and_compiles_once():
    _fresh()
    model = _model(mtp_depth=2)
    for T in (4, 7):
        prompt = torch.randint(0, 61, (3, T), generator=torch.Generator().manual_seed(T))
        want = generate(model, prompt, 10, temperature=0, compile=False)
        got, _ = speculative_generate(model, prompt, 10, draft="mtp", tree=(2, 2), temperature=0, compile=True)
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1  # the verify forward (the MTP modules run eagerly)
