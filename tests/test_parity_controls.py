"""Hugging Face parity that can fail: with the usual 0.02 init attention is nearly uniform, and dropping RoPE
moves the logits by only ~5e-3. Here q_proj/k_proj are drawn with std 0.2, so attention is peaked and
positions matter; the loaded model must match transformers within 1e-4, and each control (no RoPE, a 10%
wrong RoPE theta, no QK-norm) must miss it by a wide margin."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from nano.convert import load_hf  # noqa: E402
from nano.model import rope_inv_freq  # noqa: E402

TOL = 1e-4


def _hf(kind):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=500000.0, rms_norm_eps=1e-5)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64, rms_norm_eps=1e-6)
        hf = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "q_proj" in n or "k_proj" in n:
                p.normal_(0.0, 0.2)  # peaked attention: scores of several units
    return hf.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_parity_with_peaked_attention_and_controls(tmp_path, kind):
    hf = _hf(kind)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_hf(str(tmp_path))
    idx = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        err = lambda: (model(idx)[0] - ref).abs().max().item()  # noqa: E731
        assert err() <= TOL
        inv_freq = model.inv_freq.clone()
        model.inv_freq.zero_()  # no RoPE: every rotation is the identity
        assert err() > 100 * TOL
        model.inv_freq.copy_(rope_inv_freq(2 * inv_freq.numel(), 1.1 * model.config.rope_theta))
        assert err() > 10 * TOL
        model.inv_freq.copy_(inv_freq)
        assert err() <= TOL
        if kind == "qwen3":
            for block in model.layers:
                block.attention.q_norm = block.attention.k_norm = None
            assert err() > 100 * TOL
