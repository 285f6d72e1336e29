"""Flash attention: TFLOP/s of kernels.flash_attention (Triton) against PyTorch SDPA (flash and cuDNN
backends) and, for packed documents, FlexAttention with a document mask; all in one run, correctness first.

    python bench/attention.py                 # CUDA, bf16: checks, then every case -> table, results JSON
    python bench/attention.py --dims 128/128 --causal 1 --seqs 8192 --skip-check   # a slice of it
    python bench/attention.py --smoke         # CPU, Triton interpreted, tiny shapes: checks the script runs

Cases: head dims 64/64, 128/128 and MLA 192/128 (Dqk/Dv), causal and not, seq 1k..16k with batch = 16k tokens
/ seq and heads = 2048 / Dqk (as in FlashAttention's benchmarks), forward, backward and forward+backward.
FLOPs counted (useful work, the convention of FlashAttention's benchmarks): forward 2*B*H*T^2*(Dqk + Dv),
backward 2*B*H*T^2*(3*Dqk + 2*Dv) (Q K^T, dV, dP, dQ, dK), both halved when causal. SDPA's flash backend needs
Dv == Dqk: for MLA it runs with V zero-padded to Dqk (what MLA training with FlashAttention-2 does).
Varlen: 8 documents of random lengths per 8k row, packed (cu_seqlens), against the same rows as one dense
causal sequence each (the work without document masking) and FlexAttention with a document mask; the figure
is useful tokens/s.
Correctness (before timing): bf16 and fp16 against an fp32 reference on odd shapes (T = 1, 17, 1000, 4097,
GQA, 96/96, 192/128, 256/256, varlen), rule max|out - ref| <= 2 * max|torch same dtype - ref| + eps * max|ref|
for the output and dq/dk/dv; and the backward twice on the same inputs must give bitwise equal gradients.
Also measured: a large bf16 matmul (the achievable tensor-core rate on this GPU) as the ceiling.

The two numbers (METHOD.md), hd 128, causal, 8k, B=2, H=16: the forward is 0.55 TFLOP against 0.27 GB of
Q, K, V, O: ~0.7 ms of tensor-core work at ~800 TFLOP/s against 0.08 ms of HBM traffic, so compute-bound
and the roofline is the matmul rate measured below. Per score element the forward's 4*D = 512 matmul FLOPs
share the SM with one exp2 (MUFU, 16/clk/SM: about half the matmul time at hd 128 unless overlapped,
FlashAttention-3's point). The two-kernel backward executes 2*(4*Dqk + 3*Dv) = 1792 FLOPs and two exp2
per element where the useful count is 2*(3*Dqk + 2*Dv) = 1280 (Q K^T and dP are recomputed by the dQ
kernel: the price of no atomics and deterministic gradients), so its TFLOP/s column reads 0.71x of the
rate the tensor cores actually ran.

Targets (issue 5; H100/H200/H800/GH200, bf16, hd 128, causal, seq 8k): forward >= 1.1x SDPA-flash and >= 450
TFLOP/s; backward >= 1.0x SDPA-flash and >= 300 TFLOP/s; varlen (8 docs per 8k row) >= 1.8x the dense causal
kernel in useful tokens/s. The table ends with where each stands. NANO_PIN_CONFIGS=1 skips autotuning.
"""
import argparse
import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# the targets' GPUs: one SM (sm_90) and one dense bf16 peak, 989 TFLOP/s (the PCIe H100 is slower: excluded)
HOPPER = ("H100", "H200", "H800", "GH200")


def hopper_peak(name):
    """The dense bf16 peak (FLOP/s) of an SXM Hopper GPU by its device name, else None."""
    from nano.runtime import PEAK_BF16_FLOPS
    if "PCIe" in name or not any(h in name for h in HOPPER):
        return None
    return next(flops for key, flops in PEAK_BF16_FLOPS if key in name)


def attn_flops(B, H, T, dqk, dv, causal, mode):
    f = 2 * B * H * T * T * ((dqk + dv) if mode == "fwd" else (3 * dqk + 2 * dv))
    return f / 2 if causal else f


def make(B, T, Hq, Hkv, dqk, dv, dtype, device, seed, varlen=False):
    g = torch.Generator(device=device).manual_seed(seed)
    lead = (B * T,) if varlen else (B, T)
    q, k, v = (torch.randn(*lead, h, d, device=device, generator=g).to(dtype)
               for h, d in ((Hq, dqk), (Hkv, dqk), (Hkv, dv)))
    return q, k, v


def random_cu_seqlens(B, T, n_docs, device, seed):
    """n_docs documents of random lengths (>= 1) in each of B rows of T tokens: int32 boundaries."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        cuts = torch.randperm(T - 1, generator=g)[:n_docs - 1].sort().values + 1
        rows.append(torch.cat((torch.tensor([0]), cuts)) + b * T)
    return torch.cat(rows + [torch.tensor([B * T])]).to(device=device, dtype=torch.int32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# correctness and determinism

def grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return [out.double(), *(g.double() for g in torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))]


def check(kernels, device, cases, dtype):
    rows = []
    for B, T, Hq, Hkv, dqk, dv, causal, n_docs in cases:
        varlen = n_docs > 0
        q, k, v = make(B, T, Hq, Hkv, dqk, dv, dtype, device, seed=T + dqk, varlen=varlen)
        kw = dict(causal=causal)
        if varlen:
            kw["cu_seqlens"] = random_cu_seqlens(B, T, n_docs, device, seed=T)
        g = torch.Generator(device).manual_seed(T)
        do = torch.randn(*q.shape[:-1], dv, device=device, generator=g).to(dtype)
        ours = grads(kernels.flash_attention, q, k, v, do, **kw)
        again = grads(kernels.flash_attention, q, k, v, do, **kw)
        same = grads(kernels.attention_reference, q, k, v, do, **kw)
        hi = torch.float64 if dtype == torch.float32 else torch.float32  # the reference's precision
        ref = grads(kernels.attention_reference, q.to(hi), k.to(hi), v.to(hi), do.to(hi), **kw)
        eps = max(torch.finfo(dtype).eps, 1e-5)  # fp32 (smoke): the kernel's summation order differs
        row = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "Dqk": dqk, "Dv": dv, "causal": causal, "docs": n_docs,
               "dtype": str(dtype).replace("torch.", ""),
               "deterministic": all(torch.equal(a, b) for a, b in zip(ours, again))}
        ok = row["deterministic"]
        for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, same, ref):
            err, err_torch = (a - r).abs().max().item(), (s - r).abs().max().item()
            good = err <= 2 * err_torch + eps * r.abs().max().item()  # NaN fails
            row[name] = {"err": err, "err_torch": err_torch, "ok": good}
            ok &= good
        row["ok"] = ok
        rows.append(row)
        print(f"check {row['dtype']:>8} B={B} T={T:<5} H={Hq}/{Hkv} D={dqk}/{dv} causal={int(causal)} "
              f"docs={n_docs} " + " ".join(f"{n} {row[n]['err']:.1e} (torch {row[n]['err_torch']:.1e})"
                                           for n in ("out", "dq", "dk", "dv"))
              + f" deterministic={row['deterministic']} {'ok' if ok else 'FAIL'}", flush=True)
        del q, k, v, do, ours, again, same, ref
    return rows


# -----------------------------------------------------------------------------
# timing

def bench_ms(fn, device, grad_to_none, reps):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=reps, grad_to_none=grad_to_none,
                                       return_mode="median")
    import time  # CPU (smoke): one run, no warm-up
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def time_impl(fn, q, k, v, device, reps):
    """(fwd, bwd, fwd+bwd) median ms of out = fn(q, k, v) with q, k, v requiring grad."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    do = torch.randn_like(out)
    with torch.no_grad():
        fwd = bench_ms(lambda: fn(q, k, v), device, [], reps)
    bwd = bench_ms(lambda: out.backward(do, retain_graph=True), device, [q, k, v], reps)
    both = bench_ms(lambda: fn(q, k, v).backward(do), device, [q, k, v], reps)
    return fwd, bwd, both


def sdpa(backend, pad_v=False):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def fn(q, k, v, causal):
        dv = v.shape[-1]
        if pad_v:  # flash needs Dv == Dqk
            v = torch.nn.functional.pad(v, (0, q.shape[-1] - dv))
        with sdpa_kernel(backend):
            o = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
        return o.transpose(1, 2)[..., :dv]
    return fn


def baselines(device):
    if device.type != "cuda":  # smoke: the default SDPA stands in for both
        from torch.nn.attention import SDPBackend
        return [("sdpa-math", sdpa(SDPBackend.MATH))]
    from torch.nn.attention import SDPBackend
    return [("sdpa-flash", sdpa(SDPBackend.FLASH_ATTENTION)),
            ("sdpa-flash-vpad", sdpa(SDPBackend.FLASH_ATTENTION, pad_v=True)),
            ("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))]


def run_case(kernels, impls, B, T, H, dqk, dv, causal, dtype, device, reps):
    q, k, v = make(B, T, H, H, dqk, dv, dtype, device, seed=T)
    rows = []
    for name, fn in impls:
        if name == "sdpa-flash-vpad" and dqk == dv:
            continue
        row = {"impl": name, "B": B, "T": T, "H": H, "Dqk": dqk, "Dv": dv, "causal": causal, "error": None}
        try:
            ms = time_impl(lambda a, b, c: fn(a, b, c, causal), q, k, v, device, reps)
        except Exception as e:  # a backend that does not support the shape (e.g. flash with Dv != Dqk)
            ms, row["error"] = (None, None, None), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for mode, t in zip(("fwd", "bwd", "fwd+bwd"), ms):
            f = (attn_flops(B, H, T, dqk, dv, causal, "fwd") if mode == "fwd" else
                 attn_flops(B, H, T, dqk, dv, causal, "bwd") if mode == "bwd" else
                 attn_flops(B, H, T, dqk, dv, causal, "fwd") + attn_flops(B, H, T, dqk, dv, causal, "bwd"))
            row[f"{mode}_ms"], row[f"{mode}_tflops"] = t, (f / t / 1e9 if t else None)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flash = next((r for r in rows if r["impl"] == "sdpa-flash" and r["fwd_ms"]), None)
    flash = flash or next((r for r in rows if r["impl"] == "sdpa-flash-vpad" and r["fwd_ms"]), None)
    for r in rows:  # speed-up over SDPA-flash (same shape, same run): > 1 is faster
        for mode in ("fwd", "bwd", "fwd+bwd"):
            ok = flash and r[f"{mode}_ms"]
            r[f"{mode}_vs_flash"] = flash[f"{mode}_ms"] / r[f"{mode}_ms"] if ok else None
    return rows


def run_varlen(kernels, B, T, H, d, n_docs, dtype, device, reps, flex=True):
    """Packed documents: varlen kernel vs the dense causal kernel on the same rows vs Flex with a doc mask."""
    q, k, v = make(B, T, H, H, d, d, dtype, device, seed=1)
    cu = random_cu_seqlens(B, T, n_docs, device, seed=2)
    max_len = int((cu[1:] - cu[:-1]).max())
    bhtd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # FlexAttention's layout
    impls = [("triton-dense-causal", lambda a, b, c: kernels.flash_attention(a, b, c, causal=True),
              (q, k, v)),
             ("triton-varlen", lambda a, b, c: kernels.flash_attention(a, b, c, causal=True, cu_seqlens=cu,
                                                                      max_seqlen=max_len),
              [x.view(B * T, *x.shape[2:]) for x in (q, k, v)])]
    if device.type == "cuda" and flex:  # compiling Flex takes a while: gpu_check.py leaves it out
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        doc = torch.searchsorted(cu.long(), torch.arange(B * T, device=device), right=True).view(B, T) - 1

        def doc_mask(b, h, qi, ki):
            return (doc[b, qi] == doc[b, ki]) & (qi >= ki)
        mask = create_block_mask(doc_mask, B, None, T, T, device=device)
        flex = torch.compile(flex_attention)
        impls.append(("flex-doc-mask", lambda a, b, c: flex(a, b, c, block_mask=mask), bhtd))
    useful = attn_flops(1, H, 1, d, d, True, "fwd") * float(((cu[1:] - cu[:-1]).double() ** 2).sum())
    rows = []
    for name, fn, inputs in impls:
        row = {"impl": name, "B": B, "T": T, "H": H, "D": d, "docs_per_row": n_docs, "error": None}
        try:
            ms = time_impl(fn, *inputs, device, reps)
        except Exception as e:
            ms, row["error"] = (None, None, None), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for mode, t in zip(("fwd", "bwd", "fwd+bwd"), ms):
            row[f"{mode}_ms"] = t
            row[f"{mode}_tokens_per_s"] = B * T / t * 1e3 if t else None
        row["useful_fwd_tflops"] = useful / ms[0] / 1e9 if ms[0] else None  # document-masked FLOPs only
        rows.append(row)
    dense = rows[0]
    for r in rows:  # useful tokens/s over the dense causal kernel's
        for mode in ("fwd", "bwd", "fwd+bwd"):
            ok = dense[f"{mode}_ms"] and r[f"{mode}_ms"]
            r[f"{mode}_vs_dense"] = dense[f"{mode}_ms"] / r[f"{mode}_ms"] if ok else None
    return rows


def matmul_tflops(device, dtype, reps):
    """The ceiling: a large matmul through cuBLAS, in TFLOP/s."""
    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / bench_ms(lambda: a @ b, device, [], reps) / 1e9


def fmt(x, spec):
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0] or 0))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64/64,128/128,192/128", help="Dqk/Dv pairs")
    p.add_argument("--causal", default="1,0")
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden // Dqk")
    p.add_argument("--varlen", default="8192,8", help="row length, documents per row ('' to skip)")
    p.add_argument("--reps", type=int, default=100, help="ms of timed repetitions per figure (do_bench rep)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, Triton interpreted: checks the script")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/attention.json)")
    args = p.parse_args()
    if args.smoke:  # before kernels (and triton) are imported: run the Triton kernels interpreted
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = torch.device("cpu"), torch.float32
        args.dims, args.causal, args.seqs, args.varlen = "64/64", "1", "64", "64,3"
        args.tokens, args.hidden = 64, 128
        checks = {torch.float32: [(1, 17, 2, 1, 64, 64, True, 0), (1, 40, 2, 2, 96, 96, False, 3)]}
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/attention.py needs a CUDA GPU (or --smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.out = args.out or os.path.join(ROOT, "bench", "results", "attention.json")
        # (B, T, Hq, Hkv, Dqk, Dv, causal, documents per row (0: dense)); every new combination of head dims,
        # causal, layout and dtype autotunes (compiles 12 configs), so fp16 gets a short list
        checks = {torch.bfloat16: [(2, 1, 4, 4, 64, 64, True, 0), (2, 17, 8, 2, 64, 64, True, 0),
                                   (1, 1000, 8, 1, 128, 128, True, 0), (1, 4097, 4, 4, 128, 128, True, 0),
                                   (1, 4097, 4, 2, 128, 128, False, 0), (2, 1000, 8, 8, 192, 128, True, 0),
                                   (2, 1000, 4, 4, 96, 96, False, 0), (1, 1000, 4, 4, 256, 256, True, 0),
                                   (2, 4096, 8, 4, 128, 128, True, 8), (2, 2048, 8, 8, 192, 128, False, 5)],
                  torch.float16: [(2, 17, 8, 2, 64, 64, True, 0), (2, 1000, 8, 8, 192, 128, True, 0),
                                  (2, 2048, 8, 4, 128, 128, True, 5)]}
    os.environ.pop("NANO_FORCE_REFERENCE", None)
    import kernels  # noqa: E402 - after TRITON_INTERPRET is settled

    check_rows = []
    for dt, cases in ({} if args.skip_check else checks).items():
        check_rows += check(kernels, device, cases, dt)
    impls = [("triton", lambda q, k, v, causal: kernels.flash_attention(q, k, v, causal=causal))]
    impls += baselines(device)
    dims = [tuple(int(x) for x in d.split("/")) for d in args.dims.split(",")]
    rows = []
    for (dqk, dv) in dims:
        for causal in (c == "1" for c in args.causal.split(",")):
            for T in (int(s) for s in args.seqs.split(",")):
                B, H = max(1, args.tokens // T), max(1, args.hidden // dqk)
                rows += run_case(kernels, impls, B, T, H, dqk, dv, causal, dtype, device, args.reps)
                print(f"timed D={dqk}/{dv} causal={int(causal)} T={T}", flush=True)
    var_rows = []
    if args.varlen:
        T, n_docs = (int(x) for x in args.varlen.split(","))
        d = 64 if args.smoke else 128
        B, H = max(1, args.tokens // T), max(1, args.hidden // 128)
        var_rows = run_varlen(kernels, B, T, H, d, n_docs, dtype, device, args.reps)
    ceiling = matmul_tflops(device, dtype, args.reps)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"\nattention, {str(dtype).replace('torch.', '')}, {name}; matmul ceiling {ceiling:.0f} TFLOP/s")
    print(f"{'Dqk/Dv':>7} {'causal':>6} {'T':>6} {'B':>4} {'H':>3} {'impl':<16} {'fwd TF/s':>9} "
          f"{'bwd TF/s':>9} {'f+b TF/s':>9} {'fwd/flash':>9} {'bwd/flash':>9} {'f+b/flash':>9}")
    for r in rows:
        print(f"{r['Dqk']:>3}/{r['Dv']:<3} {int(r['causal']):>6} {r['T']:>6} {r['B']:>4} {r['H']:>3} "
              f"{r['impl']:<16} {fmt(r['fwd_tflops'], '9.1f')} {fmt(r['bwd_tflops'], '9.1f')} "
              f"{fmt(r['fwd+bwd_tflops'], '9.1f')} {fmt(r['fwd_vs_flash'], '9.2f')} "
              f"{fmt(r['bwd_vs_flash'], '9.2f')} {fmt(r['fwd+bwd_vs_flash'], '9.2f')}"
              + (f"  {r['error']}" if r["error"] else ""))
    if var_rows:
        v0 = var_rows[0]
        print(f"\npacked documents: {v0['B']} rows of {v0['T']} tokens, {v0['docs_per_row']} documents per "
              f"row, H={v0['H']} D={v0['D']} causal")
        print(f"{'impl':<20} {'fwd Mtok/s':>11} {'f+b Mtok/s':>11} {'fwd/dense':>10} {'f+b/dense':>10} "
              f"{'useful TF/s':>12}")
        for r in var_rows:
            mt = lambda x: x / 1e6 if x else None  # noqa: E731
            print(f"{r['impl']:<20} {fmt(mt(r['fwd_tokens_per_s']), '11.2f')} "
                  f"{fmt(mt(r['fwd+bwd_tokens_per_s']), '11.2f')} {fmt(r['fwd_vs_dense'], '10.2f')} "
                  f"{fmt(r['fwd+bwd_vs_dense'], '10.2f')} {fmt(r['useful_fwd_tflops'], '12.1f')}"
                  + (f"  {r['error']}" if r["error"] else ""))

    # targets of issue 5: (what, value, bound)
    at = lambda impl: next((r for r in rows if r["impl"] == impl and r["Dqk"] == r["Dv"] == 128  # noqa: E731
                            and r["causal"] and r["T"] == 8192), None)
    tri = at("triton")
    var = next((r for r in var_rows if r["impl"] == "triton-varlen"), None)
    targets = [("forward / SDPA-flash", tri and tri["fwd_vs_flash"], 1.1),
               ("forward TFLOP/s", tri and tri["fwd_tflops"], 450),
               ("backward / SDPA-flash", tri and tri["bwd_vs_flash"], 1.0),
               ("backward TFLOP/s", tri and tri["bwd_tflops"], 300),
               ("varlen fwd+bwd tokens/s / dense causal", var and var["fwd+bwd_vs_dense"], 1.8)]
    target_rows = []
    on_target = hopper_peak(name) is not None and dtype == torch.bfloat16
    peak_note = f"dense bf16 peak {hopper_peak(name) / 1e12:.0f} TFLOP/s" if on_target else "not a target GPU"
    print(f"\ntargets ({HOPPER}, bf16, hd 128, causal, seq 8k; varlen: 8 docs per 8k row; {peak_note}):")
    for what, value, bound in targets:
        status = ("not the target's setting" if not on_target else "unmeasured" if value is None
                  else "met" if value >= bound else "missed")
        target_rows.append({"target": f"{what} >= {bound}", "value": value, "bound": bound, "status": status})
        print(f"  {what + f' >= {bound}':<46} {fmt(value, '8.2f')}  {status}")
    if check_rows:
        print(f"correctness: {sum(c['ok'] for c in check_rows)}/{len(check_rows)} checks pass "
              f"(determinism included), {sum(c['deterministic'] for c in check_rows)}/{len(check_rows)} "
              "deterministic")

    triton = getattr(kernels, "triton", None)
    result = {
        "command": " ".join(["python"] + sys.argv), "device": name,
        "torch": torch.__version__, "triton": triton.__version__ if triton else None,
        "cuda": torch.version.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dtype": str(dtype), "peak_bf16_flops": hopper_peak(name), "tokens": args.tokens, "hidden": args.hidden,
        "matmul_ceiling_tflops": ceiling,
        "rows": rows, "varlen": var_rows, "targets": target_rows, "checks": check_rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    if not all(c["ok"] for c in check_rows):
        sys.exit("correctness check failed (see 'check' lines above)")


if __name__ == "__main__":
    main()
