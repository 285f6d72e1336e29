"""python -m nano.plot RUN_DIR: a PNG of train/val loss and tokens/s from RUN_DIR/metrics.jsonl.

Needs matplotlib (pip install -e '.[plot]'); nothing else in nano does.
"""
import json
import os
import sys


def plot(run_dir, out=None):
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("nano.plot needs matplotlib: pip install -e '.[plot]'") from None
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: pass the --out-dir of a training run")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax1.legend()
    ax2.plot([r["step"] for r in train], [r["tok_per_s"] for r in train], lw=1)
    ax2.set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m nano.plot RUN_DIR")
    try:
        print(plot(sys.argv[1]))
    except (ImportError, FileNotFoundError) as e:
        sys.exit(f"nano.plot: error: {e}")
