"""Data: corpora, tokenize-once into memory-mapped shards, and a packed loader yielding (x, y, cu_seqlens).

- Corpus: by default the Python standard library's `.py` files (one file = one document). `--data`
  takes a text file (one document), a folder (every file below it is a document; binary and non-UTF-8
  files are skipped and counted), or a `.jsonl` file with a "text" field per line.
- prepare_data() trains nano's BPE on the training documents (or loads --tokenizer), tokenizes every
  document once as [bos] + tokens, and writes `train.bin` / `val.bin` (flat uint16 tokens, uint32 when
  the vocabulary is larger than 65,536) with `*.idx.npy` (document starts) into
  $NANO_CACHE/<name>-<hash> (default ~/.cache/nano). The hash covers the corpus (file names, sizes,
  mtimes, inodes, ctimes), the tokenizer and the split, so a second run loads at once. A folder is built
  under a temporary name and renamed into place with `meta.json` written last: a run killed half-way
  leaves nothing that is ever read.
- The validation split is a fixed set of whole documents: those whose text has the smallest SHA-1
  (independent of file order, and stable when documents are added). A single document is cut at a line
  break instead, its tail held out.
- PackedLoader lays the documents of each epoch (shuffled by seed and epoch) back to back in one
  stream and cuts consecutive rows of seq_len + 1 tokens out of it (rows overlap by one token, so every
  token is a target once per epoch). Targets that are the first token of another document are -100.
"""
import hashlib
import json
import os
import shutil
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nano.tokenizer import Tokenizer, load_tokenizer, train_bpe

FORMAT = 1  # bump when the cache layout or the tokenization changes: old caches are then never read
IGNORE = -100


def default_cache_dir():
    return os.environ.get("NANO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nano")


# ---- corpora

def default_corpus_files():
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, subdirs, names in os.walk(root):
        # installed packages live below the stdlib: ~130 MB that would swamp it and change per install
        subdirs[:] = [s for s in subdirs if s not in ("site-packages", "dist-packages")]
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return sorted(f for f in files if os.path.isfile(f))


def _folder_files(path):
    # hidden files and folders (.git, .DS_Store) are not documents
    return sorted(str(p) for p in Path(path).rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def _corpus_files(path):
    if path == "":
        return default_corpus_files()
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path!r} does not exist: give a text file, a folder of text files, "
                                "a .jsonl file with a 'text' field, or nothing for the Python stdlib corpus")
    return _folder_files(path) if os.path.isdir(path) else [path]


def _decode(data):
    """Text of a file, or the reason it is not text."""
    if b"\0" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "undecodable"


def read_documents(path, *, on_bad_line="skip"):
    """(documents, report) for a --data value; "" is the Python standard library."""
    if on_bad_line not in ("skip", "fail"):
        raise ValueError(f"on_bad_line must be 'skip' or 'fail', got {on_bad_line!r}")
    files = _corpus_files(path)
    report = {"source": path or f"python stdlib ({sysconfig.get_paths()['stdlib']})", "n_files": len(files),
              "skipped_binary": 0, "skipped_undecodable": 0, "skipped_empty": 0, "skipped_examples": [],
              "bad_lines": 0, "bad_line_numbers": []}
    docs = []
    if os.path.isfile(path) and path.endswith(".jsonl"):
        docs = _read_jsonl(path, on_bad_line, report)
    else:
        for f in files:
            with open(f, "rb") as fh:
                text, why = _decode(fh.read())
            if why and os.path.isfile(path):
                raise ValueError(f"--data {path!r} is {why} (not UTF-8 text); give a UTF-8 text file, "
                                 "a folder, or a .jsonl file")
            if why or not text:
                why = why or "empty"
                report[f"skipped_{why}"] += 1
                if len(report["skipped_examples"]) < 5:
                    report["skipped_examples"].append(f"{f} ({why})")
                continue
            docs.append(text)
    if not docs:
        raise ValueError(f"--data {path!r} holds no documents (no non-empty UTF-8 text; skipped: "
                         f"{report['skipped_binary']} binary, {report['skipped_undecodable']} undecodable, "
                         f"{report['skipped_empty']} empty, {report['bad_lines']} bad lines)")
    report["n_docs"] = len(docs)
    return docs, report


def _read_jsonl(path, on_bad_line, report):
    docs = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError('no string "text" field')
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                if on_bad_line == "fail":
                    raise ValueError(f"{path}:{lineno}: malformed line ({str(e)[:80]}); fix it or skip "
                                     "bad lines (on_bad_line='skip')") from None
                report["bad_lines"] += 1
                if len(report["bad_line_numbers"]) < 20:
                    report["bad_line_numbers"].append(lineno)
                continue
            text = rec["text"]
            try:
                text.encode()
            except UnicodeEncodeError:  # lone surrogates from JSON escapes: replaced, as tiktoken would
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            if text:
                docs.append(text)
            else:
                report["skipped_empty"] += 1
    return docs


def split_documents(docs, val_fraction):
    """(train, val): the val documents are those with the smallest SHA-1 of their text."""
    if len(docs) == 1:  # one document (a single text file): hold out its tail, cut at a line break
        doc = docs[0]
        cut = int(len(doc) * (1 - val_fraction))
        nl = doc.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        if 0 < cut < len(doc):
            return [doc[:cut]], [doc[cut:]]
        return docs, []
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    keys = [hashlib.sha1(d.encode()).digest() for d in docs]
    val = set(sorted(range(len(docs)), key=keys.__getitem__)[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# ---- shards

@dataclass
class Shard:
    """Flat tokens of one split (each document is [bos] + tokens) and where each document starts."""
    tokens: np.ndarray  # (n_tokens,) uint16 / uint32, usually a read-only np.memmap
    doc_starts: np.ndarray  # (n_docs + 1,) int64; doc_starts[-1] == n_tokens
    name: str = "train"

    @property
    def n_docs(self):
        return len(self.doc_starts) - 1

    def __len__(self):
        return len(self.tokens)

    def document(self, i):
        return self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]]


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Shard
    val: Shard
    bytes_per_token: float  # UTF-8 bytes per target token of the val split: bpb = loss / ln(2) / this
    report: dict = field(default_factory=dict)
    path: str = ""


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _load_shard(folder, split, dtype):
    starts = np.load(os.path.join(folder, f"{split}.idx.npy"))
    n = int(starts[-1])
    path = os.path.join(folder, f"{split}.bin")
    if os.path.getsize(path) != n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} has the wrong size")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    return Shard(tokens, starts, split)


def _write_shard(folder, split, docs, tok, dtype, progress):
    """Tokenize docs (threads: tiktoken releases the GIL) into {split}.bin / {split}.idx.npy."""
    batches, batch, size = [], [], 0
    for d in docs:  # ~1 MB batches: big enough to keep threads busy, small enough for a smooth bar
        batch.append(d)
        size += len(d)
        if size > (1 << 20):
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)

    bos = np.array([tok.bos_id], dtype)

    def encode(batch):
        # encode_to_numpy skips Python ints; no special tokens allowed = ordinary text, like tok.encode
        ids = [tok.enc.encode_to_numpy(d, disallowed_special=()) for d in batch]
        flat = np.concatenate([a for t in ids for a in (bos, t.astype(dtype))])
        return flat, np.array([len(t) + 1 for t in ids], np.int64), sum(len(d.encode()) for d in batch)

    lens, n_bytes = [np.zeros(1, np.int64)], 0
    bar = tqdm(total=sum(map(len, docs)), desc=f"tokenize {split}", unit="char", unit_scale=True,
               disable=not progress)
    with open(os.path.join(folder, f"{split}.bin"), "wb") as out, \
            ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        for (flat, ln, nb), batch in zip(ex.map(encode, batches), batches):
            out.write(flat.tobytes())
            lens.append(ln)
            n_bytes += nb
            bar.update(sum(map(len, batch)))
    bar.close()
    starts = np.cumsum(np.concatenate(lens))
    np.save(os.path.join(folder, f"{split}.idx.npy"), starts)
    return {"n_docs": len(docs), "n_tokens": int(starts[-1]), "n_bytes": n_bytes}


def _cache_key(data, tokenizer, vocab_size, val_fraction):
    """(folder name, loaded tokenizer or None): the hash covers everything the shards depend on."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "data": os.path.abspath(data) if data else "",
                                   "vocab_size": vocab_size if not tokenizer else None,
                                   "val_fraction": val_fraction}).encode())
    # names and metadata, no content: a start need not read 31 MB to find its cache. Rewriting a file
    # changes its ctime (a new copy also its inode) even when size and mtime are kept (cp -p, an edit
    # within the mtime granularity); the content hashes are in the cache's meta.json.
    for f in _corpus_files(data):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None:
        h.update(tok.fingerprint().encode())
    label = Path(data).stem if data else "stdlib"
    tok_label = Path(tokenizer).stem if tokenizer else f"bpe{vocab_size}"
    return f"{label}-{tok_label}-{h.hexdigest()[:16]}", tok


def _load_cached(folder):
    """PreparedData from a complete cache folder, else None (missing, half-written, or damaged)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or not meta.get("complete"):
            return None
        tok = Tokenizer.load(os.path.join(folder, "tokenizer.tiktoken"))
        dtype = token_dtype(tok.vocab_size)
        train, val = _load_shard(folder, "train", dtype), _load_shard(folder, "val", dtype)
        if train.n_docs != meta["report"]["n_train_docs"] or val.n_docs != meta["report"]["n_val_docs"]:
            return None
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return PreparedData(tok, train, val, meta["bytes_per_token"], {**meta["report"], "cached": True}, folder)


def _remove_dead_tmp(folder):
    """Delete the temporary folders of runs that were killed while building `folder`."""
    parent, base = os.path.split(folder)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        if name.startswith(base + ".tmp-"):
            try:
                pid = int(name[len(base) + 5:].split("-")[0])
                os.kill(pid, 0)  # raises if no such process
            except (ValueError, ProcessLookupError):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except PermissionError:  # alive, someone else's
                pass


def prepare_data(data="", tokenizer="", vocab_size=8192, *, cache_dir=None, val_fraction=0.01,
                 on_bad_line="skip", progress=True):
    """Tokenize the corpus once into cached shards; later calls with the same arguments load them."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    root = cache_dir or default_cache_dir()
    name, tok = _cache_key(data, tokenizer, vocab_size, val_fraction)
    folder = os.path.join(root, name)
    if (cached := _load_cached(folder)) is not None:
        return cached

    t0 = time.time()
    docs, report = read_documents(data, on_bad_line=on_bad_line)
    train_docs, val_docs = split_documents(docs, val_fraction)
    del docs
    if tok is None:
        tok = train_bpe(train_docs, vocab_size, progress=progress)
    dtype = token_dtype(tok.vocab_size)
    _remove_dead_tmp(folder)
    tmp = f"{folder}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(tmp)
    try:
        tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
        tr = _write_shard(tmp, "train", train_docs, tok, dtype, progress)
        va = _write_shard(tmp, "val", val_docs, tok, dtype, progress)
        # val targets are the tokens after each document's bos
        n_targets = va["n_tokens"] - va["n_docs"] if va["n_docs"] else tr["n_tokens"] - tr["n_docs"]
        bpt = (va["n_bytes"] if va["n_docs"] else tr["n_bytes"]) / max(n_targets, 1)
        report.update(tokenizer=tokenizer or "nano BPE trained on the train split", vocab_size=tok.vocab_size,
                      n_train_docs=tr["n_docs"], n_val_docs=va["n_docs"], n_train_tokens=tr["n_tokens"],
                      n_val_tokens=va["n_tokens"], n_bytes=tr["n_bytes"] + va["n_bytes"],
                      bytes_per_token=bpt, prepare_seconds=round(time.time() - t0, 2))
        sha256 = {split: hashlib.sha256("\0".join(d).encode()).hexdigest()  # of what the shards hold
                  for split, d in (("train", train_docs), ("val", val_docs))}
        meta = {"format": FORMAT, "complete": True, "bytes_per_token": bpt, "sha256": sha256,
                "report": report}
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: its presence marks a complete folder
            json.dump(meta, f, indent=1)
        if os.path.exists(folder) and _load_cached(folder) is None:  # damaged, or half-written by a
            shutil.rmtree(folder, ignore_errors=True)  # run killed before this layout: never read, replaced
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first (it is complete): use it
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load_cached(folder)
    if loaded is None:
        raise RuntimeError(f"could not read back the prepared data in {folder}; delete it and retry")
    loaded.report["cached"] = False
    return loaded


# ---- packed loader

class PackedLoader:
    """Batches (x, y, cu_seqlens) of whole documents packed back to back, infinite over epochs.

    Each epoch is a permutation of all documents (seeded by (seed, epoch)) laid end to end in a stream;
    global batch k is the B * world_size rows starting at stream token k * B * world_size * T, and rank r
    takes B consecutive rows of it: ranks see disjoint targets, and the state is one stream position.
    """

    def __init__(self, shard, batch_size, seq_len, *, seed=0, rank=0, world_size=1):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(shard) < seq_len + 1:
            raise ValueError(f"the {shard.name} split has {len(shard)} tokens, fewer than one training row "
                             f"(seq_len + 1 = {seq_len + 1}): use more data or a smaller --seq-len")
        self.shard, self.B, self.T = shard, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lens = np.diff(shard.doc_starts)
        self.epoch_len = int(shard.doc_starts[-1])
        self.pos = 0  # stream position where the next global batch starts
        self.n_targets = self.n_seen = 0
        self._epochs = {}

    @property
    def efficiency(self):
        """Fraction of target positions that were real targets (not -100) so far."""
        return self.n_targets / self.n_seen if self.n_seen else 1.0

    @property
    def epoch(self):
        return self.pos // self.epoch_len

    def _order(self, epoch):
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.shard.n_docs)
            ends = np.cumsum(self.lens[perm])  # end of each document in the epoch's stream
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}
            self._epochs[epoch] = (perm, ends)
        return self._epochs[epoch]

    def _span(self, start, n):
        """Stream tokens [start, start + n) as int64, and a mask of the positions that start a document."""
        out, is_start = np.empty(n, np.int64), np.zeros(n, bool)
        tokens, starts = self.shard.tokens, self.shard.doc_starts
        filled = 0
        while filled < n:  # one iteration per document piece: documents are long, pieces are few
            epoch, off = divmod(start + filled, self.epoch_len)
            perm, ends = self._order(epoch)
            j = int(np.searchsorted(ends, off, side="right"))
            doc = perm[j]
            inner = off - (int(ends[j]) - int(self.lens[doc]))  # offset inside the document
            take = min(int(self.lens[doc]) - inner, n - filled)
            out[filled:filled + take] = tokens[starts[doc] + inner:starts[doc] + inner + take]
            is_start[filled] = inner == 0
            filled += take
        return out, is_start

    def next_batch(self):
        B, T = self.B, self.T
        toks, is_start = self._span(self.pos + self.rank * B * T, B * T + 1)
        self.pos += self.world_size * B * T
        x = toks[:-1].reshape(B, T)
        y = toks[1:].copy()
        y[is_start[1:]] = IGNORE  # the target would be the first token of another document
        bounds = is_start[:-1].copy()
        bounds[::T] = True  # every row starts a sequence
        cu = np.append(np.flatnonzero(bounds), B * T).astype(np.int32)
        self.n_seen += B * T
        self.n_targets += B * T - int(is_start[1:].sum())
        return torch.from_numpy(x), torch.from_numpy(y.reshape(B, T)), torch.from_numpy(cu)

    def state_dict(self):
        return {"pos": self.pos, "seed": self.seed, "n_targets": self.n_targets, "n_seen": self.n_seen}

    def load_state_dict(self, sd):
        missing = {"pos", "seed"} - set(sd)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}; it was not made by "
                             "PackedLoader.state_dict()")
        self.pos, self.seed = int(sd["pos"]), int(sd["seed"])
        self.n_targets, self.n_seen = int(sd.get("n_targets", 0)), int(sd.get("n_seen", 0))
        self._epochs = {}
