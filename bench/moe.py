"""MoE feed-forward throughput: nano's MoE layer (router + routed experts + shared experts, forward and
backward) against a dense SwiGLU MLP with the same active parameters per token, bf16, same run.

    python bench/moe.py             # CUDA: writes bench/results/moe.json
    python bench/moe.py --smoke     # CPU, tiny shapes, fp32: checks the script runs; writes nothing

Baseline: a dense MLP of hidden (n_shared + k) * H, i.e. the FLOPs a token spends in the MoE layer's
experts. The MoE variants are the dispatch paths of nano/moe.py: "grouped" (sort by expert +
torch._grouped_mm; skipped where torch has no fast kernel for bf16 on this GPU), "bmm" (padded batched
matmul) and "loop" (one matmul per expert, the reference). Before timing, each variant's output and
gradients in bf16 are checked against the fp32 loop: max error <= 2 * (error of the bf16 loop) + 1e-3.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nano.config import ModelConfig  # noqa: E402
from nano.model import MLP  # noqa: E402
from nano.moe import MoE, grouped_mm_fast  # noqa: E402

# (name, n_embd, routed experts, top-k, expert hidden, shared experts, groups, groups kept)
SHAPES = [
    ("dsv2-lite-like", 2048, 64, 6, 1408, 2, 1, 1),
    ("dsv3-like-small", 1024, 64, 8, 512, 1, 8, 4),
]
SMOKE_SHAPES = [("smoke", 64, 8, 2, 32, 1, 2, 1)]


def build(shape, device, dtype, seed=0):
    name, D, E, k, H, shared, groups, keep = shape
    cfg = ModelConfig(n_embd=D, n_head=1, n_routed_experts=E, num_experts_per_tok=k, moe_intermediate_size=H,
                      n_shared_experts=shared, n_group=groups, topk_group=keep)
    torch.manual_seed(seed)
    moe = MoE(cfg, MLP(D, H * shared) if shared else None)
    dense = MLP(D, H * (shared + k))
    for m in (moe, dense):
        for p in m.parameters():
            torch.nn.init.normal_(p, 0.0, D ** -0.5)
    return moe.to(device, dtype), dense.to(device, dtype)


def fwd_bwd(module, x, grad):
    x = x.detach().requires_grad_()
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y  # MoE: (y, routing record)
    y.backward(grad)
    return y.detach(), x.grad


def max_err(got, ref):
    return max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))


def outputs(moe, impl, x, grad):
    moe.experts.impl = impl
    moe.zero_grad(set_to_none=True)
    y, gx = fwd_bwd(moe, x, grad)
    return [y, gx, moe.experts.w1.grad, moe.experts.w2.grad, moe.experts.w3.grad, moe.gate.weight.grad]


def timed(fn, iters, warmup, device):
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_shape(shape, args, device, dtype):
    name, D, E, k, H = shape[:5]
    N = args.tokens
    moe, dense = build(shape, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(N, 1, D, device=device, dtype=dtype, generator=gen)  # (B, T, D) with T = 1
    grad = torch.randn(N, 1, D, device=device, dtype=dtype, generator=gen)
    impls = ["grouped", "bmm", "loop"]
    can_group = grouped_mm_fast(x, moe.experts.w1) if device.type == "cuda" else hasattr(torch, "_grouped_mm")
    if not can_group:
        impls.remove("grouped")
        print(f"{name}: torch._grouped_mm has no fast kernel for {dtype} here: skipping 'grouped'")
    # correctness against the fp32 loop (same weights, same routing inputs)
    ref_moe = build(shape, device, torch.float32)[0]
    ref_moe.load_state_dict({n: t.float() for n, t in moe.state_dict().items()})
    ref = outputs(ref_moe, "loop", x.float(), grad.float())
    tol = 2 * max_err(outputs(moe, "loop", x, grad), ref) + 1e-3
    checks = {}
    for impl in impls:
        err = max_err(outputs(moe, impl, x, grad), ref)
        checks[impl] = {"max_err_vs_fp32_loop": err, "tolerance": tol, "ok": err <= tol}
        if err > tol:
            print(f"{name}: {impl} FAILS the correctness check: max error {err:.3g} > {tol:.3g}")
    rows = []
    t_dense = timed(lambda: fwd_bwd(dense, x, grad), args.iters, args.warmup, device)
    rows.append({"shape": name, "impl": "dense MLP (same active params)", "ms": t_dense * 1e3,
                 "tok_per_s": N / t_dense, "vs_dense": 1.0})
    for impl in impls:
        moe.experts.impl = impl
        t = timed(lambda: fwd_bwd(moe, x, grad), args.iters, args.warmup, device)
        rows.append({"shape": name, "impl": f"MoE {impl}", "ms": t * 1e3, "tok_per_s": N / t,
                     "vs_dense": t_dense / t, **checks[impl]})
    load = moe(x)[1].load
    meta = {"shape": name, "n_embd": D, "n_routed_experts": E, "top_k": k, "expert_hidden": H,
            "n_shared_experts": shape[5], "n_group": shape[6], "topk_group": shape[7], "tokens": N,
            "dense_hidden": H * (shape[5] + k), "max_over_mean_load": (load.max() / load.mean()).item()}
    return rows, meta


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384, help="tokens per forward/backward")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny CPU fp32 run: checks the script only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "moe.json"))
    args = p.parse_args()
    if args.smoke:
        shapes, args.tokens, args.iters, args.warmup = SMOKE_SHAPES, 256, 2, 1
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/moe.py needs a CUDA GPU (or --smoke)")
        shapes, device, dtype = SHAPES, torch.device("cuda"), torch.bfloat16
    rows, metas = [], []
    for shape in shapes:
        r, m = run_shape(shape, args, device, dtype)
        rows += r
        metas.append(m)
    print(f"\n{'shape':<16} {'impl':<32} {'ms':>9} {'tok/s':>14} {'vs dense':>9}  check")
    for r in rows:
        check = "" if "ok" not in r else ("ok" if r["ok"] else "FAIL") + f" ({r['max_err_vs_fp32_loop']:.2g})"
        print(f"{r['shape']:<16} {r['impl']:<32} {r['ms']:>9.3f} {r['tok_per_s']:>14,.0f} "
              f"{r['vs_dense']:>8.2f}x  {check}")
    if args.smoke:
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton_version, "date": datetime.date.today().isoformat(),
              "dtype": str(dtype), "timing": "forward + backward of the layer, median of --iters",
              "shapes": metas, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
