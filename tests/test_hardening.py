"""Damaged checkpoints, kills at any moment, concurrent runs, a full disk (issue 19). CPU, ~1 minute.

The runs use a one-layer, 32-wide model on a ~40 KB text file: each train.py start costs ~4 s, most of
it importing torch, so the kill test strings its kills into one sequence of runs.
"""
import errno
import json
import os
import random
import resource
import struct
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest
import torch

from nano import checkpoint as ckpt_module
from nano.checkpoint import (CheckpointError, CheckpointUnsafe, CheckpointWriteError, load_checkpoint,
                             resume_checkpoint, save_checkpoint)
from nano.finetune import load_model as load_nano  # what sample.py loads a --ckpt with
from common import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
        "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--lr", "3e-3",
        "--eval-every", "100", "--eval-steps", "1", "--sample-every", "0", "--log-every", "1",
        "--ckpt-every", "2", "--max-steps", "12"]

# train.py, run in a process that SIGKILLs itself at the n-th call of one function: a kill at a chosen
# moment, the same on every run (a timer would land anywhere).
KILLER = r"""
import io, os, runpy, signal, sys
import torch
import nano.data

what, n = os.environ.pop("KILL_AT").split(":")
n, calls = int(n), 0


def on_nth_call(owner, name, before=None, after=False, when=lambda *args: True):
    orig = getattr(owner, name)

    def wrapper(*args, **kwargs):
        global calls
        calls += when(*args)
        if calls == n and before:
            before(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(*args, **kwargs)
        if calls == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapper)


def half_written(state, f):  # half of the checkpoint reaches the disk
    buf = io.BytesIO()
    save(state, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()


save = torch.save
if what == "prepare":  # data preparation: the shards written, the cache folder not yet in place
    on_nth_call(nano.data, "_write_shards", after=True)
elif what == "step":  # in a step (the n-th batch drawn, eval batches included)
    on_nth_call(nano.data.PackedLoader, "next_batch", before=lambda *args: None)
elif what == "save":  # half-way through writing a checkpoint
    on_nth_call(torch, "save", before=half_written)
elif what == "rotate":  # ckpt.pt is now ckpt.prev.pt, ckpt.pt.tmp not yet ckpt.pt
    on_nth_call(os, "replace", after=True, when=lambda src, dst: str(dst).endswith("ckpt.prev.pt"))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["NANO_ROOT"], "train.py"), run_name="__main__")
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    stdlib = sysconfig.get_paths()["stdlib"]
    text = "".join(open(os.path.join(stdlib, n), encoding="utf-8", errors="replace").read()
                   for n in ("abc.py", "bisect.py", "heapq.py", "copy.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


def make_env(cache):
    e = dict(os.environ, NANO_CACHE=str(cache), PYTHONPATH=ROOT, NANO_ROOT=ROOT)
    e.pop("TRITON_INTERPRET", None)
    e.pop("NANO_DEBUG", None)
    return e


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("cache"))


def train(args, env, **kw):
    if not kw:  # python train.py args, from a pre-imported interpreter (tests/common.py)
        return run_script(os.path.join(ROOT, "train.py"), args, env)
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, **kw)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def baseline(corpus, env, tmp_path_factory):
    """An uninterrupted run: 12 steps, a checkpoint every 2."""
    out = str(tmp_path_factory.mktemp("baseline") / "run")
    r = train([*TINY, "--data", corpus, "--out-dir", out], env)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def one_line_error(exc):
    message = str(exc)
    assert message and "\n" not in message
    assert "False" not in message and "trust" not in message  # never torch's advice to disable weights_only
    return message


# -----------------------------------------------------------------------------
# damaged checkpoints

def data_start(src, record):
    """Where a zip record's bytes start: after its local header, whose name and extra field (torch pads
    records to 64 bytes there) have their lengths at offsets 26 and 28."""
    n, extra = struct.unpack("<HH", src[record.header_offset + 26:record.header_offset + 30])
    return record.header_offset + 30 + n + extra


def tensor_offset(data, t):
    """Where the bytes of tensor t lie in a checkpoint file."""
    at = data.find(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert at > 0
    return at


def test_damaged_checkpoints_fuzz(baseline, tmp_path):
    """Random bytes, truncations and bit flips (seeded): each is refused with one line naming the file,
    through the function sample.py loads with. A flipped bit in zip bookkeeping that no reader uses (a
    timestamp, a padding byte, a copy of a size) changes nothing that loads: it must load intact."""
    src = open(os.path.join(baseline, "ckpt.pt"), "rb").read()
    original = torch.load(os.path.join(baseline, "ckpt.pt"), weights_only=True)
    with zipfile.ZipFile(os.path.join(baseline, "ckpt.pt")) as z:
        pkl = next(r for r in z.infolist() if r.filename.endswith("/data.pkl"))
        tensors = [r for r in z.infolist() if "/data/" in r.filename and r.file_size]
        directory = z.start_dir
    pkl_start = data_start(src, pkl)
    rng = random.Random(19)

    def flip(pos):
        b = bytearray(src)
        b[pos] ^= 1 << rng.randrange(8)
        return bytes(b)

    must_fail = [rng.randbytes(n) for n in (0, 1, 7, 22, 100, 1000, 5000)]
    must_fail += [b"PK\x03\x04" + rng.randbytes(n) for n in (0, 26, 500)]
    must_fail += [src[:n] for n in [0, 1, 4, 30, 200, len(src) - 1, len(src) - 22]
                  + rng.sample(range(len(src)), 30)]
    must_fail += [flip(rng.randrange(pkl_start, pkl_start + pkl.file_size)) for _ in range(40)]  # the pickle
    for r in rng.sample(tensors, 30):  # tensor data
        start = data_start(src, r)
        must_fail.append(flip(rng.randrange(start, start + r.file_size)))
    bookkeeping = [flip(p) for p in rng.sample(range(pkl.header_offset, pkl_start), 15)
                   + rng.sample(range(directory, len(src)), 45)]

    path = tmp_path / "damaged.pt"
    for i, data in enumerate(must_fail):
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_nano(str(path))
        assert str(path) in one_line_error(e.value), i
    intact = 0
    for data in bookkeeping:
        path.write_bytes(data)
        try:
            _, _, state = load_nano(str(path))
        except CheckpointError as e:
            assert str(path) in one_line_error(e)
            continue
        assert all(torch.equal(state["model"][k], v) for k, v in original["model"].items())
        intact += 1
    assert intact < len(bookkeeping) * 2 // 3  # 24 of 60 here: most bookkeeping bytes matter, and are caught

    # the first damaged tensor is named
    b = bytearray(src)
    b[tensor_offset(src, original["model"]["tok_embeddings.weight"]) + 5] ^= 0x10
    (tmp_path / "flip.pt").write_bytes(b)
    with pytest.raises(CheckpointError, match="model/tok_embeddings.weight does not match its checksum"):
        load_checkpoint(str(tmp_path / "flip.pt"))

    # a pickle that would run code is refused, naming the object, and runs nothing
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"format": "nano-checkpoint", "version": 2, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointUnsafe, match="system") as e:
        load_nano(str(tmp_path / "evil.pt"))
    one_line_error(e.value)
    assert not (tmp_path / "pwned").exists()


def test_sample_py_damaged_checkpoint_one_line_exit_2(baseline, env, tmp_path):
    src = open(os.path.join(baseline, "ckpt.pt"), "rb").read()
    flipped = bytearray(src)
    flipped[len(src) // 2] ^= 4
    cases = {"random.pt": random.Random(2).randbytes(7), "flip.pt": flipped}  # (cut: tests/test_train.py)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        r = run_script(os.path.join(ROOT, "sample.py"), ["--ckpt", str(tmp_path / name)], env, timeout=120)
        assert r.returncode == 2, (name, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(tmp_path / name) in lines[0], (name, r.stderr)


def test_malformed_hf_config_names_the_file(tmp_path):
    from nano.convert import load_hf
    (tmp_path / "config.json").write_text('{"model_type": "llama"\n"vocab_size": 3}')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="config.json lacks the field 'num_attention_heads'"):
        load_hf(str(tmp_path))


# -----------------------------------------------------------------------------
# writes that fail, and resuming from the previous checkpoint

def small_state(value):
    return {"model": {"w": torch.full((64, 64), float(value))}, "model_config": {}, "tokenizer": {},
            "step": value, "rng": {"python": (3, tuple(range(5)), None)}}


def test_enospc_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, small_state(1))

    class FullDisk:  # the file torch.save writes to: the disk fills after 1,000 bytes
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt_module, "open", lambda p, mode: FullDisk(open(p, mode)), raising=False)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as e:
        save_checkpoint(path, small_state(2))
    assert path in one_line_error(e.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_damaged_newest_checkpoint_resumes_from_previous(tmp_path):
    out = str(tmp_path)
    save_checkpoint(os.path.join(out, "ckpt.pt"), small_state(1))
    save_checkpoint(os.path.join(out, "ckpt.pt"), small_state(2))
    assert resume_checkpoint(out)[0]["step"] == 2
    data = bytearray((tmp_path / "ckpt.pt").read_bytes())
    data[tensor_offset(data, torch.full((64, 64), 2.0)) + 100] ^= 1
    (tmp_path / "ckpt.pt").write_bytes(data)
    said = []
    state, path = resume_checkpoint(out, say=said.append)
    assert state["step"] == 1 and path.endswith("ckpt.prev.pt")
    assert len(said) == 1 and "model/w does not match its checksum" in said[0] and "ckpt.prev.pt" in said[0]


def test_train_py_failed_checkpoint_write_stops_with_one_line(corpus, baseline, env, tmp_path):
    """A real failed write (the file size limit: EFBIG, as ENOSPC would be) stops train.py with one line
    and leaves the last checkpoint loadable."""
    out = str(tmp_path / "run")
    shutil.copytree(baseline, out)
    limit = os.path.getsize(os.path.join(out, "ckpt.pt")) // 2
    r = train([*TINY, "--data", corpus, "--out-dir", out, "--resume", "--max-steps", "14"], env,
              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if "train.py: error:" in line]  # after tqdm's bar
    assert len(error) == 1 and "could not write the checkpoint" in error[0] and "intact" in error[0]
    assert load_checkpoint(out)["step"] == 12 and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


# -----------------------------------------------------------------------------
# kills, and two runs on one out_dir

def test_sigkill_at_seeded_moments_then_resume_equals_uninterrupted(corpus, baseline, tmp_path):
    env = dict(make_env(tmp_path / "cache"), PYTHONUNBUFFERED="1")  # cold cache; stdout survives a kill
    out = str(tmp_path / "run")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    rng = random.Random(19)

    def run(kill_at, resume=True):
        args = [*TINY, "--data", corpus, "--out-dir", out] + (["--resume"] if resume else [])
        script = str(killer) if kill_at else os.path.join(ROOT, "train.py")
        return run_script(script, args, dict(env, KILL_AT=kill_at) if kill_at else env)

    r = run("prepare:1", resume=False)  # data preparation, before any checkpoint
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    moments = [f"step:{rng.randint(4, 7)}",  # after one or two checkpoints (steps 2, 4)
               f"save:{rng.randint(1, 2)}",
               "rotate:1",
               f"step:{rng.randint(5, 6)}"]  # after two checkpoints of this run
    for i, moment in enumerate(moments):
        r = run(moment, resume=i > 0)
        assert r.returncode == -signal.SIGKILL, (moment, r.stdout[-1000:], r.stderr[-2000:])
        if moment == "rotate:1":
            assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    assert "ckpt.pt is missing" in r.stdout  # the run after "rotate" resumed from ckpt.prev.pt
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "lo')  # what a kill in the middle of a metrics append leaves
    data = bytearray(open(os.path.join(out, "ckpt.pt"), "rb").read())
    emb = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]["tok_embeddings.weight"]
    data[tensor_offset(data, emb)] ^= 0x40  # and the newest checkpoint is damaged on top
    open(os.path.join(out, "ckpt.pt"), "wb").write(data)

    r = run(None)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model/tok_embeddings.weight does not match its checksum" in r.stdout
    assert "resuming from the previous checkpoint" in r.stdout
    assert losses(out) == losses(baseline) and len(losses(out)) == 12
    final, expected = load_checkpoint(out), load_checkpoint(baseline)
    assert all(torch.equal(final["model"][k], v) for k, v in expected["model"].items())


def test_second_run_on_same_out_dir_refuses_until_first_dies(corpus, env, baseline, tmp_path):
    out = str(tmp_path / "run")
    args = [*TINY, "--data", corpus, "--out-dir", out]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--max-steps", "100000",
                              "--ckpt-every", "100000"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = os.path.join(out, "lock")
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(lock) and open(lock).read().strip()):
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)  # it holds the lock; stopped, it leaves the CPUs to the others
        second = train(args, env)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another run (pid {first.pid}" in lines[0], second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = train([*args, "--max-steps", "1"], env)  # the dead run's lock file blocks nothing
    assert third.returncode == 0, third.stderr[-2000:]


# -----------------------------------------------------------------------------
# the data cache

def test_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    from nano.data import prepare_data
    path, cache = tmp_path / "t.txt", str(tmp_path / "cache")
    path.write_text("def f(x):\n    return x + 1\n" * 50)
    first = prepare_data(str(path), vocab_size=270, cache_dir=cache, progress=False)
    st = os.stat(path)
    path.write_text("def g(y):\n    return y * 2\n" * 50)  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, as cp -p or a quick edit leaves it
    second = prepare_data(str(path), vocab_size=270, cache_dir=cache, progress=False)
    assert second.report["cached"] is False and second.path != first.path
    assert "g(y)" in second.tokenizer.decode(second.train.tokens[:40].tolist())
    with open(os.path.join(second.path, "meta.json")) as f:
        sha = json.load(f)["sha256"]
    assert set(sha) == {"train", "val"} and all(len(v) == 64 for v in sha.values())
