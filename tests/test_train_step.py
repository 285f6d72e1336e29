"""What one optimizer step of train.py computes, through the script: the gradient does not depend on how the
step's rows are split into micro-steps (1x8, 4x2, 8x1, the last from --tokens-per-step), and an fp16
overflow is skipped, counted, and halves the loss scale."""
import json
import os
import tempfile

import pytest
import torch

from common import run_script, short_documents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 32
TINY = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
        "--vocab-size", "300", "--seq-len", str(T), "--eval-steps", "1", "--sample-every", "0",
        "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    env = dict(os.environ, NANO_CACHE=str(tmp / "cache"), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return short_documents(tmp / "docs.jsonl"), env


def train(argv, env, prelude=""):
    """python train.py ARGV, optionally after some Python (a patch) in the same process; from a pre-imported
    interpreter (tests/common.py): a script file that runs the prelude, then train.py as __main__."""
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = ['train.py'] + {argv!r}\n"
            f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run_train.py")
        with open(path, "w") as f:
            f.write(code)
        r = run_script(path, [], env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def gradients(out):
    """The step's gradient, from AdamW's first moment after one step: exp_avg = (1 - beta1) * grad."""
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["optimizer"]["state"]
    return {k: v["exp_avg"] / (1 - 0.9) for k, v in state.items()}


def test_gradient_independent_of_the_micro_step_split(setup, tmp_path):
    data, env = setup
    common = [*TINY, "--data", data, "--max-steps", "1", "--grad-clip", "1e9", "--beta1", "0.9"]
    splits = {"1x8": ["--batch-size", "8", "--grad-accum", "1"], "4x2": ["--batch-size", "2", "--grad-accum", "4"],
              "8x1": ["--batch-size", "1", "--tokens-per-step", str(8 * T)]}
    grads, norms = {}, {}
    for name, args in splits.items():
        out = str(tmp_path / name)
        r = train([*common, *args, "--out-dir", out], env)
        grads[name], norms[name] = gradients(out), records(out)[0]["grad_norm"]
    assert f"8 x 1 x {T} = {8 * T:,} tokens per step" in r.stdout  # --tokens-per-step chose grad_accum 8
    ref = grads["1x8"]
    for name in ("4x2", "8x1"):
        assert abs(norms[name] - norms["1x8"]) <= 1e-6 * norms["1x8"], (name, norms)
        for k in ref:
            assert (grads[name][k] - ref[k]).norm() <= 1e-6 * ref[k].norm() + 1e-12, (name, k)


SCALE = 2.0 ** 40  # so large that every step overflows fp16


def test_fp16_overflow_is_skipped_counted_and_halves_the_scale(setup, tmp_path):
    with torch.autocast("cpu", dtype=torch.float16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.float16:
            pytest.skip("this CPU build has no fp16 autocast")
    data, env = setup
    out, init = str(tmp_path / "fp16"), str(tmp_path / "init.pt")
    prelude = f"""import torch
from nano import model
class Scaler(torch.amp.GradScaler):
    def __init__(self, *a, **k):
        super().__init__(*a, **k, init_scale={SCALE})
torch.amp.GradScaler = Scaler
init_weights = model.Transformer.init_weights
def save_init(self):
    init_weights(self)
    torch.save(self.state_dict(), {init!r})
model.Transformer.init_weights = save_init"""
    train([*TINY, "--data", data, "--out-dir", out, "--max-steps", "3", "--batch-size", "2", "--dtype", "fp16"],
          env, prelude)
    recs = records(out)
    assert [r["skipped_steps"] for r in recs] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 100 for r in recs)
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["scaler"]["scale"] == SCALE / 2 ** 3
    start = torch.load(init, weights_only=True)
    assert all(torch.equal(start[k], v) for k, v in state["model"].items())  # no update was applied
