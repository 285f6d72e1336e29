"""Training throughput: tokens/s, MFU and peak memory for presets x gradient-checkpointing modes.

    python bench/train.py                      # CUDA: presets 124m, 350m; writes bench/results/train.json
    python bench/train.py --presets 124m --modes none --compile both   # a slice: eager and compiled
    python bench/train.py --smoke              # CPU, tiny shapes: checks that the script runs

Batches are the real thing: PackedLoader rows of the corpus (--data, default the Python standard library;
~1.44 document pieces per 2048-token row), with their cu_seqlens. MFU counts attention FLOPs from the
document lengths (nano.runtime.flops_per_token), the work the varlen kernel does; counting full rows
would overstate it by ~20% at 124m. Baseline in the same run, doing the same masked work in plain
PyTorch: SDPA with a block-diagonal causal mask per row, the loss from full logits, no Triton. Peak memory
is measured after the warm-up steps (compilation and autotuning excluded).
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import kernels  # noqa: E402
from nano import model as nano_model  # noqa: E402
from nano.config import preset  # noqa: E402
from nano.data import PackedLoader, prepare_data  # noqa: E402
from nano.model import Transformer  # noqa: E402
from nano.runtime import autocast, flops_per_token, peak_flops  # noqa: E402


def sdpa_documents(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None, row_len=0):
    """The baseline's attention: packed (total, H, D) rows through SDPA with a block-diagonal causal mask."""
    B, T = q.shape[0] // row_len, row_len
    doc = torch.searchsorted(cu_seqlens.long(), torch.arange(B * T, device=q.device), right=True).view(B, T)
    mask = (doc[:, :, None] == doc[:, None, :]).tril()[:, None]  # (B, 1, T, T)
    g = q.shape[1] // k.shape[1]
    q, k, v = (x.view(B, T, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # masks and GQA: not every backend has both
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return y.transpose(1, 2).reshape(B * T, *y.shape[1:2], y.shape[-1])


def load_batches(data, vocab_size, B, T, n):
    """n packed (x, y, cu_seqlens) batches of the corpus (tokenized once, cached in $NANO_CACHE), on the
    host."""
    prepared = prepare_data(data, "", vocab_size, progress=False)
    loader = PackedLoader(prepared.train, B, T)
    return [loader.next_batch() for _ in range(n)]


def run(name, grad_ckpt, impl, batches, args, device, dtype, compiled=False, backend="inductor"):
    """impl "nano" (Triton attention, fused CE) or "baseline" (same masked work, plain PyTorch)."""
    baseline = impl == "baseline"
    cfg = preset(name, fused_ce=not baseline)  # its vocabulary holds the corpus's (--vocab-size)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.set_grad_ckpt(grad_ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model, backend=backend) if compiled else model
    B, T = batches[0][0].shape
    flops = sum(flops_per_token(model, T, cu) for _, _, cu in batches[args.warmup:]) / args.iters
    saved = nano_model.kernels.attention
    if baseline:
        nano_model.kernels.attention = sdpa_documents
    try:
        times = []
        for i, (x, y, cu) in enumerate(batches[:args.warmup + args.iters]):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)  # after compilation and autotuning
            x, y, cu = (t.to(device) for t in (x, y, cu))
            t0 = time.perf_counter()
            with autocast(device, dtype):
                _, loss = step_model(x, y, cu_seqlens=cu)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    finally:
        nano_model.kernels.attention = saved
    dt = sorted(times)[len(times) // 2]
    tok_s = B * T / dt
    peak = peak_flops(device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"preset": name, "grad_ckpt": grad_ckpt, "impl": impl + (" compiled" if compiled else ""),
            "tok_per_s": tok_s, "flops_per_token": flops, "mfu": flops * tok_s / peak if peak else None,
            "peak_mem_gib": mem}


def add_ratios(rows):
    """Speed-up against the eager baseline of the same preset and mode (same run)."""
    for r in rows:
        base = next((b for b in rows if b["impl"] == "baseline" and b["preset"] == r["preset"]
                     and b["grad_ckpt"] == r["grad_ckpt"]), None)
        r["speedup_vs_baseline"] = r["tok_per_s"] / base["tok_per_s"] if base else None


def show(r):
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
    print(f"{r['preset']:>10} {r['grad_ckpt']:>9} {r['impl']:>14}  {r['tok_per_s']:>12,.0f} tok/s  "
          f"MFU {mfu:>6}  mem {mem} GiB", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="124m,350m")
    p.add_argument("--modes", default="none,selective,full")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", default="no", choices=["no", "yes", "both"], help="nano: eager, compiled, both")
    p.add_argument("--data", default="", help="corpus (default: the Python standard library)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: checks the script, measures nothing")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train.json"))
    args = p.parse_args()
    if args.smoke:
        args.presets, args.batch_size, args.seq_len, args.iters, args.warmup = "tiny", 2, 64, 1, 0
        args.data = args.data or os.path.join(ROOT, "nano")  # a small corpus: the tokenizer trains fast
        args.vocab_size = 300
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/train.py needs a CUDA GPU (or --smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    batches = load_batches(args.data, args.vocab_size, args.batch_size, args.seq_len, args.warmup + args.iters)
    rows = []
    for name in args.presets.split(","):
        for mode in args.modes.split(","):
            variants = [("baseline", False)] + [("nano", c) for c in {"no": [False], "yes": [True],
                                                                      "both": [False, True]}[args.compile]]
            for impl, compiled in variants:
                rows.append(run(name, mode, impl, batches, args, device, dtype, compiled))
                show(rows[-1])
    add_ratios(rows)
    result = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": getattr(kernels, "triton", None) and kernels.triton.__version__,
        "date": datetime.date.today().isoformat(), "dtype": str(dtype), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "data": args.data or "python stdlib", "rows": rows,
    }
    if not args.smoke:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
