"""Load Hugging Face (Llama, Qwen3) and Meta Llama-3 checkpoints into nano's Transformer.

nano's parameter names are Meta's, so Meta checkpoints load as they are (RoPE weights permuted to
the rotate-half layout) and Hugging Face checkpoints go through the table below.
"""
import glob
import json
import os
import re

import torch

from nano.config import ModelConfig
from nano.model import Transformer

# Hugging Face name (regex) -> nano name
HF_TO_NANO = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", r"layers.\1.attention.q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", r"layers.\1.attention.k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
]

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_settings(hf):
    """rope theta and Llama-3 scaling from either the old (`rope_theta` + `rope_scaling`) or the
    transformers-5 (`rope_parameters`) layout of config.json."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported (nano implements default and llama3 RoPE)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: params[k] for k in keys}


def hf_config(hf):
    """nano ModelConfig from a Hugging Face config.json dict."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported; nano loads: {', '.join(SUPPORTED)}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias=True is not supported (nano's linears have no bias)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (nano's MLP is SwiGLU with silu)")
    theta, scaling = _rope_settings(hf)
    n_head = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=kind == "qwen3")


def rename(name, table=HF_TO_NANO):
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def _load_safetensors(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading Hugging Face checkpoints needs safetensors: pip install -e '.[hf]'") from None
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _build(config, state, dtype, device):
    model = Transformer(config)
    if config.tie_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_embeddings:
        missing = [m for m in missing if m != "output.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval()


def load_hf(path, *, dtype=torch.float32, device="cpu"):
    """Transformer from a Hugging Face directory (config.json + *.safetensors) of a supported model."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: load_hf needs a Hugging Face model directory "
                                "with config.json and *.safetensors")
    with open(cfg_path) as f:
        hf = json.load(f)
    config = hf_config(hf)
    state = {}
    for name, tensor in _load_safetensors(path).items():
        new = rename(name)
        if new is None:
            if "rotary_emb" in name:  # some exports store RoPE tables; nano recomputes them
                continue
            raise ValueError(f"unexpected tensor {name!r} in {path}: not a {SUPPORTED[hf['model_type']]}?")
        state[new] = tensor
    return _build(config, state, dtype, device)


# -----------------------------------------------------------------------------
# Meta's original Llama-3 layout: params.json, consolidated.*.pth, tokenizer.model

def _permute_rotary(w, n_heads):
    """Meta's RoPE rotates interleaved pairs (0,1),(2,3)...; nano (and HF) rotate (i, i + D/2).
    Reordering the rows of wq/wk per head turns one into the other."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_meta(path, *, dtype=torch.float32, device="cpu"):
    """Transformer from Meta's Llama-3 release layout (one or more consolidated.*.pth shards merged
    only for a single shard: the 1B/3B/8B releases)."""
    params_path = os.path.join(path, "params.json")
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not os.path.isfile(params_path) or not shards:
        raise FileNotFoundError(f"{path} is not a Meta Llama-3 checkpoint: it needs params.json and "
                                "consolidated.00.pth")
    if len(shards) > 1:
        raise ValueError(f"{len(shards)} model-parallel shards in {path}; nano loads single-shard releases")
    with open(params_path) as f:
        p = json.load(f)
    state = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    state = {k: v for k, v in state.items() if not k.endswith("rope.freqs")}
    n_head, dim = p["n_heads"], p["dim"]
    n_kv = p.get("n_kv_heads") or n_head
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = dict(factor=p.get("rope_scaling_factor", 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
    config = ModelConfig(
        vocab_size=p["vocab_size"], n_layer=p["n_layers"], n_head=n_head, n_kv_head=n_kv, n_embd=dim,
        intermediate_size=state["layers.0.feed_forward.w1.weight"].shape[0], max_seq_len=8192,
        rope_theta=p.get("rope_theta", 500000.0), rope_scaling=scaling, norm_eps=p.get("norm_eps", 1e-5),
        tie_embeddings="output.weight" not in state)
    for i in range(config.n_layer):
        for name, heads in (("wq", n_head), ("wk", n_kv)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = _permute_rotary(state[key], heads)
    return _build(config, state, dtype, device)
