"""DDP and FSDP2 compute the single-process gradient, not just a loss curve like it: grad norms every step and
the final weights, on a corpus of many short documents (so ranks and micro-steps hold different numbers of
targets and their weighting matters). AdamW with clipping is blind to a uniform gradient scale, so the loss
alone would not see a lost `* world` factor; the grad norm does."""
import json
import os
import subprocess
import sys

import pytest
import torch

from common import run_script, short_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
        "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--warmup-steps", "1",
        "--max-steps", "3", "--eval-every", "100", "--eval-steps", "1", "--sample-every", "0", "--lr", "3e-3"]


def train(args, env, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc > 1:
        r = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
    else:  # python train.py args, from a pre-imported interpreter (tests/common.py)
        r = run_script(os.path.join(ROOT, "train.py"), args, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def result(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "loss" in r]
    return recs, torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, NANO_CACHE=str(tmp / "cache"), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    data = short_documents(tmp / "docs.jsonl")
    train([*ARGS, "--data", data, "--out-dir", str(tmp / "single")], env)
    return data, env, result(str(tmp / "single"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_compute_the_same_gradient(single, tmp_path, parallel):
    data, env, (ref, ref_weights) = single
    out = str(tmp_path / parallel)
    train([*ARGS, "--data", data, "--out-dir", out, "--parallel", parallel], env, nproc=2)
    recs, weights = result(out)
    assert len(recs) == len(ref) == 3
    for a, b in zip(recs, ref):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (parallel, recs, ref)
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
    for k, w in ref_weights.items():
        assert (weights[k] - w).abs().max() <= 1e-5, (parallel, k, (weights[k] - w).abs().max())
