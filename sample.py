"""Sample from a trained nano model (or a Hugging Face Llama/Qwen3/DeepSeek-V3 directory).

    python sample.py --ckpt out --prompt "def fib(n):"
    python sample.py --ckpt out --draft out-draft --temperature 0     # speculative, with a draft model
    python sample.py --ckpt out --speculate mtp                       # speculative, with the MTP head
    python sample.py --ckpt out --draft out-draft --tree 3,2,1,1      # tree speculation (the default)
    python sample.py --hf path/to/Llama-3.2-1B --prompt "The capital of France is"
    python sample.py --ckpt out-sft --chat --system "You are terse."      # talk to it (stdin; pipes work)
"""
import argparse
import codecs
import itertools
import os
import sys
import time

import torch

from nano.chat import end_of_turn_id, render
from nano.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from nano.config import OneLineParser
from nano.finetune import hf_tokenizer, load_model
from nano.generate import generate, parse_tree, speculative_generate, stream
from nano.runtime import autocast, pick_device


def parse(argv):
    p = OneLineParser(description="sample from a nano checkpoint",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run directory (with ckpt.pt) or checkpoint file")
    src.add_argument("--hf", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default="", help="tokenizer file or cached tiktoken name (for --hf)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <bos>)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation in the model's chat template: each line of stdin is a user turn, the "
                        "reply streams and ends at the end-of-turn token (or --max-new-tokens)")
    p.add_argument("--system", default="", help="system message of a --chat conversation")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", help="run directory of a draft model with the same tokenizer")
    spec.add_argument("--speculate", choices=["mtp"], help="speculate with the model's own MTP modules")
    p.add_argument("--k", type=int, default=None,
                   help="a chain of k draft tokens per speculative step instead of the default tree")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="compile the decode steps (static shapes; auto: on for CUDA)")
    p.add_argument("--tree", default=None,
                   help="branching factors per depth, e.g. 3,2,1,1 (default: 3,2,1,1 with --draft, its first "
                        "mtp_depth factors with mtp); 1,1,1,1 is the chain")
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    device, dtype, reason = pick_device(args.device, args.dtype)
    print(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')} ({reason})")
    if args.ckpt:
        model, tok, state = load_model(args.ckpt, device)  # a LoRA run's adapters are merged onto its base
    else:
        from nano.convert import load_hf
        model = load_hf(args.hf, device=device)
        tok = hf_tokenizer(args.hf, args.tokenizer)
    if dtype != torch.float32:
        model.to(dtype)  # decoding reads every weight per token: half the bytes in bf16/fp16
    model.eval()
    draft = None
    if args.draft:
        dstate = load_checkpoint(args.draft)
        if args.ckpt and dstate["tokenizer"] != state["tokenizer"]:
            raise ValueError(f"the draft in {args.draft} was trained with another tokenizer than {args.ckpt}; "
                             "train it on the same --data with the same --vocab-size")
        draft = model_from_checkpoint(dstate, device).to(model.output.weight.dtype).eval()
    elif args.speculate == "mtp":
        if model.config.mtp_depth == 0:
            raise ValueError("--speculate mtp needs a model trained with MTP (--mtp-depth >= 1)")
        draft = "mtp"
    if args.chat:
        if draft is not None:
            raise ValueError("--chat decodes plainly: drop --draft / --speculate")
        return chat(model, tok, args, device, dtype)

    ids = [tok.bos_id] + tok.encode(args.prompt)
    idx = torch.tensor([ids] * args.num_samples, device=device)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              compile={"auto": None, "true": True, "false": False}[args.compile])
    t0 = time.perf_counter()
    with autocast(device, dtype):
        if draft is None:
            out, stats = generate(model, idx, args.max_new_tokens, **kw), {}
        else:
            tree = default_tree(args, model, draft)
            out, stats = speculative_generate(model, idx, args.max_new_tokens, draft=draft, tree=tree, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for row in out.tolist():
        print(tok.decode(row[1:]))
        print("-" * 40)
    n_new = args.num_samples * args.max_new_tokens
    line = f"{n_new} tokens in {dt:.2f} s: {n_new / dt:,.1f} tokens/s"
    if stats:
        per_depth = ", ".join(f"{a:.0%}" for a in stats["accepted_at"])
        line += (f"; k {stats['k']}, acceptance rate {stats['acceptance_rate']:.1%}, "
                 f"{stats['tokens_per_step']:.2f} tokens per target forward; tree {','.join(map(str, stats['tree']))} "
                 f"({stats['nodes']} nodes), accepted per depth {per_depth}")
    print(line)


def chat(model, tok, args, device, dtype):
    """Read user turns from stdin until it ends; answer each in the family's chat template (nano/chat.py),
    streaming the reply, and keep the history. The oldest turns are dropped when the conversation and a
    reply of --max-new-tokens no longer fit in the model's max_seq_len."""
    eot = end_of_turn_id(tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns, interactive = [], sys.stdin.isatty()
    for n in itertools.count():
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (a pipe, or Ctrl-D)
            break
        if not line.strip():
            continue
        turns.append({"role": "user", "content": line.rstrip("\n")})
        ids, _ = render(tok, system + turns, add_generation_prompt=True)
        while len(ids) + args.max_new_tokens > model.config.max_seq_len and len(turns) > 1:
            turns = turns[2:]  # forget the oldest exchange (user + assistant)
            ids, _ = render(tok, system + turns, add_generation_prompt=True)
        print("assistant: ", end="", flush=True)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        reply = []
        with autocast(device, dtype):
            for t in stream(model, torch.tensor([ids], device=device), args.max_new_tokens, stop={eot},
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed + n, compile=False):
                if t == eot:
                    break
                reply.append(t)
                print(text.decode(tok.enc.decode_single_token_bytes(t)), end="", flush=True)
        print(text.decode(b"", final=True))
        turns.append({"role": "assistant", "content": tok.decode(reply)})


def default_tree(args, model, draft):
    """--tree, else a chain of --k, else 3,2,1,1 (cut to mtp_depth with MTP: module d drafts depth d)."""
    if args.tree and args.k:
        raise ValueError("pass --tree or --k, not both (--k K is the tree 1,1,...,1 of depth K)")
    if args.tree:
        return parse_tree(args.tree)
    if args.k:
        return (1,) * args.k
    return (3, 2, 1, 1)[:model.config.mtp_depth] if draft == "mtp" else (3, 2, 1, 1)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, CheckpointError) as e:  # bad input or a bad file: one line, exit 2
        if os.environ.get("NANO_DEBUG"):
            raise
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
