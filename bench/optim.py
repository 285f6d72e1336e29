"""Muon against AdamW: validation loss against steps, each optimizer at its best of 3 learning rates.

    python bench/optim.py                  # CPU, tiny preset: writes bench/results/optim.json and optim.png
    python bench/optim.py --smoke          # a few steps of tiny shapes: checks that the script runs

Every run is `python train.py --preset tiny` on the default corpus (the standard library) with the same
seed, so both optimizers see the same batches in the same order and the same number of tokens; only
--optimizer and the learning rate change (with Muon, --lr stays AdamW's best for the embedding, head and
norms, and the sweep is over --muon-lr). The schedule (warmup, cosine to 10%) is the same for all runs.
The figure: the first evaluated step at which Muon's validation loss is at or below AdamW's final one,
as a fraction of the steps AdamW took (goal: <= 0.75).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(args, optimizer, lr, muon_lr, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--device", "cpu",
           "--max-steps", str(args.steps), "--warmup-steps", str(args.warmup), "--eval-every", str(args.eval_every),
           "--eval-steps", str(args.eval_steps), "--sample-every", "0", "--ckpt-every", str(10 * args.steps),
           "--log-every", str(args.steps), "--seed", "1337", "--out-dir", out_dir, "--optimizer", optimizer,
           "--lr", str(lr), *(["--muon-lr", str(muon_lr)] if optimizer == "muon" else []), *args.extra]
    # one thread: on a shared CPU, OpenMP threads waiting on each other can make every matmul 100x slower
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"bench/optim.py: train.py failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        val = [(rec["step"], rec["val_loss"]) for rec in map(json.loads, f) if "val_loss" in rec]
    return cmd, val


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--adamw-lrs", default="1e-3,2e-3,4e-3")
    p.add_argument("--muon-lrs", default="2e-3,4e-3,8e-3")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "optim.json"))
    args = p.parse_args()
    args.extra = []
    if args.smoke:  # tiny shapes, one learning rate each: runs the script, measures nothing, writes nothing
        args.steps, args.warmup, args.eval_every, args.eval_steps = 4, 1, 2, 1
        args.adamw_lrs, args.muon_lrs = "2e-3", "4e-3"
        args.extra = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--vocab-size", "300",
                      "--seq-len", "32", "--batch-size", "2",
                      "--data", os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")]

    runs = {"adamw": [], "muon": []}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in map(float, args.adamw_lrs.split(",")):
            cmd, val = train(args, "adamw", lr, None, os.path.join(tmp, f"adamw-{lr}"))
            runs["adamw"].append({"lr": lr, "val_loss": val})
            print(f"adamw lr {lr:g}: final val loss {val[-1][1]:.4f}", flush=True)
        best_adamw = min(runs["adamw"], key=lambda r: r["val_loss"][-1][1])
        for muon_lr in map(float, args.muon_lrs.split(",")):
            cmd, val = train(args, "muon", best_adamw["lr"], muon_lr, os.path.join(tmp, f"muon-{muon_lr}"))
            runs["muon"].append({"lr": best_adamw["lr"], "muon_lr": muon_lr, "val_loss": val})
            print(f"muon muon_lr {muon_lr:g} (lr {best_adamw['lr']:g}): final val loss {val[-1][1]:.4f}", flush=True)
    best_muon = min(runs["muon"], key=lambda r: r["val_loss"][-1][1])
    target_step, target = best_adamw["val_loss"][-1]
    reached = next((s for s, v in best_muon["val_loss"] if v <= target), None)
    ratio = reached / target_step if reached is not None else None
    print(f"\n| optimizer | best lr | final val loss |\n|---|---:|---:|\n"
          f"| AdamW | {best_adamw['lr']:g} | {target:.4f} |\n"
          f"| Muon | {best_muon['muon_lr']:g} (AdamW part {best_muon['lr']:g}) | {best_muon['val_loss'][-1][1]:.4f} |")
    print(f"Muon reaches AdamW's final val loss {target:.4f} at step {reached} of {target_step}"
          + (f" ({ratio:.2f}x the steps; goal <= 0.75x)" if ratio is not None else " (never)"))
    if args.smoke:
        return
    result = {
        "command": "python bench/optim.py " + " ".join(sys.argv[1:]),
        "train_command": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": "tiny", "dtype": "fp32", "steps": args.steps, "warmup_steps": args.warmup,
        "tokens_per_step": 8 * 256, "eval_every": args.eval_every, "eval_steps": args.eval_steps,
        "runs": runs, "best_adamw_lr": best_adamw["lr"], "best_muon_lr": best_muon["muon_lr"],
        "adamw_final_val_loss": target, "muon_final_val_loss": best_muon["val_loss"][-1][1],
        "muon_steps_to_adamw_final": reached, "adamw_steps": target_step, "steps_ratio": ratio,
        "goal_steps_ratio": 0.75,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(runs, best_adamw, best_muon, target, reached, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


def plot(runs, best_adamw, best_muon, target, reached, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        for r in runs[name]:
            best = r is best_adamw or r is best_muon
            lr = r["lr"] if name == "adamw" else r["muon_lr"]
            ax.plot(*zip(*r["val_loss"]), color=color, lw=2 if best else 0.8, alpha=1 if best else 0.4,
                    label=f"{'AdamW' if name == 'adamw' else 'Muon'} lr {lr:g}" + (" (best)" if best else ""))
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="AdamW final val loss")
    if reached is not None:
        ax.axvline(reached, color="tab:red", ls=":", lw=0.8, label=f"Muon reaches it: step {reached}")
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="tiny preset, CPU: AdamW vs Muon")
    lo = min(v for rs in runs.values() for r in rs for _, v in r["val_loss"])
    ax.set_ylim(lo - 0.1, lo + 2.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
