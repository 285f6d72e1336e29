"""Tokenizer: nano's own byte-level BPE trainer, wrapped in a tiktoken.Encoding for fast encoding.

A tokenizer is mergeable ranks (bytes -> rank; the 256 single bytes first, then one token per merge in
the order they were learned) plus special tokens after the last rank. Training follows GPT-4: split
the text with a regex into chunks (words, numbers, punctuation runs, whitespace), count the unique
chunks once, then repeatedly merge the most frequent adjacent pair, updating only the pair counts
of the chunks that contain it (a max-heap with lazy deletion finds the next pair).

Files: `save(path)` writes the ranks in tiktoken's BPE format (base64 token, space, rank per line;
the format of Meta Llama-3's `tokenizer.model`) and the special tokens and split pattern in
`path + ".special.json"`. A BPE file without that sidecar is read as Llama-3's (its regex, and its
256 special tokens numbered from the last rank + 1). Nothing is ever downloaded.
"""
import base64
import collections
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import unicodedata
import warnings
from concurrent.futures import ProcessPoolExecutor

import regex
import tiktoken
from tqdm import tqdm

# GPT-4's (cl100k_base) split pattern, verbatim from tiktoken: contractions, letters with one optional
# leading non-letter, numbers of at most 3 digits, punctuation runs, newlines, and whitespace that
# keeps its last space for the next word.
GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# Meta Llama-3 (llama_models/llama3/tokenizer.py; 3.1+ names, ids of bos/eos/pad/eot as in 3.0)
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
# GPT-2's split, as Hugging Face's ByteLevel pre-tokenizer applies it when use_regex is true
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")  # the Unicode normal forms a tokenizer.json may ask for
NANO_SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]  # pad is never in training data (nothing is padded)


class Tokenizer:
    """Mergeable ranks + special tokens, encoded and decoded by tiktoken (Rust, releases the GIL)."""

    def __init__(self, name, pat_str, mergeable_ranks, special_tokens, bos, eos, pad, normalizer=None):
        if normalizer not in (None, *NORMALIZERS):
            raise ValueError(f"normalizer must be None or one of {NORMALIZERS}, got {normalizer!r}")
        for role, tok in (("bos", bos), ("eos", eos), ("pad", pad)):
            if tok not in special_tokens:
                raise ValueError(f"{role} token {tok!r} is not among the special tokens "
                                 f"{list(special_tokens)}")
        self.name, self.pat_str = name, pat_str
        self.mergeable_ranks, self.special_tokens = dict(mergeable_ranks), dict(special_tokens)
        self.bos, self.eos, self.pad = bos, eos, pad
        self.normalizer = normalizer  # a Unicode normal form applied before splitting (Qwen: NFC), or None
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_id, self.eos_id, self.pad_id = (special_tokens[t] for t in (bos, eos, pad))

    @property
    def vocab_size(self):
        return self.enc.n_vocab  # largest id + 1, special tokens included

    def normalize(self, text):
        return unicodedata.normalize(self.normalizer, text) if self.normalizer else text

    def encode(self, text):
        # ordinary: "<|bos|>" typed in a document is text, never the special token
        return self.enc.encode_ordinary(self.normalize(text))

    def encode_batch(self, texts, num_threads=None):
        return self.enc.encode_ordinary_batch([self.normalize(t) for t in texts],
                                              num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids):
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        return self.enc.decode(list(ids))

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def hf_files(self):
        """tokenizer.json and tokenizer_config.json (as dicts) of a Hugging Face fast tokenizer that encodes
        and decodes exactly as this one: byte-level BPE behind the same split regex, the special tokens as
        added tokens, and <bos> put in front by default, as nano's data and sample.py do."""
        return {"tokenizer.json": self._hf_tokenizer_json(), "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos, "eos_token": self.eos,
            "pad_token": self.pad, "add_bos_token": True, "add_eos_token": False,
            # transformers 4 would otherwise "clean up" " ." to "." when decoding (5 skips it for BPE)
            "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]}}

    def _hf_tokenizer_json(self):
        # Hugging Face's BPE merges the pair of lowest merge rank; tiktoken merges the adjacent pair whose
        # bytes have the lowest token rank. So every split (a, b) of a token into two tokens is a merge,
        # ranked by the token. (Two different pairs making one token, both in a chunk at once, would be
        # taken leftmost first by tiktoken and in list order by Hugging Face; the tests found no such case.)
        # ignore_merges: a chunk that is a token is that token, as in tiktoken.
        chars = _byte_chars()
        text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
        ranked = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        merges = [f"{text(tok[:i])} {text(tok[i:])}" for tok, _ in ranked for i in range(1, len(tok))
                  if tok[:i] in self.mergeable_ranks and tok[i:] in self.mergeable_ranks]
        bos = {"SpecialToken": {"id": self.bos, "type_id": 0}}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}
                             for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": onig_pattern(self.pat_str)}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         bos, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {self.bos: {"id": self.bos, "ids": [self.bos_id], "tokens": [self.bos]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True,
                      "vocab": {text(tok): r for tok, r in ranked}, "merges": merges},
        }

    def fingerprint(self):
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d %s\n" % (rank, base64.b64encode(tok)))
        return h.hexdigest()

    # ---- persistence: a dict of plain values for checkpoints, or a BPE file + sidecar

    def _meta(self):
        # the normalizer only when there is one: the fingerprints (and data caches) of the others stay
        return {"name": self.name, "pat_str": self.pat_str, "special_tokens": self.special_tokens,
                "bos": self.bos, "eos": self.eos, "pad": self.pad,
                **({"normalizer": self.normalizer} if self.normalizer else {})}

    def state(self):
        # only str/int/bytes/list/dict: checkpoints holding it load with torch.load(weights_only=True)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {**self._meta(), "tokens": [t for t, _ in ranks], "ranks": [r for _, r in ranks]}

    @classmethod
    def from_state(cls, d):
        missing = {"name", "pat_str", "special_tokens", "bos", "eos", "pad", "tokens", "ranks"} - set(d)
        if missing:
            raise ValueError(f"tokenizer state lacks {sorted(missing)}; it was not made by Tokenizer.state()")
        return cls(d["name"], d["pat_str"], dict(zip(d["tokens"], d["ranks"])), d["special_tokens"],
                   d["bos"], d["eos"], d["pad"], d.get("normalizer"))

    def save(self, path):
        path = os.fspath(path)
        lines = [base64.b64encode(t) + b" %d\n" % r
                 for t, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
        _atomic_write(path, b"".join(lines))
        _atomic_write(path + ".special.json", json.dumps(self._meta(), indent=1).encode())

    @classmethod
    def load(cls, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"tokenizer {path!r} is a folder: give the file in it "
                                    "(e.g. tokenizer.model)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        ranks = read_bpe_file(path)
        side = path + ".special.json"
        if os.path.exists(side):
            try:
                with open(side) as f:
                    meta = json.load(f)
                return cls(meta["name"], meta["pat_str"], ranks, meta["special_tokens"],
                           meta["bos"], meta["eos"], meta["pad"], meta.get("normalizer"))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{side} is not a nano tokenizer sidecar ({e!r}); delete it to read {path} "
                                 "as a Llama-3 tokenizer.model, or save the tokenizer again") from None
        # a bare BPE file is Meta Llama-3's tokenizer.model: its specials follow the last rank (128000+)
        first = max(ranks.values()) + 1
        specials = {tok: first + i for i, tok in enumerate(LLAMA3_SPECIALS)}
        return cls(os.path.basename(path), LLAMA3_SPLIT, ranks, specials,
                   "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")


    @classmethod
    def from_hf(cls, path):
        """A Hugging Face byte-level BPE (GPT-2's, Qwen's, Llama-3's tokenizer.json, or a folder holding one):
        its vocab read back into tiktoken ranks, its added tokens as special tokens, the split regex of its
        pre-tokenizer, its normalizer, and bos/eos/pad from tokenizer_config.json where it names them.

        Differences from Hugging Face's encode that remain: an added token typed in the text is text here
        (nano's encode is ordinary), and a chunk that is itself a token is that token (tiktoken's rule,
        HF's ignore_merges) even where the merges would not build it."""
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist: give a tokenizer.json or the folder holding it")
        try:
            with open(file, encoding="utf-8") as f:
                tj = json.load(f)
        except ValueError as e:
            raise ValueError(f"{file} is not JSON ({str(e)[:80]}): give a Hugging Face tokenizer.json") \
                from None

        def refuse(why):
            return ValueError(f"{file}: {why}; nano reads only byte-level BPE tokenizers "
                              "(GPT-2, Llama-3, Qwen)")

        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise refuse(f"its model is {model.get('type')!r}, not BPE")
        if any(model.get(k) for k in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")):
            raise refuse("a BPE with byte fallback or sub-word affixes (SentencePiece style)")
        pat_str = _hf_split(tj.get("pre_tokenizer"), refuse)
        normalizer = _hf_normalizer(tj.get("normalizer"), refuse)
        vocab, added = model.get("vocab") or {}, {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
        byte_of = {c: b for b, c in _byte_chars().items()}
        ranks, added_ids = {}, set(added.values())
        for text, i in vocab.items():
            if i in added_ids:  # GPT-2 lists <|endoftext|> both in its vocab and as an added token
                continue
            if any(c not in byte_of for c in text):
                raise refuse(f"vocab token {text!r} is not in the byte-level alphabet")
            ranks[bytes(byte_of[c] for c in text)] = i
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise refuse(f"{len(missing)} single bytes are not tokens (e.g. {bytes([missing[0]])!r})")
        # tiktoken merges the adjacent pair that makes the lowest-numbered token, Hugging Face the pair listed
        # first: the same order when the tokens the merges make are numbered in the order of the merges
        last = -1
        for k, m in enumerate(model.get("merges") or []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            made = vocab.get(a + b)
            if made is None or a not in vocab or b not in vocab or made < last:
                raise refuse(f"merge {k} ({a!r} {b!r}) does not follow the vocabulary's numbering, so "
                             "tiktoken would split text differently")
            last = made
        if not added:
            raise refuse("no added tokens (nano needs an end-of-text token)")
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(file)), "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)

        def named(key, *fallbacks):  # the config's token when it is an added one, else the first fallback
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return next((t for t in (v, *fallbacks) if t in added), None)

        eos = named("eos_token", "<|endoftext|>", "<|end_of_text|>", "</s>") or min(added, key=added.get)
        # Qwen has no bos: its <|endoftext|> separates documents in pre-training, as bos does in nano's data
        bos = named("bos_token", "<|begin_of_text|>", "<s>", "<|endoftext|>") or eos
        pad = named("pad_token") or eos
        name = "hf-" + os.path.basename(os.path.dirname(os.path.abspath(file)))
        return cls(name, pat_str, ranks, added, bos, eos, pad, normalizer)


def _hf_split(pre, refuse):
    """The split regex of a byte-level pre-tokenizer: a Split (Isolated) then ByteLevel without its own
    regex (Llama-3, Qwen), or ByteLevel with its regex (GPT-2's)."""
    steps = [pre] if pre else []
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if kinds not in (["ByteLevel"], ["Split", "ByteLevel"]):
        raise refuse(f"pre-tokenizers {kinds} (nano knows ByteLevel, or Split then ByteLevel)")
    level = steps[-1]
    if level.get("add_prefix_space"):
        raise refuse("ByteLevel with add_prefix_space")
    if len(steps) == 1:
        if not level.get("use_regex", True):
            raise refuse("ByteLevel without a split regex")
        return GPT2_SPLIT
    split = steps[0]
    if level.get("use_regex", True) or split.get("behavior") != "Isolated" or split.get("invert") \
            or "Regex" not in (split.get("pattern") or {}):
        raise refuse("a Split other than an Isolated regex followed by ByteLevel(use_regex=false)")
    return split["pattern"]["Regex"]


def _hf_normalizer(norm, refuse):
    if norm and norm.get("type") == "Sequence" and len(norm.get("normalizers") or []) <= 1:
        norm = (norm.get("normalizers") or [None])[0]
    if norm is None or norm.get("type") in NORMALIZERS:
        return norm and norm["type"]
    raise refuse(f"normalizer {norm.get('type')!r} (nano applies none or one of {', '.join(NORMALIZERS)})")


def _atomic_write(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _byte_chars():
    """GPT-2's byte-level alphabet, which every byte-level tokenizer.json uses: byte -> a printable
    character, printable ASCII and Latin-1 bytes as themselves, the other 68 as chr(256 + n) in byte order
    (so no token string holds a space or a control character)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)}
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in keep else chr(256 + n)
        n += b not in keep
    return out


def onig_pattern(pat):
    """A split regex for Hugging Face tokenizers (Oniguruma), which reads a possessive interval such as
    GPT-4's \\p{N}{1,3}+ as "{1,3}, repeated", so 123456 would be one chunk: make it an atomic group."""
    return regex.sub(r"(\\p\{\w+\}|\\.|\[[^\]]*\]|[^\\()])(\{\d*,?\d*\})\+", r"(?>\1\2)", pat)


def read_bpe_file(path):
    """tiktoken BPE format: `base64(token) rank` per line. Errors name the line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}; "
                                 "not a tiktoken BPE file") from None
    if not ranks:
        raise ValueError(f"{path} holds no tokens; not a tiktoken BPE file")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: two tokens share a rank; not a tiktoken BPE file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} single-byte tokens (e.g. {bytes([missing[0]])!r}): "
                         "not a byte-level BPE, so some text could not be encoded")
    return ranks


# ---- named tiktoken encodings, from the local cache only

_TIKTOKEN_LOCK = threading.Lock()


class _NotCached(Exception):
    pass


def tiktoken_cache_dir():
    # the same lookup as tiktoken.load.read_file_cached
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_named(name):
    import tiktoken.load
    import tiktoken.registry

    def refuse(blobpath):  # tiktoken calls this only when the file is not (validly) in its cache
        raise _NotCached(blobpath)

    constructor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]
    with _TIKTOKEN_LOCK:
        read_file, tiktoken.load.read_file = tiktoken.load.read_file, refuse
        try:
            kw = constructor()
        except _NotCached as e:
            url, cache = e.args[0], tiktoken_cache_dir()
            where = os.path.join(cache or "<a folder>", hashlib.sha1(url.encode()).hexdigest())
            default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
            raise FileNotFoundError(
                f"tiktoken encoding {name!r} is not in the local tiktoken cache and nano never downloads: "
                f"fetch {url} on a machine with internet and save it as {where} (tiktoken's cache is "
                f"$TIKTOKEN_CACHE_DIR, else {default}), or pass the path of a tokenizer file instead"
            ) from None
        finally:
            tiktoken.load.read_file = read_file
    specials = dict(kw["special_tokens"])
    eot = "<|endoftext|>" if "<|endoftext|>" in specials else min(specials, key=specials.get)
    pad = "<|pad|>"  # the named encodings have none; a new id after the last one
    specials[pad] = max([*kw["mergeable_ranks"].values(), *specials.values()]) + 1
    return Tokenizer(name, kw["pat_str"], kw["mergeable_ranks"], specials, eot, eot, pad)


def load_tokenizer(spec):
    """A nano tokenizer file, a tiktoken BPE file (Llama-3 tokenizer.model), a Hugging Face tokenizer.json or
    a folder holding one, or a cached tiktoken name."""
    if not spec:
        raise ValueError("empty tokenizer spec: give a tokenizer file or a tiktoken encoding name "
                         "(leave --tokenizer empty to train nano's BPE on the corpus)")
    if os.path.isfile(os.path.join(spec, "tokenizer.json")) or (spec.endswith(".json")
                                                                and os.path.isfile(spec)):
        return Tokenizer.from_hf(spec)
    if os.path.exists(spec):
        return Tokenizer.load(spec)
    if spec in tiktoken.list_encoding_names():
        return _load_named(spec)
    raise FileNotFoundError(f"tokenizer {spec!r} is neither a file nor a tiktoken encoding name "
                            f"({', '.join(tiktoken.list_encoding_names())})")


# ---- training

def _count_chunks(texts, pat_str):
    pat, counts = regex.compile(pat_str), collections.Counter()
    for text in texts:
        counts.update(pat.findall(text))
    return counts


def _batches(texts, size, length=len):
    """Lists of texts of about `size` characters each, from any iterable (one pass, nothing held)."""
    batch, n = [], 0
    for t in texts:
        batch.append(t)
        n += length(t)
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def count_chunks(texts, pat_str=GPT4_SPLIT, *, workers=None, min_parallel=4 << 20, progress=False):
    """Counter of the regex chunks of all texts (any iterable, read once: only the counts are held), in
    worker processes once the texts pass `min_parallel` characters (regex holds the GIL)."""
    workers = workers or os.cpu_count() or 1
    batches = _batches(texts, 1 << 20)
    head, size = [], 0  # the batches read before deciding: a small corpus is not worth the processes
    for b in batches:
        head.append(b)
        size += sum(map(len, b))
        if size >= min_parallel:
            break
    parallel = workers > 1 and sys.platform == "linux" and size >= min_parallel
    total = collections.Counter()
    bar = tqdm(desc="bpe: count chunks", unit="char", unit_scale=True, disable=not progress)
    if not parallel:
        for b in itertools.chain(head, batches):
            total.update(_count_chunks(b, pat_str))
            bar.update(sum(map(len, b)))
        bar.close()
        return total
    # fork: no re-import of the caller's __main__ (train.py is a flat script without a main guard).
    # At most 2 batches per worker are in flight, so memory does not grow with the corpus.
    pending = collections.deque()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        for b in itertools.chain(head, batches):
            pending.append((ex.submit(_count_chunks, b, pat_str), sum(map(len, b))))
            while len(pending) > 2 * workers or (pending and pending[0][0].done()):
                fut, n = pending.popleft()
                total.update(fut.result())
                bar.update(n)
        for fut, n in pending:
            total.update(fut.result())
            bar.update(n)
    bar.close()
    return total


def train_bpe(texts, vocab_size, *, progress=True, pat_str=GPT4_SPLIT, name=None):
    """Byte-level BPE with `vocab_size` tokens in all (merges + 256 bytes + <|bos|> <|eos|> <|pad|>).

    `texts` may be any iterable (a generator streaming a corpus): it is read once and only the counts
    of its unique chunks are kept, so memory follows the variety of the text, not its size.

    Ties between equally frequent pairs go to the smallest (left id, right id), so training is
    deterministic. A merge whose bytes already exist as a token (same bytes, other split) reuses that
    token: tiktoken keys ranks by bytes. If the corpus runs out of pairs the vocabulary is smaller.
    """
    if isinstance(texts, str):
        texts = [texts]
    n_special = len(NANO_SPECIALS)
    if not isinstance(vocab_size, int) or vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be an int >= {256 + n_special} (256 bytes + {n_special} special "
                         f"tokens), got {vocab_size!r}")
    chunks = count_chunks(texts, pat_str, progress=progress)
    words, freqs = [], []  # each unique chunk as a list of token ids, and how often it occurs
    for chunk, f in chunks.items():
        b = chunk.encode("utf-8")
        if len(b) > 1:
            words.append(list(b))
            freqs.append(f)
    del chunks

    counts = collections.defaultdict(int)  # pair -> occurrences in the corpus
    where = collections.defaultdict(set)  # pair -> indices of the words that (may) contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(wi)
    # max-heap of (-count, pair): entries go stale when a count drops; they are fixed when popped
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ids = {b: i for i, b in enumerate(vocab)}
    n_merges = vocab_size - 256 - n_special
    bar = tqdm(total=n_merges, desc="bpe merges", disable=not progress, mininterval=0.5)
    while len(vocab) < 256 + n_merges and heap:
        negc, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c != -negc:  # stale: push back with its true count
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        a, b = pair
        merged = vocab[a] + vocab[b]
        new = ids.get(merged)
        if new is None:
            new = ids[merged] = len(vocab)
            vocab.append(merged)
            bar.update()
        changed = set()
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            i, n = 0, len(w)
            while i < n - 1:
                if w[i] == a and w[i + 1] == b:
                    # the neighbours' pairs move from a / b to the new token
                    if i > 0:
                        x = w[i - 1]
                        counts[x, a] -= f
                        counts[x, new] += f
                        where[x, new].add(wi)
                        changed.add((x, new))
                    if i + 2 < n:
                        y = w[i + 2]
                        counts[b, y] -= f
                        counts[new, y] += f
                        where[new, y].add(wi)
                        changed.add((new, y))
                    w[i:i + 2] = [new]
                    n -= 1
                i += 1
        counts.pop(pair)  # every occurrence was merged (left to right, so none is left)
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    bar.close()
    if len(vocab) < 256 + n_merges:
        warnings.warn(f"the corpus ran out of pairs after {len(vocab) - 256} merges: vocab_size is "
                      f"{len(vocab) + n_special}, not {vocab_size}")
    specials = {tok: len(vocab) + i for i, tok in enumerate(NANO_SPECIALS)}
    return Tokenizer(name or f"nano-bpe-{len(vocab) + n_special}", pat_str, ids, specials, *NANO_SPECIALS)
