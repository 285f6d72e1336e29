"""Configuration: ModelConfig (architecture), TrainConfig (the run), named presets, and the CLI.

Every field has a default, so `ModelConfig(n_layer=2)` works. Every field of both dataclasses is a
kebab-case flag of train.py (`--n-layer 4`, `--grad-ckpt full`); `python train.py --help` lists them.
"""
import argparse
import json
import sys
import types
import typing
from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # nano's own BPE default; set from the tokenizer at train time
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (plain multi-head); fewer = GQA, 1 = MQA
    n_embd: int = 768
    head_dim: int | None = None  # None = n_embd // n_head; Qwen3 decouples it from n_embd
    intermediate_size: int | None = None  # SwiGLU hidden; None = 8/3 * n_embd rounded up to 64
    max_seq_len: int = 2048  # longest sequence the model is meant for (RoPE tables, KV cache default)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1 style: {"factor", "low_freq_factor",
    #                                   "high_freq_factor", "original_max_position_embeddings"}
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # small models spend a large share of parameters on the embedding
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE (stabilises training)
    attn: str = "gqa"  # "gqa" | "mla"
    attn_impl: str = "auto"  # "auto" (Triton on CUDA, reference on CPU) | "reference" (debugging)
    fused_ce: bool = True  # CUDA: loss by kernels.linear_cross_entropy (no (N, V) logits); False = plain
    # MLA (DeepSeek-V2/V3 latent attention)
    q_lora_rank: int = 0  # 0 = no query compression
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # MoE (n_routed_experts = 0 means a dense MLP in every layer)
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # per-expert hidden; None = intermediate_size // 4
    n_group: int = 1  # DeepSeek-V3 group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups are eligible per token
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights (DeepSeek-V3: 2.5)
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    score_func: str = "sigmoid"  # router scores: "sigmoid" (DeepSeek-V3) | "softmax" (Mixtral, Qwen3-MoE)
    norm_topk_prob: bool = True  # renormalise the k chosen experts' scores to sum to 1
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: gamma of the selection-bias sign rule
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (DeepSeek-V3: 1e-4); 0 = off
    moe_impl: str = "auto"  # expert dispatch: "auto" | "loop" (CPU reference) | "grouped" | "bmm"
    # MTP (DeepSeek-V3 multi-token prediction)
    mtp_depth: int = 0  # 0 = off
    mtp_weight: float = 0.3  # loss = main + mtp_weight * mean of the MTP losses

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            _check(self.n_embd % self.n_head == 0,
                   f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                   "change one of them or set --head-dim")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.n_embd // 3 // 64) * 64
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = max(self.intermediate_size // 4, 1)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "max_seq_len"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _check(self.n_head % self.n_kv_head == 0,
               f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}) for GQA")
        _check(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        _check(self.attn in ("gqa", "mla"), f"attn must be 'gqa' or 'mla', got {self.attn!r}")
        _check(self.attn_impl in ("auto", "reference"),
               f"attn_impl must be 'auto' or 'reference', got {self.attn_impl!r}")
        if self.attn == "mla":
            _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even for RoPE")
            _check(self.kv_lora_rank > 0, "kv_lora_rank must be positive with attn='mla'")
        if self.n_routed_experts:
            _check(self.num_experts_per_tok <= self.n_routed_experts,
                   f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts "
                   f"({self.n_routed_experts})")
            _check(self.n_routed_experts % self.n_group == 0,
                   f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            _check(self.topk_group <= self.n_group,
                   f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            _check(self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                   f"topk_group ({self.topk_group}) groups of {self.n_routed_experts // self.n_group} experts "
                   f"hold fewer than num_experts_per_tok ({self.num_experts_per_tok}); raise --topk-group")
        _check(self.score_func in ("sigmoid", "softmax"),
               f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        _check(self.moe_impl in ("auto", "loop", "grouped", "bmm"),
               f"moe_impl must be auto|loop|grouped|bmm, got {self.moe_impl!r}")
        _check(self.mtp_depth >= 0, f"mtp_depth must be >= 0, got {self.mtp_depth}")
        if self.rope_scaling is not None:
            keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            _check(isinstance(self.rope_scaling, dict) and keys <= set(self.rope_scaling),
                   f"rope_scaling must be a dict with keys {sorted(keys)}")


@dataclass
class TrainConfig:
    data: str = ""  # "" = the Python stdlib; or a text file, folder, .jsonl(.gz), .parquet, hf:OWNER/NAME
    tokenizer: str = ""  # "" = train nano's BPE on the corpus; or a tiktoken file / cached encoding name
    tokenizer_train_bytes: int = 300_000_000  # the BPE learns from the first this many bytes of train docs
    data_max_bytes: int = 0  # > 0: only the first documents holding this many bytes (hf: fetch only those)
    out_dir: str = "out"
    resume: bool = False  # continue from out_dir/ckpt.pt
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "auto"  # "auto" | "bf16" | "fp16" | "fp32"
    compile: bool | None = None  # None = on for CUDA, off for CPU
    parallel: str = "ddp"  # "ddp" | "fsdp" (under torchrun)
    grad_ckpt: str = "none"  # "none" | "full" | "selective"
    seed: int = 1337
    max_steps: int = 1000
    batch_size: int = 8  # rows per micro-step, all processes together (each of N takes batch_size / N)
    seq_len: int = 256
    grad_accum: int = 1  # micro-steps per optimizer step
    tokens_per_step: int = 0  # > 0: set grad_accum to reach this many tokens per optimizer step
    stop_after: int = 0  # > 0: checkpoint and exit after this many steps of this invocation (time slices)
    optimizer: str = "adamw"  # "adamw" | "muon" (Muon for hidden matrices, AdamW for the rest; nano/optim.py)
    lr: float = 1e-3  # AdamW's peak learning rate
    muon_lr: float | None = None  # Muon's peak learning rate; None = lr (Muon's update RMS matches AdamW's)
    min_lr_ratio: float = 0.1  # lr decays to lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay, decay over the last 20%)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_steps: int = 10
    ckpt_every: int = 200
    log_every: int = 10
    sample_every: int = 500  # print a short sample every this many steps (and at the end); 0 = only at the end
    # post-training (nano/finetune.py): start from a model, adapt it with LoRA, train on chat or preference data
    init_from: str = ""  # "" = random weights; or a nano run directory / checkpoint, or a Hugging Face folder
    lora_rank: int = 0  # 0 = off (every weight trains); r > 0: frozen base + rank-r adapters (nano/lora.py)
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank (Hu et al. 2021)
    lora_targets: str = ""  # comma-separated weight names (wq,wk,wv,wo,w1,w2,w3,...); "" = every projection
    dpo_beta: float = 0.1  # DPO (preference .jsonl): how far the policy may move from the reference

    def __post_init__(self):
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"),
               f"dtype must be auto|bf16|fp16|fp32, got {self.dtype!r}")
        _check(self.grad_ckpt in ("none", "full", "selective"),
               f"grad_ckpt must be none|full|selective, got {self.grad_ckpt!r}")
        _check(self.parallel in ("ddp", "fsdp"), f"parallel must be ddp|fsdp, got {self.parallel!r}")
        _check(self.optimizer in ("adamw", "muon"), f"optimizer must be adamw|muon, got {self.optimizer!r}")
        _check(self.schedule in ("cosine", "wsd"), f"schedule must be cosine|wsd, got {self.schedule!r}")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _check(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        _check(self.dpo_beta > 0, f"dpo_beta must be positive, got {self.dpo_beta}")


def _check(ok, message):
    if not ok:
        raise ValueError(message)


# -----------------------------------------------------------------------------
# Presets: ModelConfig overrides, plus TrainConfig overrides under "train".

PRESETS = {
    # a few-minute CPU run on 2 cores
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, max_seq_len=512, vocab_size=4096,
                 train=dict(batch_size=8, seq_len=256, lr=2e-3, max_steps=400)),  # ~5 min on 2 cores
    # GPT-2 small sized (~124M with a 50k vocabulary), LLaMA-style blocks
    "gpt2-small": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, vocab_size=50304, max_seq_len=2048,
                       train=dict(batch_size=16, seq_len=1024, lr=6e-4)),
    # the default GPU preset: ~120M parameters with nano's 8k BPE (GPT-2 small's width and depth)
    "124m": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, intermediate_size=3072, vocab_size=8192,
                 max_seq_len=2048, train=dict(batch_size=16, seq_len=2048, lr=1e-3, tokens_per_step=262144)),
    "350m": dict(n_layer=24, n_head=16, n_kv_head=4, n_embd=1024, vocab_size=50304, max_seq_len=2048,
                 train=dict(batch_size=8, seq_len=2048, lr=3e-4)),
    # Llama-3.2-1B's shape (vocabulary 128,256, tied embeddings, rope scaling factor 32)
    "llama3.2-1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                        vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192),
                        train=dict(batch_size=4, seq_len=2048, lr=3e-4)),
    # a draft model for speculative decoding of `tiny` (same tokenizer: same --data and vocab size)
    "draft": dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, max_seq_len=512, vocab_size=4096,
                  train=dict(batch_size=8, seq_len=256, lr=3e-3, out_dir="out-draft")),
    # a small DeepSeek-V3-shaped model: MLA + MoE (shared + routed, group-limited) + MTP
    "deepseek-tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=4096, max_seq_len=512, attn="mla",
                          q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                          v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                          moe_intermediate_size=96, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                          first_k_dense_replace=1, mtp_depth=1,
                          train=dict(batch_size=8, seq_len=256, lr=2e-3)),
}


def preset(name, **overrides):
    """ModelConfig of a named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kw = {k: v for k, v in PRESETS[name].items() if k != "train"}
    return ModelConfig(**{**kw, **overrides})


# -----------------------------------------------------------------------------
# CLI built from the dataclass fields

class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit 2, not a usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_bool(s):
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("auto", "none"):
        return None
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _converter(tp):
    """argparse `type=` for a dataclass field annotation (int, float, bool, str, dict, `X | None`)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = args[0] if optional else tp
    if base is bool:
        return _parse_bool
    if base is dict:
        def parse_json(s):
            if s.lower() == "none":
                return None
            try:
                return json.loads(s)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"expected JSON, got {s!r} ({e})") from None
        return parse_json

    def parse(s):
        if optional and s.lower() in ("none", "auto"):
            return None
        try:
            return base(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {s!r}") from None
    parse.__name__ = base.__name__
    return parse


def _metavar(conv):
    return "BOOL" if conv is _parse_bool else conv.__name__.removeprefix("parse_").upper()


def build_parser(description="nano"):
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, help=f"named model preset: {', '.join(PRESETS)}")
    for cls in (TrainConfig, ModelConfig):
        group = p.add_argument_group(cls.__name__)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            conv = _converter(hints[f.name])
            flag = dict(nargs="?", const=True) if conv is _parse_bool else {}  # bare `--resume` means true
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=argparse.SUPPRESS,
                               metavar=_metavar(conv), help=f"(default: {f.default!r})", **flag)
    return p


def _parse(argv, defaults):
    """(parser, ModelConfig kwargs, TrainConfig kwargs): flags over the preset's values."""
    p = build_parser()
    ns = vars(p.parse_args(argv))
    name = ns.pop("preset", None) or (defaults or {}).get("preset")
    model_kw, train_kw = {}, {}
    if name is not None:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        model_kw = {k: v for k, v in PRESETS[name].items() if k != "train"}
        train_kw = dict(PRESETS[name].get("train", {}))
    train_names = {f.name for f in fields(TrainConfig)}
    for k, v in ns.items():
        (train_kw if k in train_names else model_kw)[k] = v
    return p, model_kw, train_kw


def parse_args(argv=None, defaults=None):
    """Parse CLI flags into (ModelConfig, TrainConfig). Precedence: flags > preset > `defaults` > dataclass.

    Every error (unknown flag, wrong type, unknown preset, a config that does not divide) ends the
    process with one line on stderr and exit code 2.
    """
    p, model_kw, train_kw = _parse(argv, defaults)
    try:
        return ModelConfig(**model_kw), TrainConfig(**train_kw)
    except (ValueError, TypeError) as e:
        p.error(str(e))


def parse_train_args(argv=None):
    """The TrainConfig alone, for what must be known before the default preset is (train.py: --device and
    --dtype choose it). Model flags are checked later, against that preset, by parse_args: checking
    `--n-embd 136` against the bare dataclass (12 heads) would refuse what the tiny preset (4) accepts."""
    p, _, train_kw = _parse(argv, None)
    try:
        return TrainConfig(**train_kw)
    except (ValueError, TypeError) as e:
        p.error(str(e))


if __name__ == "__main__":  # python -m nano.config --preset tiny: print the resolved configs
    m, t = parse_args(sys.argv[1:])
    print(json.dumps({"model": asdict(m), "train": asdict(t)}, indent=2))
