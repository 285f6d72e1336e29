"""Tokenizer and data on the CPU: BPE training time, encoding throughput, packed-loader throughput.

    python bench/tokenizer.py            # the default corpus (Python stdlib), vocab 8192
                                         # -> table, bench/results/tokenizer.json
    python bench/tokenizer.py --smoke    # 2 MB of it, vocab 1024: checks that the script runs

Figures, each with its baseline from the same run:
- train_bpe (8,192 tokens on the whole corpus; target < 60 s on 2 cores), and its chunk counting alone.
  Baseline: the naive trainer (recount every pair at every merge) on a 300 kB slice with 256 merges,
  against nano's trainer on the same slice; the naive one is far too slow for the full corpus.
- encoding MB/s of the whole corpus: Tokenizer.encode_batch (tiktoken, all cores) against encode on one
  thread. Before timing, decode(encode(doc)) == doc is checked for every document.
- PackedLoader tokens/s (B=8, T=1024, packed rows with cu_seqlens) against nanoGPT's get_batch (random
  offsets into the same memmap, no document boundaries).
"""
import argparse
import collections
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import regex
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nano.data import PackedLoader, Shard, read_documents  # noqa: E402
from nano.tokenizer import GPT4_SPLIT, count_chunks, train_bpe  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def naive_train(texts, n_merges):
    """The O(text)-per-merge toy: recount all pairs over all chunks at every merge."""
    words = collections.Counter(tuple(c.encode()) for t in texts for c in regex.findall(GPT4_SPLIT, t))
    for new in range(256, 256 + n_merges):
        pairs = collections.Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merged = collections.Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    vocab = 1024 if args.smoke else args.vocab_size
    load_before = os.getloadavg()

    docs, report = read_documents("")
    if args.smoke:
        docs = docs[:len(docs) // 15]
    n_bytes = sum(len(d.encode()) for d in docs)
    mb = n_bytes / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB, {os.cpu_count()} cores, {cpu_name()}")

    # ---- training
    _, t_count = timed(count_chunks, docs)
    tok, t_train = timed(train_bpe, docs, vocab, progress=False)
    slice_docs, slice_bytes = [], 0
    for d in docs:  # ~300 kB of whole documents for the naive baseline
        if slice_bytes > 300_000:
            break
        slice_docs.append(d)
        slice_bytes += len(d.encode())
    _, t_naive = timed(naive_train, slice_docs, 256)
    _, t_fast_slice = timed(train_bpe, slice_docs, 256 + 256 + 3, progress=False)

    # ---- encoding (round trip first)
    ids = tok.encode_batch(docs)
    assert all(tok.decode(i) == d for i, d in zip(ids, docs)), "round trip failed"
    n_tokens = sum(map(len, ids))
    _, t_enc1 = timed(lambda: [tok.encode(d) for d in docs])
    _, t_encn = timed(tok.encode_batch, docs)

    # ---- loader: packed rows vs nanoGPT get_batch over the same memmap
    B, T, n_batches = 8, 1024, 100 if args.smoke else 400
    with tempfile.TemporaryDirectory() as tmp:
        flat = np.concatenate([np.array([tok.bos_id, *i], np.uint16) for i in ids])
        flat.tofile(os.path.join(tmp, "t.bin"))
        mm = np.memmap(os.path.join(tmp, "t.bin"), dtype=np.uint16, mode="r")
        starts = np.cumsum([0] + [len(i) + 1 for i in ids]).astype(np.int64)
        loader = PackedLoader(Shard(mm, starts), B, T, seed=0)
        _, t_loader = timed(lambda: [loader.next_batch() for _ in range(n_batches)])
        rng = np.random.default_rng(0)

        def get_batch():  # nanoGPT train.py
            ix = rng.integers(len(mm) - T, size=B)
            x = torch.stack([torch.from_numpy(mm[i:i + T].astype(np.int64)) for i in ix])
            y = torch.stack([torch.from_numpy(mm[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
            return x, y
        _, t_getbatch = timed(lambda: [get_batch() for _ in range(n_batches)])
        efficiency = loader.efficiency
        del mm, loader

    rows = [
        ("train_bpe total (s)", t_train, "target < 60 s", 60.0),
        ("  chunk counting (s)", t_count, "part of the total", t_train),
        (f"train_bpe 256 merges, {slice_bytes / 1e3:.0f} kB (s)", t_fast_slice, "naive trainer (s)", t_naive),
        ("encode_batch, all cores (MB/s)", mb / t_encn, "encode, 1 thread (MB/s)", mb / t_enc1),
        (f"PackedLoader B={B} T={T} (Mtok/s)", n_batches * B * T / t_loader / 1e6,
         "nanoGPT get_batch (Mtok/s)", n_batches * B * T / t_getbatch / 1e6),
    ]
    print(f"\n{'figure':44s} {'value':>9s}   {'baseline':30s} {'value':>9s}")
    for name, v, bname, bv in rows:
        print(f"{name:44s} {v:9.2f}   {bname:30s} {bv:9.2f}")
    print(f"\nvocab {tok.vocab_size}: {n_tokens} tokens, {n_bytes / n_tokens:.2f} bytes/token; "
          f"packing efficiency {efficiency:.5f}")

    result = {
        "name": "tokenizer", "device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(),
        "torch": torch.__version__, "triton": _version("triton"), "tiktoken": _version("tiktoken"),
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/tokenizer.py" + (" --smoke" if args.smoke else ""),
        # the machine is shared: a load average above the core count means the figures are pessimistic
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "corpus": {"source": report["source"], "documents": len(docs), "bytes": n_bytes},
        "vocab_size": tok.vocab_size, "dtype": "uint16 tokens, int64 batches",
        "train_bpe": {"seconds": round(t_train, 2), "chunk_count_seconds": round(t_count, 2),
                      "target_seconds": 60, "meets_target": t_train < 60},
        "train_bpe_vs_naive": {"slice_bytes": slice_bytes, "merges": 256,
                               "nano_seconds": round(t_fast_slice, 3), "naive_seconds": round(t_naive, 2),
                               "speedup": round(t_naive / t_fast_slice, 1)},
        "encode": {"tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 3),
                   "encode_batch_MBps": round(mb / t_encn, 2), "encode_1thread_MBps": round(mb / t_enc1, 2),
                   "threads": os.cpu_count()},
        "loader": {"batch_size": B, "seq_len": T, "batches": n_batches,
                   "packed_Mtok_per_s": round(n_batches * B * T / t_loader / 1e6, 2),
                   "nanogpt_get_batch_Mtok_per_s": round(n_batches * B * T / t_getbatch / 1e6, 2),
                   "packing_efficiency": round(efficiency, 5)},
    }
    if not args.smoke:
        path = os.path.join(ROOT, "bench", "results", "tokenizer.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


def _version(mod):
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
