"""Decoding speed: plain KV-cache decode against the memory-bandwidth bound, and speculative decoding
(draft model and MTP) against plain decoding, all in one run.

    python bench/decode.py                                   # CUDA bf16: presets 124m, 350m, llama3.2-1b
                                                             # (random weights), -> bench/results/decode.json
    python bench/decode.py --ckpt out --draft out-draft      # + speculative speedup of a trained pair on
                                        [--mtp-ckpt out-mtp] #   prompts from the held-out split
    python bench/decode.py --smoke                           # CPU, tiny random models: checks the script runs
    python bench/decode.py --acceptance --ckpt out --draft out-draft [--mtp-ckpt out-mtp]   # CPU: trees
                                                             # against chains, tokens per target forward

Plain decode: batch 1, a static KV cache (allocated once), greedy, one token per forward, eager, under
torch.compile, and under torch.compile with CUDA graphs ("reduce-overhead": at batch 1 a 124M model
needs ~0.1 ms per token from memory, less than the launch time of its ~200 kernels, so only a
graph-captured step can approach the bound). The bound: every weight is read once per token (the
embedding table only through the LM head when tied; an untied table costs one row) plus the valid KV
cache entries, over the device-to-device copy bandwidth measured in the same run (read + write bytes
of a 1 GiB copy / time).

Speculative: speculative_generate at temperature 0 against generate at temperature 0, same model, same
prompts, same execution mode (eager, or each model's forward / hidden_states / mtp_draft under
torch.compile): the ratio of times is the speedup. The greedy outputs are compared token for token; in
bf16 a verify forward over k + 1 tokens rounds differently from a one-token forward, so a near-tie can
resolve differently (reported as "identical").

Acceptance (--acceptance; any device, CPU is fine): tree speculation against the chain, as mean tokens per
target forward at temperature 0 (and at --temperature), for each --trees entry against the chain of the
same depth and the chain of the same verification width (its number of nodes; not for MTP, whose chain
is at most mtp_depth long). Target of issue 18: a tree >= 1.3x the chain's tokens per target forward.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402
from nano.config import preset  # noqa: E402
from nano.generate import generate, speculative_generate  # noqa: E402
from nano.model import Transformer  # noqa: E402

# Targets of issue 7 (H100, bf16)
PLAIN_TARGET = 0.60  # plain decode tokens/s >= 60% of the bandwidth bound, presets 124M..1B
SPEC_TARGET = 2.0  # speculative >= 2.0x plain at temperature 0 with the trained pair
TREE_TARGET = 1.3  # issue 18: tree tokens per target forward >= 1.3x the chain's


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes, iters=20):
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def kv_bytes_per_token(cfg, elt):
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attn == "mla" else 2 * cfg.n_kv_head * cfg.head_dim
    return cfg.n_layer * per_layer * elt


def weight_bytes_per_token(model):
    """Bytes of the weights one decode step reads: all main-model parameters, MTP modules excluded (plain
    decoding never runs them), an untied embedding table counted as one row."""
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        if name == "tok_embeddings.weight" and not model.config.tie_embeddings:
            n += p[0].numel() * p.element_size()
        else:
            n += p.numel() * p.element_size()
    return n


def build(cfg, device, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1B model's init on the CPU takes a while
        model = Transformer(cfg)
    return model.to(dtype).eval()


# -----------------------------------------------------------------------------
# plain decode against the bandwidth bound

def decode_step(model):
    def step(token, pos):
        logits = model(token, start_pos=pos)[0][:, -1]
        return logits.argmax(-1, keepdim=True)
    return step


def plain_decode(model, mode, prompt_len, n_tokens, device):
    """tokens/s of a greedy one-token-per-forward loop at batch 1 over a static cache, and its tokens."""
    step = decode_step(model)
    if mode == "compile":
        step = torch.compile(step, mode="max-autotune-no-cudagraphs", fullgraph=True)
    elif mode == "cudagraphs":
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    model.setup_cache(1, prompt_len + n_tokens)
    try:
        def run(n):
            with torch.no_grad():
                model(prompt, prefill=True)  # prefill (eager: not what is timed)
                token = prompt[:, -1:]
                pos = torch.full((1,), prompt_len - 1, device=device)
                out = []
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    if mode == "cudagraphs":
                        torch.compiler.cudagraph_mark_step_begin()
                    token = step(token, pos).clone()  # clone: a graph's output is overwritten by its next replay
                    pos += 1
                    out.append(token)
                sync(device)
                return time.perf_counter() - t0, torch.cat(out, dim=1)
        run(min(n_tokens, 8))  # compile / capture, warm up
        dt, tokens = run(n_tokens)
    finally:
        model.clear_cache()
    return n_tokens / dt, tokens, prompt


def bench_plain(args, device, dtype, bandwidth):
    rows = []
    for name in args.presets.split(","):
        cfg = preset(name)
        model = build(cfg, device, dtype)
        elt = torch.empty((), dtype=dtype).element_size()
        ctx = args.prompt_len + (args.new_tokens + 1) / 2  # mean valid cache length over the decode
        nbytes = weight_bytes_per_token(model) + ctx * kv_bytes_per_token(cfg, elt)
        bound = bandwidth / nbytes
        ref = None
        for mode in args.modes.split(","):
            row = {"preset": name, "mode": mode, "params": model.num_params(), "bytes_per_token": nbytes,
                   "bound_tok_s": bound}
            try:
                tok_s, tokens, prompt = plain_decode(model, mode, args.prompt_len, args.new_tokens, device)
            except Exception as e:  # a compile failure must not hide the other figures; it is recorded
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"{name:>12} {mode:>10}  failed: {row['error']}")
                rows.append(row)
                continue
            if ref is None:  # generate()'s greedy tokens: the loop decodes the same sequence
                ref = generate(model, prompt, args.new_tokens + 1, temperature=0,
                               compile=False)[:, args.prompt_len + 1:]
            same = (tokens == ref).float().mean().item()
            row.update(tok_s=tok_s, fraction_of_bound=tok_s / bound, ms_per_token=1e3 / tok_s,
                       tokens_equal_generate=same)
            rows.append(row)
            print(f"{name:>12} {mode:>10}  {tok_s:>9,.0f} tok/s  {1e3 / tok_s:7.3f} ms/tok  bound "
                  f"{bound:>9,.0f} tok/s  {tok_s / bound:6.1%}  same tokens as generate {same:.0%}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -----------------------------------------------------------------------------
# speculative against plain, same model, prompts and mode

def compiled(model):
    """The model with forward / hidden_states / mtp_draft compiled (the entry points generate and
    speculative_generate call), or unchanged when it is None or a string."""
    if not isinstance(model, torch.nn.Module):
        return model
    for name in ("forward", "hidden_states", "mtp_draft"):
        if hasattr(model, name):
            setattr(model, name, torch.compile(getattr(model, name)))
    return model


def uncompiled(model):
    if isinstance(model, torch.nn.Module):
        for name in ("forward", "hidden_states", "mtp_draft"):
            model.__dict__.pop(name, None)
    return model


def bench_spec(label, model, draft, prompts, args, device, mode):
    k = args.k
    if mode == "compile":
        compiled(model), compiled(draft)
    try:
        for prompt in prompts[:1]:  # warm up / compile every shape once
            generate(model, prompt, args.new_tokens, temperature=0, compile=False)
            speculative_generate(model, prompt, args.new_tokens, draft=draft, k=k, temperature=0,
                                 compile=False)
        t_plain = t_spec = 0.0
        same, acc, tps, n_fwd = [], [], [], 0
        for prompt in prompts:
            sync(device)
            t0 = time.perf_counter()
            want = generate(model, prompt, args.new_tokens, temperature=0, compile=False)
            sync(device)
            t1 = time.perf_counter()
            got, stats = speculative_generate(model, prompt, args.new_tokens, draft=draft, k=k, temperature=0,
                                 compile=False)
            sync(device)
            t_plain, t_spec = t_plain + t1 - t0, t_spec + time.perf_counter() - t1
            same.append(torch.equal(got, want))
            acc.append(stats["acceptance_rate"])
            tps.append(stats["tokens_per_step"])
            n_fwd += stats["target_forwards"]
    finally:
        uncompiled(model), uncompiled(draft)
    n = len(prompts) * args.new_tokens
    row = {"label": label, "mode": mode, "k": k, "prompts": len(prompts), "new_tokens": args.new_tokens,
           "plain_tok_s": n / t_plain, "spec_tok_s": n / t_spec, "speedup": t_plain / t_spec,
           "acceptance_rate": sum(acc) / len(acc), "tokens_per_step": sum(tps) / len(tps),
           "target_forwards": n_fwd, "identical": sum(same) / len(same)}
    print(f"{label:>28} {mode:>8}  plain {row['plain_tok_s']:>8,.0f} tok/s  speculative {row['spec_tok_s']:>8,.0f} "
          f"tok/s  {row['speedup']:5.2f}x  accept {row['acceptance_rate']:.1%}  {row['tokens_per_step']:.2f} "
          f"tok/fwd  identical {row['identical']:.0%}")
    return row


def chains_for(tree, mtp_depth):
    """The chains a tree is compared with: same depth, and same verification width (number of nodes)."""
    nodes = sum(math.prod(tree[:d]) for d in range(1, len(tree) + 1))
    out = {"same depth": (1,) * len(tree)}
    if not mtp_depth and nodes > len(tree):
        out["same width"] = (1,) * nodes
    return out


def bench_acceptance(label, model, draft, prompts, args):
    """Tokens per target forward of each tree and of its chains, greedy and sampled (eager)."""
    rows = []
    mtp_depth = model.config.mtp_depth if draft == "mtp" else 0
    for spec in args.trees.split(";"):
        tree = tuple(int(b) for b in spec.split(","))[:mtp_depth or None]
        for temperature in (0.0, args.temperature):
            def tps(t):
                stats = [speculative_generate(model, p, args.new_tokens, draft=draft, tree=t, temperature=temperature,
                                              seed=i, compile=False)[1] for i, p in enumerate(prompts)]
                per_depth = [sum(s["accepted_at"][d] for s in stats) / len(stats) for d in range(len(t))]
                return sum(s["tokens_per_step"] for s in stats) / len(stats), per_depth
            got, depth_acc = tps(tree)
            row = {"label": label, "tree": tree, "temperature": temperature, "tokens_per_step": got,
                   "accepted_at": depth_acc}
            line = f"{label:>20} T={temperature:<4} tree {','.join(map(str, tree)):<10} {got:5.2f} tok/fwd"
            for name, chain in chains_for(tree, mtp_depth).items():
                ref = tps(chain)[0]
                row[f"chain_{name.replace(' ', '_')}"] = ref
                row[f"ratio_{name.replace(' ', '_')}"] = got / ref
                line += f"  chain ({name}, {len(chain)}) {ref:5.2f}: {got / ref:4.2f}x"
            rows.append(row)
            print(line)
    return rows


def load_pair(args, device, dtype):
    """(target, draft, mtp_model, prompts, weights) from checkpoints, or random stand-ins without them."""
    from nano.checkpoint import load_checkpoint, model_from_checkpoint
    if not args.ckpt:
        cfg = preset("tiny") if args.smoke else preset("124m")
        target = build(cfg, device, dtype)
        draft = build(preset("draft", vocab_size=cfg.vocab_size), device, dtype, seed=1)
        mtp = build(preset("deepseek-tiny", vocab_size=cfg.vocab_size), device, dtype, seed=2)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
                   for _ in range(args.n_prompts)]
        return target, draft, mtp, prompts, "random"
    from nano.data import prepare_data
    from nano.tokenizer import Tokenizer
    state = load_checkpoint(args.ckpt)
    target = model_from_checkpoint(state, device).to(dtype).eval()
    draft = None
    if args.draft:
        dstate = load_checkpoint(args.draft)
        if dstate["tokenizer"] != state["tokenizer"]:
            raise ValueError(f"{args.draft} was trained with another tokenizer than {args.ckpt}")
        draft = model_from_checkpoint(dstate, device).to(dtype).eval()
    mtp = target if target.config.mtp_depth else None
    if args.mtp_ckpt:
        mstate = load_checkpoint(args.mtp_ckpt)
        mtp = model_from_checkpoint(mstate, device).to(dtype).eval()
    # prompts: the first prompt_len tokens of held-out documents long enough for them
    tc = state["train_config"]
    data = prepare_data(tc["data"], tc["tokenizer"], state["model_config"]["vocab_size"], progress=False)
    if data.tokenizer.state() != Tokenizer.from_state(state["tokenizer"]).state():
        raise ValueError("the prepared data's tokenizer differs from the checkpoint's")
    prompts = []
    for i in range(data.val.n_docs):
        doc = data.val.document(i)
        if len(doc) >= args.prompt_len + args.new_tokens:
            prompts.append(torch.tensor(doc[:args.prompt_len].astype("int64"), device=device)[None])
        if len(prompts) == args.n_prompts:
            break
    if not prompts:
        raise ValueError(f"no held-out document has {args.prompt_len + args.new_tokens} tokens; lower --prompt-len")
    return target, draft, mtp, prompts, "trained"


# -----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="124m,350m,llama3.2-1b", help="random-weight presets for plain decode")
    p.add_argument("--modes", default="eager,compile,cudagraphs", help="plain decode execution modes")
    p.add_argument("--spec-modes", default="eager,compile", help="speculative comparison execution modes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="draft tokens per step (MTP: at most mtp_depth)")
    p.add_argument("--ckpt", help="trained target run directory (its held-out split gives the prompts)")
    p.add_argument("--draft", help="trained draft run directory (same tokenizer)")
    p.add_argument("--mtp-ckpt", help="a run trained with --mtp-depth >= 1 (default: --ckpt when it has MTP)")
    p.add_argument("--acceptance", action="store_true",
                   help="only trees against chains (tokens per target forward), on any device, CPU included")
    p.add_argument("--trees", default="3,2,1,1;2,2,2;4,2", help="';'-separated trees for --acceptance")
    p.add_argument("--temperature", type=float, default=1.0, help="the sampled setting of --acceptance")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: checks the script, measures nothing useful")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/decode.json; none with --smoke)")
    args = p.parse_args()
    if args.acceptance:
        return main_acceptance(args)
    if args.smoke:
        args.presets, args.modes, args.spec_modes = "tiny", "eager", "eager"
        args.prompt_len, args.new_tokens, args.n_prompts = 16, 12, 2
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/decode.py needs a CUDA GPU (or --smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.out = args.out or os.path.join(ROOT, "bench", "results", "decode.json")
    torch._dynamo.config.cache_size_limit = 64  # one graph per input shape: prefill, verify, draft steps

    bandwidth = copy_bandwidth(device, (64 if args.smoke else 1024) << 20)
    print(f"device copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (read + write)")
    plain = bench_plain(args, device, dtype, bandwidth)

    target, draft, mtp, prompts, weights = load_pair(args, device, dtype)
    spec = []
    for mode in args.spec_modes.split(","):
        for label, model, d in ((f"draft model ({weights})", target, draft), (f"mtp ({weights})", mtp, "mtp")):
            if model is None or d is None:
                continue
            try:
                spec.append(bench_spec(label, model, d, prompts, args, device, mode))
            except Exception as e:  # recorded, so one failing mode does not lose the rest of the run
                spec.append({"label": label, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"{label:>28} {mode:>8}  failed: {spec[-1]['error']}")

    # targets: where each stands
    print("\ntargets (issue 7, H100):")
    targets = []
    for name in args.presets.split(","):
        ok_rows = [r for r in plain if r["preset"] == name and "tok_s" in r]
        best = max(ok_rows, key=lambda r: r["tok_s"], default=None)
        frac = best["fraction_of_bound"] if best else None
        status = "not run" if best is None else ("met" if frac >= PLAIN_TARGET else "not met")
        targets.append({"target": f"plain decode >= {PLAIN_TARGET:.0%} of bandwidth bound, {name}",
                        "value": frac, "mode": best and best["mode"], "status": status})
    for label in ("draft model", "mtp"):
        ok_rows = [r for r in spec if r["label"].startswith(label) and "speedup" in r]
        best = max(ok_rows, key=lambda r: r["speedup"], default=None)
        if weights != "trained" or best is None:
            status = "not run: needs --ckpt and --draft (trained pair)" if label == "draft model" else \
                "not run: needs a trained model with MTP (--ckpt or --mtp-ckpt)"
            if best is not None:
                status += f" (random weights gave {best['speedup']:.2f}x)"
        else:
            status = "met" if best["speedup"] >= SPEC_TARGET else "not met"
        targets.append({"target": f"speculative ({label}) >= {SPEC_TARGET}x plain at temperature 0",
                        "value": best and best["speedup"], "mode": best and best["mode"], "status": status})
    for t in targets:
        v = "-" if t["value"] is None else (f"{t['value']:.1%}" if "bound" in t["target"] else f"{t['value']:.2f}x")
        print(f"  {t['target']:<62} {v:>8}  {t['status']}")

    result = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": getattr(getattr(kernels, "triton", None), "__version__", None),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).removeprefix("torch."), "batch_size": 1, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "copy_bandwidth_bytes_per_s": bandwidth, "weights": weights,
        "ckpt": args.ckpt, "draft": args.draft, "mtp_ckpt": args.mtp_ckpt,
        "plain": plain, "speculative": spec, "targets": targets,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


def main_acceptance(args):
    """Trees against chains, in fp32 on the CPU unless CUDA is there; writes decode_acceptance.json."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.prompt_len, args.new_tokens, args.n_prompts, args.trees = 16, 12, 2, "2,2"
    target, draft, mtp, prompts, weights = load_pair(args, device, torch.float32)
    rows = []
    for label, model, d in (("draft model", target, draft), ("mtp", mtp, "mtp")):
        if model is not None and d is not None:
            rows += bench_acceptance(f"{label} ({weights})", model, d, prompts, args)
    best = max((r.get("ratio_same_depth", 0) for r in rows), default=None)
    print(f"\nbest tree / chain of the same depth: {best:.2f}x (target >= {TREE_TARGET}x"
          f"{'' if weights == 'trained' else ', random weights: not meaningful'})")
    out = args.out or (None if args.smoke else os.path.join(ROOT, "bench", "results", "decode_acceptance.json"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "device": str(device), "weights": weights,
                       "ckpt": args.ckpt, "draft": args.draft, "mtp_ckpt": args.mtp_ckpt,
                       "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}, f, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
