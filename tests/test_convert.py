"""Parity with Hugging Face transformers: tiny random models saved to disk, loaded by load_hf."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nano.convert import load_hf, load_meta  # noqa: E402
from nano.model import Transformer  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def _compare(hf_model, path, vocab, T=23):
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, T))
    with torch.no_grad():
        ref = hf_model(idx).logits
        ours, _ = load_hf(str(path))(idx)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n_kv,tie,scaling", [(4, False, None), (2, True, None), (1, False, LLAMA3_SCALING),
                                             (2, True, LLAMA3_SCALING)])
def test_llama_parity(tmp_path, n_kv, tie, scaling):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                                   rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=tie,
                                   rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # random norm weights so a dropped norm would show
    for n, p in hf.named_parameters():
        if "norm" in n:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    _compare(hf, _save(hf, tmp_path), 97, T=40)


@pytest.mark.parametrize("n_kv,tie", [(2, True), (1, False), (4, False)])
def test_qwen3_parity(tmp_path, n_kv, tie):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    for n, p in hf.named_parameters():
        if "norm" in n:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    _compare(hf, _save(hf, tmp_path), 101)


def test_load_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf(str(tmp_path))
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(str(tmp_path))


def test_load_meta_matches_hf_layout(tmp_path):
    """A Meta-layout checkpoint (interleaved RoPE rows) written from a HF Llama loads to the same logits."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}

    def unpermute(w, n):  # HF rotate-half rows -> Meta interleaved rows (inverse of nano's permutation)
        o, i = w.shape
        return w.view(n, 2, o // n // 2, i).transpose(1, 2).reshape(o, i)

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = unpermute(sd[p + "self_attn.q_proj.weight"], 4)
        meta[f"layers.{i}.attention.wk.weight"] = unpermute(sd[p + "self_attn.k_proj.weight"], 2)
        meta[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    torch.save(meta, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "norm_eps": 1e-6,
         "rope_theta": 500000.0}))
    model = load_meta(str(tmp_path))
    assert isinstance(model, Transformer)
    idx = torch.randint(0, 64, (1, 19))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
