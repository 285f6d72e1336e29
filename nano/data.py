"""Data: corpora, tokenize-once into memory-mapped shards, and a packed loader yielding (x, y, cu_seqlens).

- Corpus: by default the Python standard library's `.py` files (one file = one document). `--data`
  takes a text file (one document), a folder (every file below it is a document; binary and non-UTF-8
  files are skipped and counted; .parquet files in it are read by rows), a `.jsonl` / `.jsonl.gz` file
  with a "text" field per line, `.parquet` files with a "text" column, or `hf:OWNER/NAME[:CONFIG]` (the
  parquet files of a Hugging Face dataset, fetched into the huggingface_hub cache on first use).
- prepare_data() streams, so a corpus larger than memory works: pass 1 reads every document to count them
  and choose the validation documents, pass 2 trains nano's BPE on a bounded sample of the training
  documents (or --tokenizer is loaded), pass 3 tokenizes every document as [bos] + tokens and appends it
  to `train.bin` / `val.bin` (flat uint16 tokens, uint32 when the vocabulary is larger than 65,536), then
  `*.idx.npy` (document starts), into $NANO_CACHE/<name>-<hash> (default ~/.cache/nano). The hash covers
  the corpus (file names, sizes, mtimes, inodes, ctimes), the tokenizer, the split and the sizes, so a
  second run loads at once. A folder is built under a temporary name and renamed into place with
  `meta.json` written last: a run killed half-way leaves nothing that is ever read.
- The validation split is a fixed set of whole documents: those whose text has the smallest SHA-1
  (independent of file order, and stable when documents are added), val_fraction of them, at most
  MAX_VAL_DOCS. A single document is cut at a line
  break instead, its tail held out.
- PackedLoader lays the documents of each epoch (shuffled by seed and epoch) back to back in one
  stream and cuts consecutive rows of seq_len + 1 tokens out of it (rows overlap by one token, so every
  token is a target once per epoch). Targets that are the first token of another document are -100, and
  so are those whose Shard.mask is False (chat data: only the assistant turns are trained, nano.chat).
"""
import array
import collections
import fnmatch
import gzip
import hashlib
import heapq
import json
import os
import re
import shutil
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nano.config import TrainConfig
from nano.tokenizer import Tokenizer, _batches, load_tokenizer, train_bpe

FORMAT = 1  # bump when the cache layout or the tokenization changes: old caches are then never read
IGNORE = -100
TOKENIZER_TRAIN_BYTES = TrainConfig.tokenizer_train_bytes  # the BPE learns from a sample this large
MAX_VAL_DOCS = 10_000  # held-out documents at most: plenty for eval_steps batches, not 1% of 30 GB
MAX_EPOCHS = 4  # more passes over one corpus and a model starts to memorise it


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


def _corpus_files(path, max_bytes=0):
    if path == "":
        return default_corpus_files()
    if path.startswith("hf:"):
        return hf_parquet_files(path, max_bytes)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path!r} does not exist: give a text file, a folder of text files, "
                                "a .jsonl / .jsonl.gz file with a 'text' field, .parquet files with a 'text' "
                                "column, hf:OWNER/NAME[:CONFIG], or nothing for the Python stdlib corpus")
    return _folder_files(path) if os.path.isdir(path) else [path]


def _decode(data):
    """Text of a file, or the reason it is not text."""
    if b"\0" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "undecodable"


def _new_report(path, files):
    return {"source": path or f"python stdlib ({sysconfig.get_paths()['stdlib']})", "n_files": len(files),
            "skipped_binary": 0, "skipped_undecodable": 0, "skipped_empty": 0, "skipped_examples": [],
            "bad_lines": 0, "bad_line_numbers": []}


def iter_documents(path, files, report, *, on_bad_line="skip"):
    """The documents of a --data value one at a time (nothing else is held), counting what is skipped.

    A .jsonl / .jsonl.gz given by itself is one document per line; a .parquet file (alone, in a folder or
    from hf:) is one document per row of its "text" column; any other file is one document.
    """
    if on_bad_line not in ("skip", "fail"):
        raise ValueError(f"on_bad_line must be 'skip' or 'fail', got {on_bad_line!r}")
    single = os.path.isfile(path)  # a file named by itself must be readable; in a folder it is skipped
    for f in files:
        if f.endswith(".parquet"):
            yield from _read_parquet(f, report)
        elif single and f.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(f, on_bad_line, report)
        else:
            with open(f, "rb") as fh:
                text, why = _decode(fh.read())
            if why and single:
                raise ValueError(f"--data {path!r} is {why} (not UTF-8 text); give a UTF-8 text file, "
                                 "a folder, a .jsonl file or .parquet files")
            if why or not text:
                why = why or "empty"
                report[f"skipped_{why}"] += 1
                if len(report["skipped_examples"]) < 5:
                    report["skipped_examples"].append(f"{f} ({why})")
                continue
            yield text


def _no_documents(path, report):
    return ValueError(f"--data {path!r} holds no documents (no non-empty UTF-8 text; skipped: "
                      f"{report['skipped_binary']} binary, {report['skipped_undecodable']} undecodable, "
                      f"{report['skipped_empty']} empty, {report['bad_lines']} bad lines)")


def read_documents(path, *, on_bad_line="skip"):
    """(documents, report) for a --data value; "" is the Python standard library. All in memory: for
    small corpora and tests; prepare_data streams instead."""
    files = _corpus_files(path)
    report = _new_report(path, files)
    docs = list(iter_documents(path, files, report, on_bad_line=on_bad_line))
    if not docs:
        raise _no_documents(path, report)
    report["n_docs"] = len(docs)
    return docs, report


def _read_jsonl(path, on_bad_line, report):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
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
                yield text
            else:
                report["skipped_empty"] += 1


def _read_parquet(path, report):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow: pip install 'nano[data]' (or pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ValueError(f"{path} has no 'text' column (its columns: {', '.join(names)}); nano reads "
                         "each row's document from 'text'")
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):  # a row group is read in pieces
        for text in batch.column(0).to_pylist():
            if text:
                yield text
            else:
                report["skipped_empty"] += 1


def hf_parquet_files(spec, max_bytes=0):
    """Local paths of the parquet files of `hf:OWNER/NAME[:CONFIG]` (its train split), fetched into the
    Hugging Face cache on first use (resumable, with progress bars), only as many files as hold
    `max_bytes` when that is > 0. With HF_HUB_OFFLINE=1 or no network, what is cached is used."""
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
        from huggingface_hub.hf_api import RepoFile
    except ImportError:
        raise ImportError("--data hf:... needs huggingface_hub: pip install 'nano[data]'") from None
    repo, _, config = spec.removeprefix("hf:").partition(":")
    try:
        if constants.HF_HUB_OFFLINE:
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
        sizes = {f.path: f.size for f in HfApi().list_repo_tree(repo, repo_type="dataset", recursive=True)
                 if isinstance(f, RepoFile)}
        readme = hf_hub_download(repo, "README.md", repo_type="dataset") if "README.md" in sizes else None
        wanted = _hf_pick(sizes, readme, config, max_bytes, spec)
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=wanted)
    except (OSError, HfHubHTTPError) as online_error:  # offline, no network, or no such dataset
        try:
            folder = snapshot_download(repo, repo_type="dataset", local_files_only=True)
        except (OSError, HfHubHTTPError):
            raise FileNotFoundError(
                f"--data {spec}: dataset {repo!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                f"and could not be fetched ({str(online_error).splitlines()[0][:100]}); run once with the "
                "network on, or give local files") from None
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()}
        readme = os.path.join(folder, "README.md") if "README.md" in sizes else None
        wanted = _hf_pick(sizes, readme, config, max_bytes, spec)
    return [os.path.join(folder, f) for f in wanted]


def _hf_pick(sizes, readme, config, max_bytes, spec):
    """The parquet files (sorted) of the config's train split per the dataset card's `configs:` list (all
    parquet files when the card has none); with max_bytes, the first files holding that many bytes."""
    patterns = ["*.parquet", "**/*.parquet"]
    configs = []
    if readme:
        import yaml  # a dependency of huggingface_hub
        text = Path(readme).read_text(encoding="utf-8")
        if text.startswith("---"):
            configs = (yaml.safe_load(text.split("---")[1]) or {}).get("configs") or []
    if config or configs:
        names = [c.get("config_name", "default") for c in configs]
        match = [c for c in configs if c.get("config_name", "default") == (config or "default")]
        if not match:
            raise ValueError(f"--data {spec}: no config {config or 'default'!r} in the dataset card; it has "
                             f"{', '.join(names) or 'none'}")
        files = match[0].get("data_files", patterns)
        if isinstance(files, list) and files and isinstance(files[0], dict):  # [{split, path}, ...]
            files = next((d["path"] for d in files if d.get("split") == "train"), files[0]["path"])
        patterns = [files] if isinstance(files, str) else list(files)
    chosen = sorted(f for f in sizes if f.endswith(".parquet")
                    and any(fnmatch.fnmatch(f, p) for p in patterns))
    if not chosen:
        raise FileNotFoundError(f"--data {spec}: no parquet files matching {patterns} (have: "
                                f"{', '.join(sorted(sizes)[:10]) or 'nothing'})")
    if max_bytes:  # compressed parquet holds more text than its size: these files hold max_bytes at least
        total = np.cumsum([sizes[f] for f in chosen])
        chosen = chosen[:int(np.searchsorted(total, max_bytes)) + 1]
    return chosen


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
    mask: np.ndarray | None = None  # (n_tokens,) bool: False = never a target (chat context); None = all

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


def _scan(docs, val_fraction, max_val_docs, progress):
    """One pass over the documents: (n_docs, n_bytes, val), val the indices of the documents with the
    smallest SHA-1 of their text (as split_documents), at most max_val_docs of them. Holds only a heap of
    max_val_docs (hash, index) pairs."""
    heap, n, n_bytes = [], 0, 0  # a max-heap of the smallest (hash, index) so far, as (-hash, -index)
    bar = tqdm(desc="read", unit="doc", unit_scale=True, disable=not progress)
    for n, d in enumerate(docs, 1):
        b = d.encode()
        n_bytes += len(b)
        item = (-int.from_bytes(hashlib.sha1(b).digest(), "big"), -(n - 1))
        if len(heap) < max_val_docs:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
        if n % 1000 == 0:
            bar.update(1000)
            bar.set_postfix(MB=f"{n_bytes / 1e6:,.0f}")
    bar.close()
    n_val = min(max(1, round(n * val_fraction)), n - 1, max_val_docs)
    return n, n_bytes, {-i for _, i in sorted(heap, reverse=True)[:n_val]}


def _split(docs, val, n_docs, val_fraction):
    """(split, text) for each document in corpus order; a corpus of one document is cut in two."""
    for i, d in enumerate(docs):
        if n_docs == 1:
            train, held = split_documents([d], val_fraction)
            yield from [("train", t) for t in train] + [("val", t) for t in held]
        else:
            yield ("val" if i in val else "train"), d


def _prefix(texts, max_bytes):
    """The texts until they hold max_bytes of UTF-8 (whole texts: the last one crosses it)."""
    total = 0
    for t in texts:
        if total >= max_bytes:
            return
        total += len(t.encode())
        yield t


def _write_shards(folder, pairs, tok, dtype, total_bytes, progress):
    """Tokenize (split, text) pairs in threads (tiktoken releases the GIL) and append them to
    {split}.bin in corpus order, with at most 2 batches per thread in flight: memory does not grow
    with the corpus. Then {split}.idx.npy (document starts)."""
    workers = os.cpu_count() or 1
    bos = np.array([tok.bos_id], dtype)

    def encode(batch):
        # encode_to_numpy skips Python ints; no special tokens allowed = ordinary text, like tok.encode
        return [(split, tok.enc.encode_to_numpy(tok.normalize(t), disallowed_special=()).astype(dtype),
                 t.encode())
                for split, t in batch]

    splits = ("train", "val")
    out = {s: open(os.path.join(folder, f"{s}.bin"), "wb") for s in splits}
    lens = {s: array.array("q") for s in splits}  # 8 bytes a document: 80 MB for FineWeb-Edu's 10M
    sha = {s: hashlib.sha256() for s in splits}  # of the documents' text joined by "\0", in meta.json
    n_bytes = dict.fromkeys(splits, 0)
    n_tokens = 0
    bar = tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, disable=not progress)

    def write(results):
        nonlocal n_tokens
        for split, ids, text in results:
            out[split].write(bos.tobytes())
            out[split].write(ids.tobytes())
            if lens[split]:
                sha[split].update(b"\0")
            sha[split].update(text)
            lens[split].append(len(ids) + 1)
            n_tokens += len(ids) + 1
            n_bytes[split] += len(text)
            bar.update(len(text))
        bar.set_postfix(docs=f"{len(lens['train']) + len(lens['val']):,}",
                        tokens=f"{n_tokens:,}", refresh=False)

    pending = collections.deque()
    try:
        with ThreadPoolExecutor(workers) as ex:
            for batch in _batches(pairs, 1 << 20, length=lambda p: len(p[1])):  # ~1 MB of text each
                pending.append(ex.submit(encode, batch))
                if len(pending) > 2 * workers:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
    finally:
        for f in out.values():
            f.close()
    bar.close()
    stats = {}
    for s in splits:
        starts = np.concatenate([[0], np.cumsum(np.frombuffer(lens[s], np.int64))]).astype(np.int64)
        np.save(os.path.join(folder, f"{s}.idx.npy"), starts)
        stats[s] = {"n_docs": len(lens[s]), "n_tokens": int(starts[-1]), "n_bytes": n_bytes[s],
                    "sha256": sha[s].hexdigest()}
    return stats


def _cache_key(data, files, tokenizer, vocab_size, val_fraction, sizes):
    """(folder name, loaded tokenizer or None): the hash covers everything the shards depend on."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "data": os.path.abspath(data) if data and not
                                   data.startswith("hf:") else data,
                                   "vocab_size": vocab_size if not tokenizer else None,
                                   "val_fraction": val_fraction, **sizes}).encode())
    # names and metadata, no content: a start need not read 31 MB to find its cache. Rewriting a file
    # changes its ctime (a new copy also its inode) even when size and mtime are kept (cp -p, an edit
    # within the mtime granularity); the content hashes are in the cache's meta.json.
    for f in files:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None:
        h.update(tok.fingerprint().encode())
    label = re.sub(r"[^\w.-]", "_", Path(data.split(":")[1] if data.startswith("hf:") else data).stem or "data")
    tok_label = Path(tokenizer).stem if tokenizer else f"bpe{vocab_size}"
    return f"{label if data else 'stdlib'}-{tok_label}-{h.hexdigest()[:16]}", tok


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
                 on_bad_line="skip", progress=True, tokenizer_train_bytes=TOKENIZER_TRAIN_BYTES,
                 data_max_bytes=0, max_val_docs=MAX_VAL_DOCS):
    """Tokenize the corpus once into cached shards; later calls with the same arguments load them.

    Streams: pass 1 reads every document once to count them and choose the validation documents, pass 2
    trains the BPE on the first `tokenizer_train_bytes` of the training documents, pass 3 tokenizes
    everything into the shards. Memory stays bounded whatever the corpus size. `data_max_bytes` > 0
    takes only the corpus's first documents holding that many bytes; at most `max_val_docs` documents
    (and val_fraction of them) are held out.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if on_bad_line not in ("skip", "fail"):
        raise ValueError(f"on_bad_line must be 'skip' or 'fail', got {on_bad_line!r}")
    root = cache_dir or default_cache_dir()
    files = _corpus_files(data, data_max_bytes)
    sizes = {"tokenizer_train_bytes": tokenizer_train_bytes, "data_max_bytes": data_max_bytes,
             "max_val_docs": max_val_docs}
    name, tok = _cache_key(data, files, tokenizer, vocab_size, val_fraction, sizes)
    folder = os.path.join(root, name)
    if (cached := _load_cached(folder)) is not None:
        return cached

    t0 = time.time()
    report = _new_report(data, files)

    def documents(report):
        docs = iter_documents(data, files, report, on_bad_line=on_bad_line)
        return _prefix(docs, data_max_bytes) if data_max_bytes else docs

    n_docs, n_bytes, val = _scan(documents(report), val_fraction, max_val_docs, progress)
    if not n_docs:
        raise _no_documents(data, report)
    report["n_docs"] = n_docs
    pairs = lambda: _split(documents(_new_report(data, files)), val, n_docs, val_fraction)  # noqa: E731
    if tok is None:
        train_texts = (t for split, t in pairs() if split == "train")
        tok = train_bpe(_prefix(train_texts, tokenizer_train_bytes), vocab_size, progress=progress)
    dtype = token_dtype(tok.vocab_size)
    _remove_dead_tmp(folder)
    tmp = f"{folder}.tmp-{os.getpid()}-{time.time_ns()}"
    os.makedirs(tmp)
    try:
        tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
        stats = _write_shards(tmp, pairs(), tok, dtype, n_bytes, progress)
        tr, va = stats["train"], stats["val"]
        # val targets are the tokens after each document's bos
        n_targets = va["n_tokens"] - va["n_docs"] if va["n_docs"] else tr["n_tokens"] - tr["n_docs"]
        bpt = (va["n_bytes"] if va["n_docs"] else tr["n_bytes"]) / max(n_targets, 1)
        report.update(tokenizer=tokenizer or "nano BPE trained on the train split", vocab_size=tok.vocab_size,
                      n_train_docs=tr["n_docs"], n_val_docs=va["n_docs"], n_train_tokens=tr["n_tokens"],
                      n_val_tokens=va["n_tokens"], n_bytes=tr["n_bytes"] + va["n_bytes"],
                      bytes_per_token=bpt, prepare_seconds=round(time.time() - t0, 2))
        meta = {"format": FORMAT, "complete": True, "bytes_per_token": bpt,
                "sha256": {s: stats[s]["sha256"] for s in stats}, "report": report}
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


def plan_epochs(cfg, n_train_tokens, tokens_per_step, *, cut):
    """(cfg, notes): how many epochs of the train split the run makes, a warning above MAX_EPOCHS, and
    with `cut` (train.py: a GPU, the default corpus, no --max-steps) max_steps cut to MAX_EPOCHS epochs,
    the warmup (at most 10% of the steps), evaluation and checkpoint intervals scaled with it."""
    epochs = cfg.max_steps * tokens_per_step / n_train_tokens
    notes = [f"data: {cfg.max_steps:,} steps of {tokens_per_step:,} tokens make {epochs:.3g} epochs of the "
             "train split"]
    if epochs <= MAX_EPOCHS:
        return cfg, notes
    if not cut:
        notes.append(f"warning: {epochs:.1f} epochs of one corpus: the model will memorise it; give a larger "
                     "--data or fewer --max-steps")
        return cfg, notes
    steps = max(1, int(MAX_EPOCHS * n_train_tokens // tokens_per_step))
    scale = steps / cfg.max_steps
    cfg = replace(cfg, max_steps=steps, warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)),
                  eval_every=max(1, round(cfg.eval_every * scale)),
                  ckpt_every=max(1, round(cfg.ckpt_every * scale)))
    notes.append(f"the default corpus is small for a GPU run: cut to {MAX_EPOCHS} epochs: {steps} steps, "
                 f"warmup {cfg.warmup_steps}, eval every {cfg.eval_every} (choose with --max-steps, or give "
                 "a larger --data)")
    return cfg, notes


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
        if shard.mask is not None and len(shard.mask) != len(shard):
            raise ValueError(f"the {shard.name} split's mask has {len(shard.mask)} entries for {len(shard)} "
                             "tokens: build the mask with the tokens (nano.chat.prepare_chat)")
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
        """Stream tokens [start, start + n) as int64, a mask of the positions that start a document, and the
        shard's mask of those tokens (None when it has none)."""
        out, is_start = np.empty(n, np.int64), np.zeros(n, bool)
        tokens, starts, mask = self.shard.tokens, self.shard.doc_starts, self.shard.mask
        keep = None if mask is None else np.empty(n, bool)
        filled = 0
        while filled < n:  # one iteration per document piece: documents are long, pieces are few
            epoch, off = divmod(start + filled, self.epoch_len)
            perm, ends = self._order(epoch)
            j = int(np.searchsorted(ends, off, side="right"))
            doc = perm[j]
            inner = off - (int(ends[j]) - int(self.lens[doc]))  # offset inside the document
            take = min(int(self.lens[doc]) - inner, n - filled)
            out[filled:filled + take] = tokens[starts[doc] + inner:starts[doc] + inner + take]
            if keep is not None:  # a long conversation is cut like a long document: its mask with it
                keep[filled:filled + take] = mask[starts[doc] + inner:starts[doc] + inner + take]
            is_start[filled] = inner == 0
            filled += take
        return out, is_start, keep

    def next_batch(self):
        B, T = self.B, self.T
        toks, is_start, keep = self._span(self.pos + self.rank * B * T, B * T + 1)
        self.pos += self.world_size * B * T
        x = toks[:-1].reshape(B, T)
        y = toks[1:].copy()
        ignore = is_start[1:]  # the target would be the first token of another document
        if keep is not None:
            ignore = ignore | ~keep[1:]  # or a token the model only reads (a chat's prompt and headers)
        y[ignore] = IGNORE
        bounds = is_start[:-1].copy()
        bounds[::T] = True  # every row starts a sequence
        cu = np.append(np.flatnonzero(bounds), B * T).astype(np.int32)
        self.n_seen += B * T
        self.n_targets += B * T - int(ignore.sum())
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
