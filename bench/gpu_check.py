"""The one GPU check: correctness and speed of everything GPU-specific, each figure beside a baseline
measured in the same run, in about 6 minutes on one H100 / H200.

    python bench/gpu_check.py                       # CUDA: every section -> table, bench/results/gpu_check.json
    python bench/gpu_check.py --only attn_correct loss   # some sections, replacing theirs in the file
    python bench/gpu_check.py --smoke               # CPU, tiny shapes, Triton interpreted: every section runs

Kernel configs are pinned (NANO_PIN_CONFIGS=1, set before kernels.py is imported): autotuning every config
takes longer than the whole run. Sections (each writes its own JSON block; other issues add theirs to
SECTIONS):
  attn_correct  flash attention forward and backward in bf16, fp16 (and fp32: tf32x3 dots) against fp32
                (fp64 for fp32): dense, GQA, varlen,
                Dqk 192 / Dv 128, and one MLA-shaped varlen batch of 135,168 tokens x 128 heads, whose
                offsets pass 2^31 elements (its first and last documents are checked). Rule, for the output
                and every gradient: max|out - ref| <= 2 * max|torch same dtype - ref| + eps * max|ref|.
  attn_speed    TFLOP/s, causal hd 128, seq 8k, forward and backward, against SDPA flash and cuDNN; packed
                documents (8 per 8k row) against the dense causal kernel in useful tokens/s.
  loss          fused linear + cross-entropy: correctness (bf16, fp16 with a GradScaler's 2^16), then peak
                memory and time of loss + backward against eager and torch.compile at N 16k, D 2048, V 128256.
  train         the 124m training step on real packed batches (PackedLoader, the Python stdlib corpus):
                tok/s and document-aware MFU, nano compiled and eager and a plain-PyTorch baseline doing the
                same masked work, all in this run; one eager step under torch.cuda.set_sync_debug_mode("error").
  decode        batch-1 greedy decode of the llama3.2-1b-shaped preset (random weights) against the memory
                bandwidth bound (weights + KV cache per token over a measured device-to-device copy rate).
  spec_verify   the cost of one target forward over k + 1 tokens (verifying k drafts), k = 1..8, relative to
                one decode step, same model and cache.
Targets (issue 14): flash forward >= 1.1x SDPA-flash, backward >= 1.0x; packed >= 1.8x dense useful tok/s;
fused CE peak memory <= 0.2x eager and time <= 1.1x compile at V 128256; 124m MFU >= 45%; compiled training
>= 1.15x eager (issue 13); 1B decode >= 60% of the bandwidth bound. The table ends with where each stands;
a failed correctness check or a section that raised exits non-zero.
"""
import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = {}


def bench(name):
    """bench/NAME.py as a module (imported by path: bench/train.py would otherwise meet the root's train.py)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "bench", f"{name}.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


def figure(name, value, baseline=None, base_value=None, target=None, better="higher", unit=""):
    """One line of the table: a value, optionally its same-run baseline (ratio = value / baseline) and a
    target on the ratio (or on the value when there is no baseline)."""
    ratio = value / base_value if value is not None and base_value else None
    judged = ratio if baseline else value
    status = None
    if target is not None:
        met = judged is not None and (judged >= target if better == "higher" else judged <= target)
        status = "unmeasured" if judged is None else "met" if met else "missed"
    return {"figure": name, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
            "ratio": ratio,
            "target": None if target is None else f"{'>=' if better == 'higher' else '<='} {target}",
            "status": status}


# -----------------------------------------------------------------------------
# sections: each takes the run's settings and returns {"figures": [...], ...}; "ok": False fails the run

@section
def attn_correct(run):
    bench_attention = bench("attention")
    kernels = run.kernels
    if run.smoke:
        cases = {torch.float32: [(1, 17, 2, 1, 64, 64, True, 0), (1, 40, 4, 4, 192, 128, True, 3)]}
        big = dict(n_docs=2, doc_len=24, H=2)
    else:  # (B, T, Hq, Hkv, Dqk, Dv, causal, documents per row (0: dense))
        cases = {torch.bfloat16: [(2, 17, 8, 2, 64, 64, True, 0), (1, 1000, 8, 8, 128, 128, True, 0),
                                  (1, 1000, 4, 2, 128, 128, False, 0), (2, 1000, 8, 8, 192, 128, True, 0),
                                  (2, 2048, 8, 4, 128, 128, True, 5)],
                 torch.float16: [(2, 1000, 8, 2, 128, 128, True, 0), (2, 2048, 8, 8, 192, 128, True, 5)],
                 torch.float32: [(1, 1000, 4, 2, 128, 128, True, 0)]}  # "tf32x3" dots
        big = dict(n_docs=66, doc_len=2048, H=128)  # 135,168 tokens: q's offsets pass 2^31 at token 87,382
    rows = []
    for dtype, cs in cases.items():
        rows += bench_attention.check(kernels, run.device, cs, dtype)
    for dtype in [torch.float32] if run.smoke else [torch.bfloat16]:
        rows.append(big_varlen_check(kernels, run.device, dtype, **big))
    ok = all(r["ok"] for r in rows)
    return {"ok": ok, "checks": rows,
            "figures": [figure("flash attention checks passed", sum(r["ok"] for r in rows), "checks", len(rows),
                               target=1.0)]}


def big_varlen_check(kernels, device, dtype, n_docs, doc_len, H, dqk=192, dv=128):
    """The long packed MLA batch: the kernel on all of it, the references on its first and last documents
    alone (attention and its gradients never cross a document)."""
    total = n_docs * doc_len
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(total, H, d, device=device, generator=g).to(dtype) for d in (dqk, dqk, dv))
    do = torch.randn(total, H, dv, device=device, generator=g).to(dtype)
    cu = torch.arange(0, total + 1, doc_len, device=device, dtype=torch.int32)
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = kernels.flash_attention(*xs, cu_seqlens=cu, max_seqlen=doc_len)
    ours = [out.detach(), *torch.autograd.grad(out, xs, do)]
    del out, xs
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    eps = max(torch.finfo(dtype).eps, 1e-5)
    row = {"B": 1, "T": total, "Hq": H, "Hkv": H, "Dqk": dqk, "Dv": dv, "causal": True, "docs": n_docs,
           "dtype": str(dtype).replace("torch.", ""), "checked_docs": [0, n_docs - 1], "ok": True}
    for d in (0, n_docs - 1):
        sl = slice(d * doc_len, (d + 1) * doc_len)
        one = lambda x, dt: x[sl][None].to(dt)  # noqa: E731 - one document as a dense (1, L, H, D) batch
        same = attention_grads(kernels, *(one(x, dtype) for x in (q, k, v, do)))
        ref = attention_grads(kernels, *(one(x, hi) for x in (q, k, v, do)))
        for name, a, s, r in zip(("out", "dq", "dk", "dv"), ours, same, ref):
            a = a[sl][None].to(hi)
            err, err_torch = (a - r).abs().max().item(), (s.to(hi) - r).abs().max().item()
            good = err <= 2 * err_torch + eps * r.abs().max().item()
            row[f"{name}_doc{d}"] = {"err": err, "err_torch": err_torch, "ok": good}
            row["ok"] &= good
        del same, ref
    print(f"check {row['dtype']:>8} packed MLA T={total} H={H} D={dqk}/{dv}: "
          f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
    return row


def attention_grads(kernels, q, k, v, do):
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = kernels.attention_reference(*xs, causal=True)
    return [out.detach(), *torch.autograd.grad(out, xs, do)]


@section
def attn_speed(run):
    bench_attention = bench("attention")
    kernels = run.kernels
    if run.smoke:
        B, T, H, d, reps, var = 1, 64, 2, 64, 1, (64, 3)
    else:
        B, T, H, d, reps, var = 2, 8192, 16, 128, 50, (8192, 8)
    impls = [("triton", lambda q, k, v, causal: kernels.flash_attention(q, k, v, causal=causal))]
    impls += bench_attention.baselines(run.device)
    rows = bench_attention.run_case(kernels, impls, B, T, H, d, d, True, run.dtype, run.device, reps)
    var_rows = bench_attention.run_varlen(kernels, B, var[0], H, d, var[1], run.dtype, run.device, reps,
                                          flex=False)
    at = lambda impl: next((r for r in rows if r["impl"] == impl), {})  # noqa: E731
    tri = at("triton")
    flash = at("sdpa-flash") or at("sdpa-math")  # smoke: the math backend stands in
    cudnn = at("sdpa-cudnn")
    var_tri = var_rows[1]
    figs = []
    for mode, bound in (("fwd", 1.1), ("bwd", 1.0)):
        figs.append(figure(f"flash {mode} TFLOP/s (hd{d} causal {T})", tri.get(f"{mode}_tflops"),
                           flash.get("impl"), flash.get(f"{mode}_tflops"), target=bound, unit="TFLOP/s"))
        if cudnn:
            figs.append(figure(f"flash {mode} TFLOP/s vs cuDNN", tri.get(f"{mode}_tflops"), "sdpa-cudnn",
                               cudnn.get(f"{mode}_tflops"), unit="TFLOP/s"))
    dense = var_rows[0]
    figs.append(figure(f"packed f+b tok/s ({var[1]} docs per {var[0]} row)",
                       var_tri.get("fwd+bwd_tokens_per_s"), "dense causal", dense.get("fwd+bwd_tokens_per_s"),
                       target=1.8, unit="tok/s"))
    return {"rows": rows, "varlen": var_rows, "figures": figs}


@section
def loss(run):
    bench_loss = bench("loss")
    kernels = run.kernels
    if run.smoke:
        shapes = [(37, 24, 333, None, None), (64, 16, 500, 0.5, 64 * 128 * 4)]
        (N, D, V), backend = (64, 32, 300), "eager"
        dtypes = [torch.float32]
    else:  # (N, D, V, softmax_scale, chunk bytes or None)
        shapes, (N, D, V), backend = [(4097, 512, 50257, None, None), (1000, 256, 32000, 0.5, 1 << 22)], \
            (16384, 2048, 128256), "inductor"
        dtypes = [torch.bfloat16, torch.float16]
    checks = bench_loss.check(kernels, run.device, shapes, dtypes)
    rows, g_ms = bench_loss.bench_shape(kernels, N, D, V, run.dtype, run.device,
                                        SimpleNamespace(iters=1 if run.smoke else 5,
                                                        warmup=1 if run.smoke else 2), backend, [])
    fused = next(r for r in rows if r["variant"] == "fused")
    eager = next(r for r in rows if r["variant"] == "eager")
    comp = next(r for r in rows if r["variant"] == "compile")
    figs = [figure("linear CE checks passed", sum(c["ok"] for c in checks), "checks", len(checks), target=1.0),
            figure(f"fused CE peak GiB (V {V})", fused["peak_gib"], "eager", eager["peak_gib"], 0.2, "lower",
                   "GiB"),
            figure(f"fused CE ms (V {V})", fused["ms"], "compile", comp["ms"], 1.1, "lower", "ms"),
            figure(f"fused CE ms (V {V}) vs eager", fused["ms"], "eager", eager["ms"], unit="ms")]
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "rows": rows, "gemm_ms": g_ms,
            "figures": figs}


@section
def train(run):
    bench_train = bench("train")
    from nano.runtime import autocast
    if run.smoke:
        name, B, T, iters, warmup, backend = "tiny", 2, 64, 1, 1, "eager"
        data, vocab = os.path.join(ROOT, "nano"), 300
    else:
        name, B, T, iters, warmup, backend = "124m", 8, 2048, 10, 3, "inductor"
        data, vocab = "", 8192
    batches = bench_train.load_batches(data, vocab, B, T, warmup + iters + 1)
    args = SimpleNamespace(iters=iters, warmup=warmup)
    rows = [bench_train.run(name, "none", "baseline", batches, args, run.device, run.dtype),
            bench_train.run(name, "none", "nano", batches, args, run.device, run.dtype),
            bench_train.run(name, "none", "nano", batches, args, run.device, run.dtype, True, backend)]
    bench_train.add_ratios(rows)
    for r in rows:
        bench_train.show(r)
    sync_free = None
    if run.device.type == "cuda":  # issue 13: no host sync in forward, backward and optimizer step
        from nano.config import preset
        from nano.model import Transformer
        model = Transformer(preset(name)).to(run.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x, y, cu = (t.to(run.device) for t in batches[-1])  # before the sync check: copies from the host
        def step():
            with autocast(run.device, run.dtype):
                model(x, y, cu_seqlens=cu)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # the first step allocates the optimizer state and loads the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync now raises
        try:
            step()
            sync_free = True
        except RuntimeError as e:
            sync_free = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del model, opt
        torch.cuda.empty_cache()
    eager, comp, base = rows[1], rows[2], rows[0]
    figs = [figure(f"{name} nano compiled MFU", comp["mfu"], target=0.45, unit="MFU"),
            figure(f"{name} nano compiled tok/s", comp["tok_per_s"], "nano eager", eager["tok_per_s"], 1.15,
                   unit="tok/s"),
            figure(f"{name} nano eager tok/s", eager["tok_per_s"], "plain PyTorch, same masks",
                   base["tok_per_s"], unit="tok/s")]
    return {"ok": sync_free in (None, True), "rows": rows, "sync_free_step": sync_free,
            "batch_size": B, "seq_len": T, "figures": figs}


def decode_model(run):
    bench_decode = bench("decode")
    from nano.config import preset
    name = "tiny" if run.smoke else "llama3.2-1b"
    if getattr(run, "_decode", None) is None:  # decode and spec_verify share the model
        run._decode = name, bench_decode.build(preset(name), run.device, run.dtype)
    return run._decode


@section
def decode(run):
    bench_decode = bench("decode")
    name, model = decode_model(run)
    prompt_len, n_new = (16, 8) if run.smoke else (128, 256)
    bandwidth = bench_decode.copy_bandwidth(run.device, (1 << 24) if run.smoke else (1 << 30))
    elt = torch.empty((), dtype=run.dtype).element_size()
    ctx = prompt_len + (n_new + 1) / 2  # mean valid cache length over the decode
    kv = bench_decode.kv_bytes_per_token(model.config, elt)
    nbytes = bench_decode.weight_bytes_per_token(model) + ctx * kv
    bound = bandwidth / nbytes
    rows, figs = [], []
    for mode in ["eager"] if run.smoke else ["eager", "cudagraphs"]:
        try:
            tok_s = bench_decode.plain_decode(model, mode, prompt_len, n_new, run.device)[0]
            err = None
        except Exception as e:  # a compile failure must not hide the other figures; it is recorded
            tok_s, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append({"preset": name, "mode": mode, "tok_s": tok_s, "bound_tok_s": bound, "error": err})
        figs.append(figure(f"{name} decode tok/s, batch 1, {mode}", tok_s, "bandwidth bound", bound,
                           0.6 if mode != "eager" else None, unit="tok/s"))
    return {"rows": rows, "bandwidth_bytes_per_s": bandwidth, "bytes_per_token": nbytes, "figures": figs}


@section
def spec_verify(run):
    bench_decode = bench("decode")
    name, model = decode_model(run)
    prompt_len, reps = (16, 2) if run.smoke else (128, 20)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt_len + 9), generator=g).to(run.device)
    model.setup_cache(1, prompt_len + 9)
    try:
        with torch.no_grad():
            model(tokens[:, :prompt_len], prefill=True)
            pos = torch.full((1,), prompt_len, device=run.device)

            def forward_ms(n):  # a forward over n tokens at the same cache position, rewriting the same slots
                times = []
                for _ in range(reps + 2):
                    bench_decode.sync(run.device)
                    t0 = time.perf_counter()
                    model(tokens[:, prompt_len:prompt_len + n], start_pos=pos)
                    bench_decode.sync(run.device)
                    times.append(time.perf_counter() - t0)
                return 1e3 * sorted(times[2:])[len(times[2:]) // 2]
            one = forward_ms(1)
            rows = [{"k": k, "ms": forward_ms(k + 1), "decode_step_ms": one} for k in range(1, 9)]
    finally:
        model.clear_cache()
    figs = [figure(f"verify k={r['k']} ms (eager)", r["ms"], "one decode step", one, unit="ms") for r in rows]
    return {"preset": name, "rows": rows, "figures": figs}


# -----------------------------------------------------------------------------

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections only")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreted; writes no file")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_check.json"))
    args = p.parse_args()
    # before kernels.py is imported: one pinned config per kernel, no autotuning
    os.environ["NANO_PIN_CONFIGS"] = "1"
    os.environ.pop("NANO_FORCE_REFERENCE", None)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # tiny tensors: a second thread only adds wake-up latency
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_check.py needs a CUDA GPU (or --smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    import kernels  # noqa: E402 - after the environment above
    run = SimpleNamespace(kernels=kernels, device=device, dtype=dtype, smoke=args.smoke)
    results, failed = {}, []
    t_start = time.perf_counter()
    for name in args.only or list(SECTIONS):
        print(f"--- {name}", flush=True)
        t0 = time.perf_counter()
        try:
            block = SECTIONS[name](run)
        except Exception as e:  # one broken section must not hide the others' figures
            traceback.print_exc()
            block = {"error": f"{type(e).__name__}: {e}"[:2000], "figures": []}
        block["seconds"] = round(time.perf_counter() - t0, 1)
        block["date"] = datetime.datetime.now().isoformat(timespec="seconds")  # --only merges into older runs
        if "error" in block or block.get("ok") is False:
            failed.append(name)
        results[name] = block
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreted)"
    print(f"\ngpu_check on {dev_name}, {str(dtype).replace('torch.', '')}, pinned kernel configs, "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"{'section':<12} {'figure':<46} {'value':>11} {'baseline':<26} {'base value':>11} {'ratio':>6} "
          f"{'target':>8}  status")
    for name, block in results.items():
        for f in block["figures"] if args.smoke else []:
            f["status"] = f["status"] and "(smoke)"
        if "error" in block:
            print(f"{name:<12} ERROR: {block['error'].splitlines()[0][:90]}")
        for f in block["figures"]:
            base = (f["baseline"] or "")[:26]
            print(f"{name:<12} {f['figure'][:46]:<46} {fmt(f['value'], '11.4g')} {base:<26} "
                  f"{fmt(f['baseline_value'], '11.4g')} {fmt(f['ratio'], '6.2f')} {f['target'] or '':>8}  "
                  f"{f['status'] or ''}")
    result = {"command": " ".join(["python"] + sys.argv), "device": dev_name, "torch": torch.__version__,
              "triton": kernels.triton.__version__ if kernels.triton else None, "cuda": torch.version.cuda,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": str(dtype),
              "pinned_configs": True, "sections": results}
    if not args.smoke:
        if args.only and os.path.exists(args.out):  # keep the other sections of an earlier run
            with open(args.out) as f:
                result["sections"] = {**json.load(f).get("sections", {}), **results}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    if failed:  # (the smoke run judges no target: its figures measure nothing)
        sys.exit(f"failed: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    main()
