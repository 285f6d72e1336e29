"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 follow the single-process loss curve, and a
checkpoint written by 2 processes resumes on 1."""
import json
import os
import subprocess
import sys

import pytest

from common import run_script, script_env, stdlib_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--preset", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
        "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--warmup-steps", "1",
        "--max-steps", "6", "--eval-every", "3", "--eval-steps", "1", "--log-every", "1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = stdlib_corpus(tmp_path_factory.mktemp("corpus"))
    env = script_env(tmp_path_factory.mktemp("cache"))
    single = tmp_path_factory.mktemp("single")
    train([*ARGS, "--data", str(d), "--out-dir", str(single)], env)  # also fills the data cache
    return str(d), env, str(single)


def train(args, env, nproc=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc > 1:
        r = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
    else:  # python train.py args, from a pre-imported interpreter (tests/common.py)
        r = run_script(os.path.join(ROOT, "train.py"), args, env)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def close(a, b, tol=2e-4):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


# Plain DDP and FSDP2 (no checkpointing, no compile) are checked more strictly in test_distributed_grads.py
# (grad norms and final weights to 1e-5) and, for FSDP2, by the first half of the resume test below: each
# torchrun costs seconds, so here they run only with the options they must compose with.
@pytest.mark.parametrize("parallel,extra", [("ddp", ["--grad-ckpt", "selective"]),
                                            ("fsdp", ["--grad-ckpt", "full", "--compile", "true"])])
def test_two_processes_follow_one(setup, tmp_path, parallel, extra):
    """Gradient checkpointing and torch.compile compose with DDP and FSDP2."""
    data, env, single = setup
    out = str(tmp_path / parallel)
    train([*ARGS, "--data", data, "--out-dir", out, "--parallel", parallel, *extra], env, nproc=2)
    ref = losses(single)
    assert len(ref) == 6 and close(losses(out), ref), (losses(out), ref)


def test_two_process_checkpoint_resumes_on_one(setup, tmp_path):
    data, env, single = setup
    out = str(tmp_path / "resume")
    train([*ARGS, "--data", data, "--out-dir", out, "--parallel", "fsdp", "--stop-after", "3"], env, nproc=2)
    train([*ARGS, "--data", data, "--out-dir", out, "--resume"], env)
    assert close(losses(out), losses(single)), (losses(out), losses(single))


def test_launcher_errors(setup, tmp_path):
    data, env, _ = setup
    bad = dict(env, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    r = train([*ARGS, "--data", data, "--out-dir", str(tmp_path / "x")], bad, check=False)
    assert r.returncode != 0 and "MASTER_ADDR is not set" in r.stderr.strip().splitlines()[-1]
    r = train([*ARGS, "--data", data, "--out-dir", str(tmp_path / "y"), "--batch-size", "3"], env, nproc=2,
              check=False)
    assert r.returncode != 0 and "must be divisible by the world size (2)" in r.stderr
