"""Training throughput: tokens/s, MFU and peak memory for presets x gradient-checkpointing modes.

    python bench/train.py                      # CUDA: presets 124m, 350m; writes bench/results/train.json
    python bench/train.py --smoke              # CPU, tiny shapes: checks that the script runs

Baseline in the same run: the same architecture in plain PyTorch, nanoGPT style: SDPA attention over
dense causal rows (no document masking), the loss from full logits, no Triton. nano runs packed rows
(cu_seqlens), the Triton attention kernel and the fused linear + cross-entropy.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from nano import model as nano_model  # noqa: E402
from nano.config import preset  # noqa: E402
from nano.model import Transformer  # noqa: E402
from nano.runtime import autocast, flops_per_token, peak_flops  # noqa: E402


def sdpa_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       scale=softmax_scale, enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2)


def run(name, grad_ckpt, baseline, args, device, dtype):
    cfg = preset(name, fused_ce=not baseline)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.set_grad_ckpt(grad_ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    # 4 documents per row for nano (what the packed loader produces); the baseline ignores them
    cu = torch.arange(0, B * T + 1, T // 4, device=device, dtype=torch.int32)
    cu[-1] = B * T
    saved = nano_model.kernels.flash_attention
    if baseline:
        nano_model.kernels.flash_attention = sdpa_attention
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            with autocast(device, dtype):
                _, loss = step_model(x, y) if baseline else step_model(x, y, cu_seqlens=cu)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    finally:
        nano_model.kernels.flash_attention = saved
    dt = sorted(times)[len(times) // 2]
    tok_s = B * T / dt
    peak = peak_flops(device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"preset": name, "grad_ckpt": grad_ckpt, "impl": "baseline" if baseline else "nano",
            "tok_per_s": tok_s, "mfu": flops_per_token(model, T) * tok_s / peak if peak else None,
            "peak_mem_gib": mem}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="124m,350m")
    p.add_argument("--modes", default="none,selective,full")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: checks the script, measures nothing useful")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train.json"))
    args = p.parse_args()
    if args.smoke:
        args.presets, args.batch_size, args.seq_len, args.iters, args.warmup = "tiny", 2, 64, 1, 0
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/train.py needs a CUDA GPU (or --smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for name in args.presets.split(","):
        for mode in args.modes.split(","):
            for baseline in (True, False):
                rows.append(run(name, mode, baseline, args, device, dtype))
                r = rows[-1]
                mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
                mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
                print(f"{r['preset']:>10} {r['grad_ckpt']:>9} {r['impl']:>8}  {r['tok_per_s']:>12,.0f} tok/s  "
                      f"MFU {mfu:>6}  mem {mem} GiB")
    for r in rows:  # ratio against the baseline of the same preset and mode, same run
        base = next(b for b in rows if b["impl"] == "baseline" and b["preset"] == r["preset"]
                    and b["grad_ckpt"] == r["grad_ckpt"])
        r["speedup_vs_baseline"] = r["tok_per_s"] / base["tok_per_s"]
    result = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": getattr(kernels, "triton", None) and kernels.triton.__version__,
        "date": datetime.date.today().isoformat(), "dtype": str(dtype), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "compile": args.compile, "rows": rows,
    }
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
