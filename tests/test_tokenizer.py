"""nano's BPE trainer against a naive reference, the tiktoken wrapper, files, and named encodings."""
import base64
import collections
import hashlib
import io
import os
import random
import socket
import sysconfig

import pytest
import regex
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from nano.tokenizer import GPT4_SPLIT, Tokenizer, count_chunks, load_tokenizer, read_bpe_file, train_bpe


def stdlib_text(*names):
    root = sysconfig.get_paths()["stdlib"]
    return [open(os.path.join(root, n), encoding="utf-8").read() for n in names]


# ---- a naive reference: recount every pair over every chunk at each merge (the O(text) per merge toy)

def _merge(word, pair, new):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def naive_train(texts, n_merges):
    """Merges [(pair, new_id)] by most frequent pair, ties to the smallest pair; bytes -> id."""
    words = collections.Counter(tuple(c.encode()) for t in texts for c in regex.findall(GPT4_SPLIT, t))
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((pair, len(vocab)))
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        new_words = collections.Counter()
        for w, f in words.items():
            new_words[_merge(w, pair, len(vocab) - 1)] += f
        words = new_words
    return merges, {b: i for i, b in enumerate(vocab)}


def naive_encode(text, merges):
    """Classic BPE: split, then apply the learned merges to each chunk in the order they were learned."""
    out = []
    for chunk in regex.findall(GPT4_SPLIT, text):
        w = tuple(chunk.encode())
        for pair, new in merges:
            w = _merge(w, pair, new)
        out += w
    return out


def random_text(rng, n):
    ranges = [(0x20, 0x7e), (0xa0, 0x2ff), (0x370, 0x52f), (0x4e00, 0x4fff), (0xac00, 0xacff),
              (0x1f300, 0x1f6ff), (0x0, 0x1f), (0xe000, 0xe0ff), (0x10000, 0x10ffff)]  # no surrogates
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


@pytest.fixture(scope="module")
def small_corpus():
    texts = stdlib_text("colorsys.py", "keyword.py")
    texts.append("naïve café — 東京タワー 🙂🙃 ünïcödé " * 3)
    return texts


@pytest.fixture(scope="module")
def trained(small_corpus):
    return train_bpe(small_corpus, 256 + 200 + 3, progress=False)


# ---- trainer

def test_hand_checked_merges():
    # "aaabdaaabac" (one regex chunk): aa (4 times, overlapping) -> 256; then "ab" and "Za" both occur twice
    # and the tie goes to the smaller pair (97, 98) -> "ab" 257; then (256, 257) twice -> "aaab" 258; then
    # four pairs once each and the smallest is (97, 99) -> "ac" 259.
    tok = train_bpe(["aaabdaaabac"], 256 + 4 + 3, progress=False)
    merged = {t: r for t, r in tok.mergeable_ranks.items() if r >= 256}
    assert merged == {b"aa": 256, b"ab": 257, b"aaab": 258, b"ac": 259}
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, 259]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (260, 261, 262, 263)


def test_counts_are_weighted_across_chunks():
    # "qz" is one unique chunk seen 5 times; "ab" is in 3 unique chunks once each: (q, z) wins 5 to 3
    tok = train_bpe(["qz"] * 5 + ["ab", "cab", "dab"], 256 + 1 + 3, progress=False)
    assert [t for t, r in tok.mergeable_ranks.items() if r == 256] == [b"qz"]


def test_trainer_matches_naive_reference(small_corpus, trained):
    merges, ranks = naive_train(small_corpus, 200)
    assert len(merges) == 200
    assert trained.mergeable_ranks == ranks


def test_encoding_equals_greedy_merge_order(small_corpus, trained):
    merges, _ = naive_train(small_corpus, 200)
    rng = random.Random(0)
    unseen = stdlib_text("bisect.py")[0][:3000]
    for text in [*small_corpus, unseen, random_text(rng, 300), "  \n\n\t x  y  \r\n  ", "1234567 3.14159"]:
        assert trained.encode(text) == naive_encode(text, merges)


def test_chunk_counts_in_worker_processes(small_corpus):
    texts = small_corpus * 3
    expected = collections.Counter(c for t in texts for c in regex.findall(GPT4_SPLIT, t))
    assert count_chunks(texts, workers=2, min_parallel=0) == expected
    assert count_chunks(texts, workers=1) == expected


def test_training_is_deterministic(small_corpus, trained):
    assert train_bpe(small_corpus, 256 + 200 + 3, progress=False).mergeable_ranks == trained.mergeable_ranks


def test_runs_out_of_pairs_with_a_warning():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = train_bpe(["abab"], 1000, progress=False)
    assert sorted(tok.mergeable_ranks.values()) == list(range(len(tok.mergeable_ranks)))
    assert tok.vocab_size == len(tok.mergeable_ranks) + 3 < 1000
    assert tok.decode(tok.encode("abab ba")) == "abab ba"


@pytest.mark.parametrize("bad", [258, 0, -5, 300.0, "8192"])
def test_bad_vocab_size(bad):
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 259 \(256 bytes \+ 3 special"):
        train_bpe(["hello"], bad, progress=False)


# ---- the tiktoken wrapper

def test_round_trip(trained):
    rng = random.Random(1)
    texts = ["", " ", "\n", "héllo wörld", "日本語のテキストと中文", "emoji 👩‍👩‍👧‍👦🏳️‍🌈🙂", "\x00\x01\x7f",
             "a" * 1000, "\ufffd\ufeff\U0010ffff"]
    texts += [random_text(rng, rng.randint(1, 200)) for _ in range(50)]
    for text in texts:
        ids = trained.encode(text)
        assert all(0 <= i < trained.vocab_size - 3 for i in ids)  # ordinary text never gives specials
        assert trained.decode(ids) == text
    assert trained.encode("") == []
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.decode(torch.tensor(trained.encode("tensor ids"))) == "tensor ids"


def test_special_token_text_is_plain_text(trained):
    ids = trained.encode("<|bos|> x <|eos|><|pad|>")
    assert not {trained.bos_id, trained.eos_id, trained.pad_id} & set(ids)
    assert trained.decode(ids) == "<|bos|> x <|eos|><|pad|>"
    assert trained.decode([trained.bos_id, *trained.encode("hi"), trained.eos_id]) == "<|bos|>hi<|eos|>"


def test_save_load_in_tiktoken_format(trained, tmp_path):
    path = tmp_path / "tok.tiktoken"
    trained.save(path)
    # tiktoken's own reader parses the file, and every line is "base64 rank"
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == trained.mergeable_ranks
    first = path.read_bytes().splitlines()[0].split()
    assert base64.b64decode(first[0]) == b"\x00" and first[1] == b"0"
    assert (tmp_path / "tok.tiktoken.special.json").exists()
    loaded = Tokenizer.load(str(path))
    assert loaded.special_tokens == trained.special_tokens
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == \
        (trained.bos_id, trained.eos_id, trained.pad_id, trained.vocab_size)
    text = "def f(x):\n    return 'é🙂'\n"
    assert loaded.encode(text) == trained.encode(text)
    assert load_tokenizer(str(path)).fingerprint() == trained.fingerprint()


def test_state_survives_weights_only_checkpoint(trained):
    buf = io.BytesIO()
    torch.save({"tokenizer": trained.state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["tokenizer"]
    tok = Tokenizer.from_state(state)
    assert tok.mergeable_ranks == trained.mergeable_ranks and tok.special_tokens == trained.special_tokens
    assert tok.encode("x = 1 + 2") == trained.encode("x = 1 + 2")
    with pytest.raises(ValueError, match=r"tokenizer state lacks \['ranks', 'tokens'\]"):
        Tokenizer.from_state({k: v for k, v in state.items() if k not in ("ranks", "tokens")})


# ---- Llama-3 style tiktoken files

def write_bpe(path, tokens):
    with open(path, "wb") as f:
        for rank, tok in enumerate(tokens):
            f.write(base64.b64encode(tok) + b" %d\n" % rank)


def test_small_llama3_style_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    write_bpe(path, [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b" w", b"or", b" wor"])
    tok = load_tokenizer(str(path))
    # tiktoken merges the lowest rank first: "he", "ll", then "hell"; " w", "or", then " wor"
    assert tok.encode("hello world") == [258, ord("o"), 261, ord("l"), ord("d")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (262, 263, 266)
    assert tok.special_tokens["<|eot_id|>"] == 271 and tok.vocab_size == 262 + 256
    assert tok.decode(tok.encode("hello 🙂 world")) == "hello 🙂 world"


def test_llama3_ids_on_a_full_size_file(tmp_path):
    # 128,000 ranks like Meta's tokenizer.model: the special tokens must land on Llama-3's ids
    tokens = [bytes([i]) for i in range(256)]
    tokens += [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([97, b, c]) for b in range(256) for c in range(256)][:128000 - len(tokens)]
    path = tmp_path / "tokenizer.model"
    write_bpe(path, tokens)
    tok = load_tokenizer(str(path))
    st = tok.special_tokens
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert (st["<|start_header_id|>"], st["<|end_header_id|>"], st["<|eot_id|>"]) == (128006, 128007, 128009)
    assert st["<|reserved_special_token_246|>"] == 128255 and tok.vocab_size == 128256 == len(st) + 128000
    assert tok.decode(tok.encode("The quick brown fox")) == "The quick brown fox"


def test_bad_bpe_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(base64.b64encode(b"a") + b" 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.model:2: expected 'base64-token rank'"):
        read_bpe_file(str(bad))
    partial = tmp_path / "partial.model"
    write_bpe(partial, [bytes([i]) for i in range(200)])
    with pytest.raises(ValueError, match=r"lacks 56 single-byte tokens .*not a byte-level BPE"):
        load_tokenizer(str(partial))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="holds no tokens"):
        load_tokenizer(str(empty))
    with pytest.raises(FileNotFoundError, match="tokenizer file .* does not exist"):
        Tokenizer.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="is neither a file nor a tiktoken encoding name"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="empty tokenizer spec"):
        load_tokenizer("")
    with pytest.raises(IsADirectoryError, match="is a folder: give the file in it"):
        load_tokenizer(str(tmp_path))
    good = tmp_path / "good.tiktoken"
    write_bpe(good, [bytes([i]) for i in range(256)])
    (tmp_path / "good.tiktoken.special.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match=r"good.tiktoken.special.json is not a nano tokenizer sidecar"):
        load_tokenizer(str(good))


# ---- named tiktoken encodings: only from the local cache, never the network

@pytest.fixture
def no_network(monkeypatch):
    tries = []

    def refuse(self, *args, **kwargs):
        tries.append(args)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tries


@pytest.mark.parametrize("name", ["cl100k_base", "gpt2"])
def test_uncached_named_encoding_says_how_to_provide_it(name, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(name)
    msg = str(e.value)
    assert f"tiktoken encoding {name!r} is not in the local tiktoken cache" in msg
    assert "never downloads" in msg
    url = msg.split("fetch ")[1].split()[0]
    assert url.startswith("https://")
    assert os.path.join(str(tmp_path), hashlib.sha1(url.encode()).hexdigest()) in msg  # where to put it
    assert no_network == []
    assert tiktoken.load.read_file.__name__ == "read_file"  # the guard was undone


def test_cached_named_encoding_loads(tmp_path, monkeypatch, no_network):
    url = "https://example.invalid/nano_test.tiktoken"

    def constructor():
        return {"name": "nano_test", "pat_str": GPT4_SPLIT,
                "mergeable_ranks": tiktoken.load.load_tiktoken_bpe(url),
                "special_tokens": {"<|endoftext|>": 257}}
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "nano_test", constructor)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    write_bpe(tmp_path / hashlib.sha1(url.encode()).hexdigest(), [bytes([i]) for i in range(256)] + [b"ab"])
    tok = load_tokenizer("nano_test")
    assert tok.encode("abc") == [256, ord("c")]
    assert tok.bos_id == tok.eos_id == 257 and tok.pad_id == 258 and tok.vocab_size == 259
    os.remove(tmp_path / hashlib.sha1(url.encode()).hexdigest())
    with pytest.raises(FileNotFoundError, match=f"fetch {url} on a machine with internet"):
        load_tokenizer("nano_test")
    assert no_network == []
