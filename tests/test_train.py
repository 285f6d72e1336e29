"""train.py and sample.py end to end on CPU: loss falls, checkpoints, exact resume, bad input."""
import json
import os
import pickle
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch

from common import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2",
         "--vocab-size", "320", "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "2",
         "--eval-steps", "2", "--log-every", "1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~40 standard-library files: real text, a few hundred KB."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]
    for n in names:
        with open(os.path.join(stdlib, n), encoding="utf-8", errors="replace") as f:
            (d / n.replace(".py", ".txt")).write_text(f.read())
    (d / "image.bin").write_bytes(bytes(range(256)) * 8)  # skipped, and counted in the data line
    return str(d)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, NANO_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)  # train.py's CPU path is the PyTorch reference
    return e


def run(script, args, env, check=True, timeout=300):
    r = run_script(os.path.join(ROOT, script), args, env, timeout=timeout)  # python script args (pre-imported)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def records(out_dir, key="loss"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def test_train_loss_falls_then_sample(corpus, env, tmp_path):
    out = str(tmp_path / "run")
    r = run("train.py", [*SMALL, "--data", corpus, "--out-dir", out, "--max-steps", "40", "--eval-every", "20"],
            env)
    assert "device: cpu" in r.stdout and "fp32" in r.stdout
    assert "skipped: 1 binary" in r.stdout
    assert "sample:" in r.stdout
    losses = [x["loss"] for x in records(out)]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # from ~ln(320) = 5.8 down by more than a nat
    vals = records(out, "val_loss")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] and vals[-1]["val_bpb"] > 0
    first = records(out)[0]
    for key in ("lr", "grad_norm", "tok_per_s", "mfu", "mem_gib", "packing"):
        assert key in first
    assert os.path.isfile(os.path.join(out, "ckpt.pt"))
    s = run("sample.py", ["--ckpt", out, "--prompt", "def ", "--max-new-tokens", "20", "--num-samples", "2",
                          "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"], env)
    assert "tokens/s" in s.stdout and s.stdout.count("-" * 40) == 2
    p = subprocess.run([sys.executable, "-m", "nano.plot", out], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0 and os.path.getsize(os.path.join(out, "metrics.png")) > 1000, p.stderr


def test_resume_is_bit_identical(corpus, env, tmp_path):
    common = [*SMALL, "--data", corpus, "--max-steps", "8", "--eval-every", "4", "--grad-accum", "2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("train.py", [*common, "--out-dir", a], env)
    run("train.py", [*common, "--out-dir", b, "--stop-after", "3"], env)
    assert [r["step"] for r in records(b)] == [1, 2, 3]
    run("train.py", [*common, "--out-dir", b, "--resume"], env)
    la, lb = records(a), records(b)
    assert [r["step"] for r in lb] == list(range(1, 9))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["grad_norm"] for r in la] == [r["grad_norm"] for r in lb]
    sa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)["model"]
    sb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fp16_grad_scaler_path(corpus, env, tmp_path):
    with torch.autocast("cpu", dtype=torch.float16):
        if (torch.ones(2, 2) @ torch.ones(2, 2)).dtype != torch.float16:
            pytest.skip("this CPU build has no fp16 autocast")
    out = str(tmp_path / "fp16")
    r = run("train.py", [*SMALL, "--data", corpus, "--out-dir", out, "--max-steps", "4", "--dtype", "fp16",
                         "--eval-every", "100"], env)
    assert "float16" in r.stdout
    recs = records(out)
    assert all("skipped_steps" in x for x in recs) and all(x["loss"] == x["loss"] for x in recs)


def test_sigint_saves_and_exits_cleanly(corpus, env, tmp_path):
    out = str(tmp_path / "sig")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *SMALL, "--data", corpus, "--out-dir",
                          out, "--max-steps", "100000", "--eval-every", "100000", "--ckpt-every", "100000"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(records(out)) >= 2):
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "checkpoint saved" in stdout + stderr
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert state["step"] >= 2


def test_nan_loss_stops_and_keeps_last_checkpoint(corpus, env, tmp_path):
    out = str(tmp_path / "nan")
    r = run("train.py", [*SMALL, "--data", corpus, "--out-dir", out, "--max-steps", "50", "--lr", "1e12",
                         "--warmup-steps", "0", "--grad-clip", "1e30", "--ckpt-every", "1", "--eval-every", "1000"],
            env, check=False)
    assert r.returncode == 2
    assert "loss is nan" in r.stderr or "loss is inf" in r.stderr
    assert "last good checkpoint" in r.stderr
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/path"], "/no/such/path"),
    (["--resume"], "no checkpoint at"),
    (["--tokens-per-step", "1000"], "must be a multiple of batch_size * seq_len"),
])
def test_train_bad_input(corpus, env, tmp_path, args, message):
    r = run("train.py", [*SMALL, "--data", corpus, "--out-dir", str(tmp_path / "bad"), *args], env, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in r.stderr


def test_sample_rejects_bad_checkpoints(env, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    cases = {}
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "nano-checkpoint", "x": Evil()}, f)
    cases["evil.pt"] = "refusing to load"
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = "not a nano checkpoint"
    torch.save({"format": "nano-checkpoint", "version": 1, "big": torch.ones(10000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["trunc.pt"] = "truncated or corrupt"
    cases["missing.pt"] = "no checkpoint at"
    for name, message in cases.items():
        r = run("sample.py", ["--ckpt", str(tmp_path / name)], env, check=False)
        assert r.returncode != 0 and message in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_existing_run_is_not_overwritten(corpus, env, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    r = run("train.py", [*SMALL, "--data", corpus, "--out-dir", str(out), "--max-steps", "2"], env, check=False)
    assert r.returncode != 0 and "pass --resume" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == b"precious"


def test_bench_train_smoke(env):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--smoke"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("tok/s") == 6  # 3 checkpointing modes x (baseline, nano)


def test_deepseek_tiny_and_speculative_sampling(corpus, env, tmp_path):
    """deepseek-tiny (MLA + MoE + MTP) trains with train.py; a `draft` preset trained on the same data
    shares its tokenizer; sample.py speculates with either the draft or the MTP head."""
    ds, draft = str(tmp_path / "ds"), str(tmp_path / "draft")
    small = ["--data", corpus, "--vocab-size", "320", "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "2",
             "--eval-steps", "2", "--log-every", "1", "--lr", "3e-3"]
    r = run("train.py", ["--preset", "deepseek-tiny", *small, "--out-dir", ds, "--max-steps", "30",
                         "--eval-every", "15"], env)
    losses = [x["loss"] for x in records(ds)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    last = records(ds)[-1]
    assert "loss/mtp" in last and last["moe/max_load"] >= 1.0
    assert "expert load max/mean" in r.stdout
    vals = records(ds, "val_loss")  # the val loss is the next-token loss alone (no MTP term)
    assert vals[0]["val_loss"] < 1.2 * __import__("math").log(320)
    run("train.py", ["--preset", "draft", *small, "--out-dir", draft, "--max-steps", "5"], env)
    common = ["--ckpt", ds, "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    for extra in (["--draft", draft, "--k", "3"], ["--speculate", "mtp"]):
        s = run("sample.py", [*common, *extra], env)
        assert "acceptance rate" in s.stdout and "tokens per target forward" in s.stdout
    assert "k 1," in s.stdout  # mtp_depth 1 -> one MTP draft token per step


def test_sample_from_hf_directory_with_its_tokenizer(env, tmp_path):
    """sample.py --hf: a tiny random LlamaForCausalLM plus a Llama-3-format tokenizer.model (256 byte
    tokens; the 256 Llama-3 special tokens follow), found in the model directory's original/ folder."""
    transformers = pytest.importorskip("transformers")
    import base64
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "original").mkdir()
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    (tmp_path / "hf" / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    r = run("sample.py", ["--hf", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "5",
                          "--temperature", "0"], env)
    assert "tokens/s" in r.stdout
    r = run("sample.py", ["--hf", str(tmp_path / "nope")], env, check=False)
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr
