"""Load Hugging Face (Llama, Qwen3, DeepSeek-V3) and Meta Llama-3 checkpoints into nano's Transformer, and
export nano models to Hugging Face format (save_hf, `python -m nano.convert export RUN_DIR OUT_DIR`).

nano's parameter names are Meta's, so Meta checkpoints load as they are (RoPE weights permuted to
the rotate-half layout) and Hugging Face checkpoints go through the name tables below. Export is the
same steps undone, through the same tables and the same RoPE permutation: a dense model with GQA is a
LlamaForCausalLM, with QK-norm a Qwen3ForCausalLM, with MLA (and MoE, MTP) a DeepseekV3ForCausalLM
in DeepSeek's own release layout (interleaved RoPE rows, one tensor per expert, MTP layers after the
last layer), which transformers, vLLM and DeepSeek's code read.

DeepSeek-V3 (model_type "deepseek_v3", DeepseekV3ForCausalLM), per layer N (prefix model.layers.N.):

    Hugging Face                              nano (prefix layers.N.)
    self_attn.q_proj  (no q_lora_rank)        attention.wq           rope rows de-interleaved (*)
    self_attn.q_a_proj                        attention.wq_a
    self_attn.q_a_layernorm                   attention.q_norm
    self_attn.q_b_proj                        attention.wq_b         rope rows de-interleaved (*)
    self_attn.kv_a_proj_with_mqa              attention.wkv_a        rope rows de-interleaved (*)
    self_attn.kv_a_layernorm                  attention.kv_norm
    self_attn.kv_b_proj                       attention.wkv_b
    self_attn.o_proj                          attention.wo
    mlp.gate_proj / up_proj / down_proj       feed_forward.w1 / w3 / w2          (dense layers)
    mlp.gate.weight                           feed_forward.gate.weight           (router)
    mlp.gate.e_score_correction_bias          feed_forward.gate.expert_bias      (balancing bias)
    mlp.experts.E.gate_proj / up_proj /       feed_forward.experts.w1 / w3 / w2  stacked over E
      down_proj  (or the fused experts.gate_up_proj (E, 2H, D) and experts.down_proj)
    mlp.shared_experts.gate_proj / up_proj /  feed_forward.shared_experts.w1 / w3 / w2
      down_proj

(*) with rope_interleave (DeepSeek's layout, the default) the qk_rope_head_dim rows of each head rotate
interleaved pairs (0,1),(2,3)...; nano rotates (i, i + d/2), so those rows are reordered evens-then-odds
at load. Scores are unchanged: q and k get the same permutation.

MTP modules: DeepSeek-V3 stores them as extra layers model.layers.{num_hidden_layers + k} (transformers'
DeepseekV3ForCausalLM does not load them). nano maps those found in the checkpoint to mtp.k (and sets
mtp_depth to their number): enorm, hnorm, eh_proj -> mtp.k.enorm/hnorm/eh_proj; shared_head.norm ->
mtp.k.norm; the decoder-layer tensors as above under mtp.k.block.; their copies of embed_tokens and
shared_head.head are dropped (nano's MTP modules share the main embedding and LM head).
"""
import glob
import json
import os
import re
import shutil
import tempfile

import torch

from nano.config import ModelConfig
from nano.model import Transformer

# Hugging Face name <-> nano name; "*" stands for a layer or an expert number. load_hf reads the tables left
# to right, save_hf right to left (with the tables of the model's family only: a nano name such as
# attention.q_norm is Qwen3's self_attn.q_norm in one family and DeepSeek's q_a_layernorm in the other).
LLAMA_NAMES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.*.input_layernorm.weight", "layers.*.attention_norm.weight"),
    ("model.layers.*.post_attention_layernorm.weight", "layers.*.ffn_norm.weight"),
    ("model.layers.*.self_attn.q_proj.weight", "layers.*.attention.wq.weight"),
    ("model.layers.*.self_attn.k_proj.weight", "layers.*.attention.wk.weight"),
    ("model.layers.*.self_attn.v_proj.weight", "layers.*.attention.wv.weight"),
    ("model.layers.*.self_attn.o_proj.weight", "layers.*.attention.wo.weight"),
    ("model.layers.*.mlp.gate_proj.weight", "layers.*.feed_forward.w1.weight"),
    ("model.layers.*.mlp.up_proj.weight", "layers.*.feed_forward.w3.weight"),
    ("model.layers.*.mlp.down_proj.weight", "layers.*.feed_forward.w2.weight"),
]
QWEN3_NAMES = [
    ("model.layers.*.self_attn.q_norm.weight", "layers.*.attention.q_norm.weight"),
    ("model.layers.*.self_attn.k_norm.weight", "layers.*.attention.k_norm.weight"),
]
# DeepSeek-V3 (see the table in the module docstring): MLA, then MoE. Per-expert tensors get a
# temporary ".E" suffix in nano's names and are stacked (load) or split (export) over E.
DEEPSEEK_NAMES = [
    ("model.layers.*.self_attn.q_a_proj.weight", "layers.*.attention.wq_a.weight"),
    ("model.layers.*.self_attn.q_a_layernorm.weight", "layers.*.attention.q_norm.weight"),
    ("model.layers.*.self_attn.q_b_proj.weight", "layers.*.attention.wq_b.weight"),
    ("model.layers.*.self_attn.kv_a_proj_with_mqa.weight", "layers.*.attention.wkv_a.weight"),
    ("model.layers.*.self_attn.kv_a_layernorm.weight", "layers.*.attention.kv_norm.weight"),
    ("model.layers.*.self_attn.kv_b_proj.weight", "layers.*.attention.wkv_b.weight"),
    ("model.layers.*.mlp.gate.weight", "layers.*.feed_forward.gate.weight"),
    ("model.layers.*.mlp.gate.e_score_correction_bias", "layers.*.feed_forward.gate.expert_bias"),
    ("model.layers.*.mlp.shared_experts.gate_proj.weight", "layers.*.feed_forward.shared_experts.w1.weight"),
    ("model.layers.*.mlp.shared_experts.up_proj.weight", "layers.*.feed_forward.shared_experts.w3.weight"),
    ("model.layers.*.mlp.shared_experts.down_proj.weight", "layers.*.feed_forward.shared_experts.w2.weight"),
    ("model.layers.*.mlp.experts.*.gate_proj.weight", "layers.*.feed_forward.experts.w1.*"),
    ("model.layers.*.mlp.experts.*.up_proj.weight", "layers.*.feed_forward.experts.w3.*"),
    ("model.layers.*.mlp.experts.*.down_proj.weight", "layers.*.feed_forward.experts.w2.*"),
]
# transformers 5 saves the experts fused ((E, 2H, D) gate rows first, and (E, D, H)): read, never written
FUSED_EXPERT_NAMES = [
    ("model.layers.*.mlp.experts.gate_up_proj", "layers.*.feed_forward.experts.gate_up"),
    ("model.layers.*.mlp.experts.down_proj", "layers.*.feed_forward.experts.w2"),
]
HF_TO_NANO = LLAMA_NAMES + QWEN3_NAMES + DEEPSEEK_NAMES + FUSED_EXPERT_NAMES

# DeepSeek-V3 MTP layer model.layers.{n_layer + k}: its own parts (the rest is a decoder layer -> mtp.k.block)
HF_MTP_TO_NANO = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                  "eh_proj.weight": "eh_proj.weight", "shared_head.norm.weight": "norm.weight"}
HF_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's: dropped

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


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


def hf_config(hf, mtp_depth=0):
    """nano ModelConfig from a Hugging Face config.json dict (mtp_depth: DeepSeek-V3 MTP layers present)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"model_type {kind!r} is not supported; nano loads: {', '.join(SUPPORTED)}")
    if hf.get("quantization_config"):
        raise ValueError(f"quantized checkpoint ({hf['quantization_config'].get('quant_method', '?')}): nano "
                         "loads bf16/fp32 weights; dequantize it first (e.g. DeepSeek's fp8_cast_bf16.py)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias=True is not supported (nano's linears have no bias)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (nano's MLP is SwiGLU with silu)")
    theta, scaling = _rope_settings(hf)
    n_head = hf["num_attention_heads"]
    if kind == "deepseek_v3":
        return _deepseek_config(hf, theta, scaling, mtp_depth)
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=kind == "qwen3")


def _deepseek_config(hf, theta, scaling, mtp_depth):
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError("DeepSeek-V3 routing is scoring_func='sigmoid' with topk_method='noaux_tc'; got "
                         f"{hf.get('scoring_func')!r}/{hf.get('topk_method')!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"], head_dim=hf["qk_rope_head_dim"], intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096), rope_theta=theta, rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok", 8),
        moe_intermediate_size=hf["moe_intermediate_size"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, routed_scaling_factor=hf.get("routed_scaling_factor", 2.5),
        first_k_dense_replace=hf.get("first_k_dense_replace", 3), score_func="sigmoid",
        norm_topk_prob=hf.get("norm_topk_prob", True), mtp_depth=mtp_depth)


def rope_rows(w, n_blocks, start, n, *, to_interleaved=False):
    """In each of n_blocks row blocks of w, reorder rows start..start+n from the interleaved RoPE layout
    (pairs (0,1),(2,3)...: Meta, DeepSeek) to nano's halves layout (pairs (i, i + n/2), as Hugging Face's
    Llama): evens first, then odds. `to_interleaved` is the inverse (export)."""
    perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
    if to_interleaved:
        perm = perm.argsort()
    w = w.reshape(n_blocks, -1, w.shape[-1]).clone()
    w[:, start:start + n] = w[:, start:start + n][:, perm]
    return w.reshape(-1, w.shape[-1])


def _deepseek_rope(state, config, *, to_interleaved=False):
    """The RoPE rows of MLA's query (per head, after the nope rows) and of the shared key (after the
    latent), in place on a nano-named state dict (MTP blocks included)."""
    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
    for name in state:
        if name.endswith(("attention.wq.weight", "attention.wq_b.weight")):
            state[name] = rope_rows(state[name], config.n_head, nope, rope, to_interleaved=to_interleaved)
        elif name.endswith("attention.wkv_a.weight"):
            state[name] = rope_rows(state[name], 1, config.kv_lora_rank, rope, to_interleaved=to_interleaved)


def _deepseek_state(state, config, hf):
    """Stack per-expert tensors, split fused gate_up, and de-interleave the RoPE rows."""
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"(.*\.experts\.w[123])\.(\d+)", name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = t
        elif name.endswith(".experts.gate_up"):
            w1, w3 = t.chunk(2, dim=1)  # (E, 2H, D): gate rows first, as transformers' chunk(2)
            out[name[:-len("gate_up")] + "w1"], out[name[:-len("gate_up")] + "w3"] = w1, w3
        else:
            out[name] = t
    for name, v in list(out.items()):
        if isinstance(v, dict):
            if sorted(v) != list(range(config.n_routed_experts)):
                raise ValueError(f"{name}: the checkpoint holds experts {sorted(v)[:8]}..., expected "
                                 f"0..{config.n_routed_experts - 1}")
            out[name] = torch.stack([v[e] for e in range(config.n_routed_experts)])
    if hf.get("rope_interleave", True):
        _deepseek_rope(out, config)
    return out


def _mtp_layers(names, n_layer):
    """Indices k of the DeepSeek MTP layers model.layers.{n_layer + k} in a checkpoint."""
    found = {int(m.group(1)) - n_layer for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))
             and int(m.group(1)) >= n_layer}
    if found != set(range(len(found))):
        raise ValueError(f"MTP layers {sorted(k + n_layer for k in found)} are not consecutive from "
                         f"{n_layer}")
    return len(found)


def _rename_mtp(name, n_layer):
    """nano name of a DeepSeek MTP-layer tensor; "" for the shared copies to drop; None if not MTP."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
    if not m or int(m.group(1)) < n_layer:
        return None
    k, rest = int(m.group(1)) - n_layer, m.group(2)
    if rest in HF_MTP_SHARED:
        return ""
    if rest in HF_MTP_TO_NANO:
        return f"mtp.{k}.{HF_MTP_TO_NANO[rest]}"
    inner = rename(f"model.layers.0.{rest}")
    return None if inner is None else f"mtp.{k}.block." + inner[len("layers.0."):]


def rename(name, table=HF_TO_NANO, *, reverse=False):
    """`name` through the first (from, to) pair of `table` that matches it (to -> from with `reverse`);
    None if none does. A "*" matches a number and carries it over."""
    for src, dst in table:
        src, dst = (dst, src) if reverse else (src, dst)
        m = re.fullmatch(re.escape(src).replace(r"\*", r"(\d+)"), name)
        if m:
            return dst.replace("*", "{}").format(*m.groups())
    return None


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("Hugging Face checkpoints need safetensors: pip install -e '.[hf]'") from None
    return safetensors.torch


def _load_safetensors(path):
    load_file = _safetensors().load_file
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


def _read_json(path):
    """A JSON object from a file; a malformed one names the file (json's own message does not)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def load_hf(path, *, dtype=torch.float32, device="cpu"):
    """Transformer from a Hugging Face directory (config.json + *.safetensors) of a supported model."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: load_hf needs a Hugging Face model directory "
                                "with config.json and *.safetensors")
    hf = _read_json(cfg_path)
    try:
        hf_config(hf)  # fail on an unsupported model before reading gigabytes of weights
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the field {e}") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    tensors = _load_safetensors(path)
    deepseek = hf["model_type"] == "deepseek_v3"
    n_layer = hf["num_hidden_layers"]
    config = hf_config(hf, mtp_depth=_mtp_layers(tensors, n_layer) if deepseek else 0)
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("weight_scale_inv"):
            raise ValueError(f"{name}: an FP8 checkpoint; dequantize it to bf16 first "
                             "(DeepSeek's fp8_cast_bf16.py)")
        new = _rename_mtp(name, n_layer) if deepseek else None
        if new == "":
            continue
        new = new or rename(name)
        if new is None:
            if "rotary_emb" in name:  # some exports store RoPE tables; nano recomputes them
                continue
            raise ValueError(f"unexpected tensor {name!r} in {path}: not a {SUPPORTED[hf['model_type']]}?")
        state[new] = tensor
    if deepseek:
        state = _deepseek_state(state, config, hf)
    return _build(config, state, dtype, device)


# -----------------------------------------------------------------------------
# Export: the inverse of load_hf

def hf_family(config):
    """The Hugging Face model_type that runs `config` exactly: llama (GQA), qwen3 (GQA + QK-norm) or
    deepseek_v3 (MLA, MoE, MTP). A setting none of them has raises ValueError naming the field."""
    c = config
    if c.attn == "gqa":
        for name, value, why in (("n_routed_experts", c.n_routed_experts, "experts"),
                                 ("mtp_depth", c.mtp_depth, "MTP modules")):
            if value:
                raise ValueError(f"{name}={value}: Hugging Face's Llama and Qwen3 have no {why}; only "
                                 "DeepseekV3ForCausalLM does, which needs attn='mla'")
        return "qwen3" if c.qk_norm else "llama"
    if c.qk_norm:
        raise ValueError("qk_norm=True with attn='mla': DeepseekV3ForCausalLM has no QK-norm")
    if c.n_routed_experts and c.score_func != "sigmoid":
        raise ValueError(f"score_func={c.score_func!r}: DeepseekV3ForCausalLM routes with a sigmoid only")
    if c.n_routed_experts and not c.n_shared_experts:
        raise ValueError("n_shared_experts=0: DeepseekV3ForCausalLM always runs at least one shared expert")
    return "deepseek_v3"


def to_hf_config(config, tokenizer=None, dtype=torch.float32):
    """config.json of the model (the inverse of hf_config): every field of its family's config, written
    out rather than left to the reader's defaults (which differ between transformers versions)."""
    c, kind = config, hf_family(config)
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_id") if tokenizer else None
           for role in ("bos", "eos", "pad")}
    scaling = c.rope_scaling and {"rope_type": "llama3", **c.rope_scaling}
    hf = dict(architectures=[SUPPORTED[kind]], model_type=kind, vocab_size=c.vocab_size,
              hidden_size=c.n_embd, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
              num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, hidden_act="silu",
              max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
              rope_scaling=scaling, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
              attention_dropout=0.0, initializer_range=0.02, use_cache=True,
              torch_dtype=str(dtype).removeprefix("torch."), **ids)
    if kind == "llama":
        hf.update(head_dim=c.head_dim, mlp_bias=False, pretraining_tp=1)
    elif kind == "qwen3":
        hf.update(head_dim=c.head_dim, use_sliding_window=False, sliding_window=None,
                  max_window_layers=c.n_layer)
    else:
        # a dense MLA model: every layer (MTP ones included) before first_k_dense_replace is dense
        moe = c.n_routed_experts > 0
        hf.update(num_key_value_heads=c.n_head, q_lora_rank=c.q_lora_rank or None,
                  kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                  qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, rope_interleave=True,
                  n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
                  num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                  n_group=c.n_group, topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
                  norm_topk_prob=c.norm_topk_prob,
                  first_k_dense_replace=c.first_k_dense_replace if moe else c.n_layer + c.mtp_depth,
                  scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, ep_size=1,
                  num_nextn_predict_layers=c.mtp_depth)
    return hf


def _export_names(config):
    """The name tables of the model's family, for save_hf (right to left)."""
    return LLAMA_NAMES + {"llama": [], "qwen3": QWEN3_NAMES, "deepseek_v3": DEEPSEEK_NAMES}[hf_family(config)]


def hf_state(model):
    """Hugging Face tensors of a nano model: load_hf's steps undone in reverse order (RoPE rows
    re-interleaved and experts split for DeepSeek-V3, then the names)."""
    c, table = model.config, _export_names(model.config)
    state = dict(model.state_dict())
    if c.tie_embeddings:
        del state["output.weight"]  # transformers ties it back from tie_word_embeddings
    if c.attn == "mla":
        _deepseek_rope(state, c, to_interleaved=True)
        for name in [n for n in state if re.search(r"\.experts\.w[123]$", n)]:
            for e, t in enumerate(state.pop(name)):
                state[f"{name}.{e}"] = t
    out = {}
    for name, t in state.items():
        m = re.fullmatch(r"mtp\.(\d+)\.(.*)", name)
        if m:
            hf = _mtp_to_hf(int(m.group(1)), m.group(2), c.n_layer, table)
        else:
            hf = rename(name, table, reverse=True)
        if hf is None:
            raise ValueError(f"nano tensor {name!r} has no Hugging Face name in convert.py's tables")
        out[hf] = t
    for k in range(c.mtp_depth):  # DeepSeek's release layout: each MTP layer carries copies of these
        out[f"model.layers.{c.n_layer + k}.embed_tokens.weight"] = model.tok_embeddings.weight.detach()
        out[f"model.layers.{c.n_layer + k}.shared_head.head.weight"] = model.output.weight.detach()
    return out


def _mtp_to_hf(k, rest, n_layer, table):
    """Hugging Face name of MTP module k's tensor `rest`: the inverse of _rename_mtp."""
    prefix, own = f"model.layers.{n_layer + k}.", {v: h for h, v in HF_MTP_TO_NANO.items()}
    if rest in own:
        return prefix + own[rest]
    inner = rename("layers.0." + rest.removeprefix("block."), table, reverse=True)
    return inner and prefix + inner.removeprefix("model.layers.0.")


def _save_shards(tensors, folder, max_shard_bytes):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the
    tensors exceed max_shard_bytes (a tensor larger than that gets a shard of its own)."""
    save_file = _safetensors().save_file
    shards, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for file, names in zip(files, shards):
        # clone: safetensors refuses tensors that share memory (expert slices, the MTP layers' copies);
        # "format: pt" is the metadata transformers checks for
        shard = {n: tensors[n].detach().cpu().contiguous().clone() for n in names}
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        where = {n: f for f, ns in zip(files, shards) for n in ns}
        index = {"metadata": {"total_size": total}, "weight_map": where}
        _write_json(os.path.join(folder, "model.safetensors.index.json"), index)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_hf(model, path, tokenizer=None, *, force=False, max_shard_bytes=5 << 30):
    """Write `model` (and its tokenizer) as a Hugging Face folder that transformers' AutoModelForCausalLM
    and AutoTokenizer load: config.json, model.safetensors (sharded above max_shard_bytes),
    generation_config.json, tokenizer.json and tokenizer_config.json; load_hf(path) gives back the same
    tensors. Everything is written into a temp folder beside `path` and renamed at the end: an export that
    fails leaves no `path`. An existing non-empty `path` is refused unless `force`."""
    dtype = model.tok_embeddings.weight.dtype
    config = to_hf_config(model.config, tokenizer, dtype)  # refuses before anything is written
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocab_size "
                         f"({model.config.vocab_size}): is it the model's tokenizer?")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} is a file; give a folder to export into")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise FileExistsError(f"{path} exists and is not empty; choose another folder or pass --force "
                              "(force=True) to replace it")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=parent)
    old = None
    try:
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {k: v for k, v in config.items() if k.endswith("_token_id")})
        if tokenizer is not None:
            for name, obj in tokenizer.hf_files().items():
                _write_json(os.path.join(tmp, name), obj)
        _save_shards(hf_state(model), tmp, max_shard_bytes)
        if os.path.isdir(path):  # move the old folder aside, rename, then delete it
            old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, base))
        os.rename(tmp, path)
    except BaseException:  # Ctrl-C included: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.rename(os.path.join(old, base), path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


# -----------------------------------------------------------------------------
# Meta's original Llama-3 layout: params.json, consolidated.*.pth, tokenizer.model

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
    p = _read_json(params_path)
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
    for i in range(config.n_layer):  # Meta's RoPE rotates interleaved pairs, over the whole head
        for name, heads in (("wq", n_head), ("wk", n_kv)):
            key = f"layers.{i}.attention.{name}.weight"
            state[key] = rope_rows(state[key], heads, 0, state[key].shape[0] // heads)
    return _build(config, state, dtype, device)


# -----------------------------------------------------------------------------
# python -m nano.convert export RUN_DIR OUT_DIR

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    from nano.checkpoint import CheckpointError
    from nano.config import OneLineParser
    from nano.finetune import load_model
    p = OneLineParser(prog="python -m nano.convert", description="convert nano models")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a nano run directory -> a Hugging Face folder (weights, tokenizer)")
    e.add_argument("run_dir", help="run directory with ckpt.pt (or a checkpoint file)")
    e.add_argument("out_dir", help="folder to create (refused if it exists and is not empty)")
    e.add_argument("--force", action="store_true", help="replace an existing out_dir")
    e.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the exported weights")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="weights files of at most this size")
    args = p.parse_args(argv)
    try:
        model, tok, state = load_model(args.run_dir)  # a LoRA run is merged onto its base first
        model = model.to(DTYPES[args.dtype])
        path = save_hf(model, args.out_dir, tok, force=args.force,
                       max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, OSError, ImportError, CheckpointError) as err:  # bad input: one line, exit code 2
        p.exit(2, f"{p.prog}: error: {err}\n")
    print(f"exported {args.run_dir} (step {state['step']}) as {SUPPORTED[hf_family(model.config)]} to {path}")


if __name__ == "__main__":
    main()
