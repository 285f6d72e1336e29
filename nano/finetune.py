"""Post-training plumbing: the model a run starts from (--init-from), and LoRA runs' checkpoints.

- load_base(path): a nano run directory or checkpoint (a LoRA run's: its adapters merged onto its own base)
  or a Hugging Face folder (config.json + *.safetensors, with Meta's tokenizer.model or a tokenizer.json)
  -> (model, tokenizer).
- A LoRA run's checkpoint holds only what trained: the adapters and the trainable token rows (a few MB),
  with the path and fingerprint of the base under "lora". load_model() rebuilds the model from it (the
  base, checked against the fingerprint, plus the adapters, merged) for sample.py and export, and
  `python -m nano.finetune merge RUN_DIR OUT_DIR` writes that as a plain nano checkpoint.
- Which task a --data file is (text, chat SFT, DPO preferences) is decided in nano/chat.py (data_kind); the
  chat template and its special tokens there too; the DPO loss and its data in nano/dpo.py.
"""
import os
import sys

from nano.checkpoint import (CheckpointError, CheckpointForeign, load_checkpoint, model_from_checkpoint,
                             save_checkpoint)
from nano.config import ModelConfig
from nano.lora import apply_lora, fingerprint, load_lora_state_dict, merge_lora
from nano.tokenizer import Tokenizer, load_tokenizer


def is_hf_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def hf_tokenizer(path, spec=""):
    """The tokenizer of a Hugging Face folder: `spec` (a file or cached tiktoken name) when given, else
    Meta's tokenizer.model (in the folder or its original/ folder, as Llama-3 releases ship it), else the
    folder's tokenizer.json."""
    if spec:
        return load_tokenizer(spec)
    for name in ("tokenizer.model", os.path.join("original", "tokenizer.model"), "tokenizer.json"):
        if os.path.isfile(os.path.join(path, name)):
            return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path} (nor {path}/original); pass "
                            "--tokenizer FILE")


def load_base(path):
    """(model, tokenizer) of --init-from PATH, in fp32 on the CPU (train.py moves and casts it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init-from {path!r} does not exist: give a nano run directory or checkpoint, "
                                "or a Hugging Face model folder (config.json + *.safetensors)")
    if is_hf_dir(path):
        from nano.convert import load_hf
        return load_hf(path), hf_tokenizer(path)
    model, tok, _ = load_model(path)
    return model, tok


def load_model(path, device="cpu"):
    """(model, tokenizer, state) of a nano run directory or checkpoint file; a LoRA run's adapters are merged
    onto its base. A damaged, truncated, foreign or malicious file raises a CheckpointError."""
    state = load_checkpoint(path)
    if "lora" not in state:
        model = model_from_checkpoint(state, device)
    else:
        model = merge_lora(lora_model(state)).to(device)
    return model, Tokenizer.from_state(state["tokenizer"]), state


def lora_model(state):
    """The base of a LoRA checkpoint with its adapters (unmerged), checked against the base's fingerprint."""
    info = state["lora"]
    try:
        base, _ = load_base(info["base"])
    except (OSError, ValueError, CheckpointError) as e:
        raise CheckpointForeign(f"the base model of this LoRA checkpoint cannot be loaded ({e}); it must stay at "
                                f"{info['base']}") from None
    if fingerprint(base.state_dict()) != info["base_fingerprint"]:
        raise CheckpointForeign(f"the model at {info['base']} is not the base this LoRA run was trained on "
                                "(its weights changed since): restore that base, or merge the run while it was there")
    base.grow_vocab(ModelConfig(**state["model_config"]).vocab_size)  # the chat tokens a fine-tune added
    apply_lora(base, info["rank"], info["alpha"], info["targets"], info["token_ids"])
    try:
        load_lora_state_dict(base, state["model"])
    except ValueError as e:
        raise CheckpointForeign(f"the LoRA checkpoint does not fit its base: {e}") from None
    return base


def merge(run_dir, out_dir):
    """Write a LoRA run's model (base + adapters, merged) as a plain nano checkpoint OUT_DIR/ckpt.pt, which
    train.py --init-from, sample.py and `python -m nano.convert export` read without the base."""
    model, _, state = load_model(run_dir)
    if "lora" not in state:
        raise ValueError(f"{run_dir} is not a LoRA run (its checkpoint holds every weight already)")
    path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(path):
        raise ValueError(f"{path} exists: choose another output folder")
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": state["model_config"],
                           "train_config": state.get("train_config", {}), "tokenizer": state["tokenizer"],
                           "step": state["step"], "merged_from": os.path.abspath(run_dir)})
    return path


def main(argv=None):
    from nano.config import OneLineParser
    p = OneLineParser(prog="python -m nano.finetune", description="post-training utilities")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="a LoRA run -> a plain nano checkpoint (adapters merged into the weights)")
    m.add_argument("run_dir", help="the LoRA run's directory (or checkpoint file)")
    m.add_argument("out_dir", help="folder for the merged ckpt.pt")
    args = p.parse_args(argv)
    try:
        path = merge(args.run_dir, args.out_dir)
    except (ValueError, OSError, CheckpointError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"merged {args.run_dir} into {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
