"""Data at scale: bounded memory while preparing, parquet / jsonl.gz / hf: inputs, interrupted builds, and
the epoch plan of train.py."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nano.data import plan_epochs, prepare_data, read_documents, split_documents
from nano.tokenizer import train_bpe
from common import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def varied_docs(n_docs, seed=0, words_per_doc=(50, 400)):
    """Documents of random words from a random 20k-word vocabulary, with numbers and punctuation."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzéü"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20000)] + [",", ".", "\n", "42"]
    lens = rng.integers(*words_per_doc, n_docs)
    ids = rng.integers(0, len(vocab), int(lens.sum()))
    out, pos = [], 0
    for n in lens:
        out.append(" ".join(vocab[i] for i in ids[pos:pos + n]))
        pos += n
    return out


def write_jsonl(path, docs):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    return str(path)


def expected_shards(docs, vocab_size, val_fraction):
    """The in-memory path: every document read, split, the BPE trained on all of train, each encoded."""
    train, val = split_documents(docs, val_fraction)
    tok = train_bpe(train, vocab_size, progress=False)
    flat = [np.array([t for d in split for t in [tok.bos_id] + tok.encode(d)]) for split in (train, val)]
    return tok, flat


# ---- memory

MEASURE = r"""
import json, os, sys, threading, time
from nano.data import prepare_data

def tree_rss(pid):
    # resident anonymous memory (what the code allocates) of the process and all its descendants (forked
    # workers included), a page shared by n of them counted 1/n in each (Pss_Anon): plain RSS would count
    # a forked worker's inherited pages once per worker, and file pages (libtorch) vary with what other
    # processes on the machine map them
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("Pss_Anon:"))
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack += map(int, f.read().split())
        except (OSError, StopIteration):  # a worker that just ended
            pass
    return total

base = peak = tree_rss(os.getpid())
done = threading.Event()
def poll():
    global peak
    while not done.is_set():
        peak = max(peak, tree_rss(os.getpid()))
        time.sleep(0.002)
threading.Thread(target=poll, daemon=True).start()
prepare_data(sys.argv[1], vocab_size=300, cache_dir=sys.argv[2], progress=False, **json.loads(sys.argv[3]))
done.set()
print(json.dumps({"growth_mb": (max(peak, tree_rss(os.getpid())) - base) / 2**20}))
"""


def measure(data, cache, kwargs, root=ROOT):
    r = subprocess.run([sys.executable, "-c", MEASURE, data, cache, json.dumps(kwargs)], capture_output=True,
                       text=True, timeout=600, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["growth_mb"]


def test_memory_is_bounded_when_the_corpus_grows_4x(tmp_path):
    # 3.5 and 14 MB of jsonl: the whole-corpus-in-memory code grew 35 -> 152 MB here (its BPE forks workers
    # that copy their share of the corpus past 4M characters); streaming 22 -> 22 MB
    small = varied_docs(1800, seed=1)
    big = small + varied_docs(5400, seed=2)
    kw = {"tokenizer_train_bytes": 2_000_000}  # a fixed sample: what the BPE holds does not grow either
    a = measure(write_jsonl(tmp_path / "small.jsonl", small), str(tmp_path / "c1"), kw)
    b = measure(write_jsonl(tmp_path / "big.jsonl", big), str(tmp_path / "c2"), kw)
    print(f"peak RSS growth of the process tree: {a:.0f} MB -> {b:.0f} MB")
    assert b < 1.5 * max(a, 1.0), (a, b)


# ---- equality with the in-memory path

def test_shards_equal_the_in_memory_path(tmp_path):
    docs = varied_docs(300, seed=3, words_per_doc=(5, 60)) + ["same text"] * 3 + ["x"]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    prep = prepare_data(path, vocab_size=300, cache_dir=str(tmp_path / "c"), val_fraction=0.05, progress=False)
    tok, (train, val) = expected_shards(docs, 300, 0.05)
    assert prep.tokenizer.mergeable_ranks == tok.mergeable_ranks
    assert np.array_equal(prep.train.tokens, train) and np.array_equal(prep.val.tokens, val)
    assert prep.val.n_docs == 15 and prep.train.n_docs == len(docs) - 15
    # a bounded sample: the BPE learns from the first training documents holding 20 kB, in corpus order
    small = prepare_data(path, vocab_size=300, cache_dir=str(tmp_path / "c"), val_fraction=0.05, progress=False,
                         tokenizer_train_bytes=20_000)
    sample, n = [], 0
    for d in split_documents(docs, 0.05)[0]:
        if n >= 20_000:
            break
        sample.append(d)
        n += len(d.encode())
    assert small.tokenizer.mergeable_ranks == train_bpe(sample, 300, progress=False).mergeable_ranks
    assert small.tokenizer.mergeable_ranks != tok.mergeable_ranks
    # at most max_val_docs are held out; data_max_bytes takes a prefix of whole documents
    capped = prepare_data(path, vocab_size=300, cache_dir=str(tmp_path / "c"), val_fraction=0.05,
                          progress=False, max_val_docs=4, data_max_bytes=5000)
    n_prefix = int(np.searchsorted(np.cumsum([len(d.encode()) for d in docs]), 5000)) + 1
    assert capped.val.n_docs == 1 and capped.train.n_docs + 1 == n_prefix  # 5% of the prefix rounds to 1
    capped = prepare_data(path, vocab_size=300, cache_dir=str(tmp_path / "c"), val_fraction=0.05,
                          progress=False, max_val_docs=4)
    assert capped.val.n_docs == 4


# ---- formats

def write_parquet_folder(folder, docs, column="text"):
    folder.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        table = pa.table({"id": list(range(len(part))), column: part})
        pq.write_table(table, folder / f"part-{i:05d}.parquet", row_group_size=50)
    return str(folder)


def test_parquet_folder_and_jsonl_gz_train_end_to_end(tmp_path):
    docs = varied_docs(400, seed=4, words_per_doc=(20, 120))
    pq_dir = write_parquet_folder(tmp_path / "pq", docs)
    gz = write_jsonl(tmp_path / "d.jsonl.gz", docs)
    assert read_documents(pq_dir)[0] == docs == read_documents(gz)[0]
    env = {**os.environ, "NANO_CACHE": str(tmp_path / "cache")}
    for data in (pq_dir, gz):
        out = str(tmp_path / ("out-" + os.path.basename(data)))
        r = run_script(os.path.join(ROOT, "train.py"), [  # python train.py ... (pre-imported: tests/common.py)
            "--data", data, "--device", "cpu", "--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head",
            "2", "--n-kv-head", "1", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--max-steps",
            "3", "--eval-every", "2", "--eval-steps", "1", "--out-dir", out], env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "396 train / 4 val documents" in r.stdout
        assert "data: 3 steps of 64 tokens make 0.00" in r.stdout and "warning" not in r.stdout
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert lines[-1]["step"] == 3 and "val_loss" in lines[-1]


def test_parquet_without_text_column_names_its_columns(tmp_path):
    folder = write_parquet_folder(tmp_path / "pq", ["a", "b"], column="content")
    with pytest.raises(ValueError, match=r"part-00000.parquet has no 'text' column \(its columns: id, "
                                         r"content\)"):
        prepare_data(folder, vocab_size=300, cache_dir=str(tmp_path / "c"), progress=False)


# ---- an interrupted preparation

KILLED = """
import sys
from nano.data import prepare_data
prepare_data(sys.argv[1], vocab_size=300, cache_dir=sys.argv[2], progress=False)
"""


def test_sigkilled_preparation_is_never_read_and_is_rebuilt(tmp_path):
    docs = varied_docs(8000, seed=5)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-c", KILLED, path, str(cache)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # kill it while it writes the shards
        bins = list(cache.glob("*.tmp-*/train.bin")) if cache.exists() else []
        if bins and bins[0].stat().st_size > 0:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the preparation ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = os.listdir(cache)
    assert len(left) == 1 and ".tmp-" in left[0]  # only the temporary folder: nothing complete to read
    prep = prepare_data(path, vocab_size=300, cache_dir=str(cache), progress=False)
    assert prep.report["cached"] is False and os.listdir(cache) == [os.path.basename(prep.path)]
    assert prep.train.n_docs + prep.val.n_docs == len(docs)
    tok = prep.tokenizer
    assert tok.decode(prep.train.document(prep.train.n_docs - 1)[1:]) in docs[-100:]


# ---- hf: datasets, offline

def hf_cache(root, repo, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache holding one snapshot of a dataset repo, laid out as huggingface_hub does."""
    base = root / ("datasets--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    for name, write in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        write(snap / name)
    return str(root)


HF = """
import json, sys
from nano.data import prepare_data
preps = [prepare_data(spec, vocab_size=300, cache_dir=sys.argv[1], progress=False) for spec in sys.argv[2:]]
print(json.dumps([[p.train.n_docs, p.val.n_docs] for p in preps]))
"""


def test_hf_dataset_from_the_cache_with_the_network_off(tmp_path):
    pytest.importorskip("huggingface_hub")
    docs, other = varied_docs(60, seed=6), varied_docs(30, seed=7)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*\n" \
           "- config_name: small\n  data_files: small/*.parquet\n---\n# a test dataset\n"
    hub = hf_cache(tmp_path / "hub", "someone/stories", {
        "README.md": lambda p: p.write_text(card),
        "data/train-0.parquet": lambda p: pq.write_table(pa.table({"text": docs[:30]}), p),
        "data/train-1.parquet": lambda p: pq.write_table(pa.table({"text": docs[30:]}), p),
        "small/x.parquet": lambda p: pq.write_table(pa.table({"text": other}), p)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub, "PYTHONPATH": ROOT}
    cache = str(tmp_path / "cache")

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=ROOT)
    r = run("-c", HF, cache, "hf:someone/stories", "hf:someone/stories:small")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == [[59, 1], [29, 1]]  # the default config, then "small"
    r = run(os.path.join(ROOT, "train.py"), "--data", "hf:nobody/missing", "--device", "cpu",
            "--out-dir", str(tmp_path / "out"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("train.py: error: --data hf:nobody/missing: dataset 'nobody/missing' is not "
                             "in the Hugging Face cache")


# ---- the epoch plan of train.py

def test_epoch_plan():
    from nano.config import TrainConfig
    cfg = TrainConfig(max_steps=1000, warmup_steps=50, eval_every=100, ckpt_every=200)
    # the 124m default on a GPU: 262,144 tokens a step over ~8M tokens of stdlib is ~33 epochs
    new, notes = plan_epochs(cfg, 8_000_000, 262_144, cut=True)
    assert new.max_steps == 122 and new.warmup_steps == 12 and new.eval_every == 12 and new.ckpt_every == 24
    assert "32.8 epochs" in notes[0] and "cut to 4 epochs: 122 steps" in notes[1]
    same, notes = plan_epochs(cfg, 8_000_000, 262_144, cut=False)
    assert same == cfg and len(notes) == 2 and notes[1].startswith("warning: 32.8 epochs")
    few, notes = plan_epochs(cfg, 800_000_000, 262_144, cut=True)
    assert few == cfg and notes == ["data: 1,000 steps of 262,144 tokens make 0.328 epochs of the train split"]
