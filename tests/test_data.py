"""Corpora, cached shards, and the packed loader, checked against document ids computed independently."""
import base64
import hashlib
import io
import json
import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

import nano.data as data_mod
from nano.data import (PackedLoader, Shard, default_corpus_files, prepare_data, read_documents,
                       split_documents)
from nano.tokenizer import Tokenizer

DOCS = {  # a small folder corpus: nested, unicode, one document longer than the loader rows
    "a.txt": "def hello():\n    return 'world'\n" * 40,
    "b.md": "# Title\n\nSome prose with ünïcödé, 東京, and emoji 🙂.\n" * 30,
    "sub/c.py": "import os\nprint(os.getcwd())\n" * 25,
    "sub/deeper/d.txt": "short document <|bos|> with special-token text\n",
    "sub/e.txt": "\n".join(f"line {i}: the quick brown fox" for i in range(150)),
    "f.txt": "x = [1, 2, 3]\n" * 60,
}


def write_corpus(root, docs=DOCS):
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def prepared(corpus, tmp_path):
    return prepare_data(str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                        progress=False)


# ---- corpora

def test_default_corpus_is_the_stdlib():
    files = default_corpus_files()
    root = sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 100
    assert os.path.join(root, "os.py") in files
    assert all(f.endswith(".py") and f.startswith(root) for f in files)
    assert not any({"site-packages", "dist-packages"} & set(os.path.relpath(f, root).split(os.sep))
                   for f in files)


def test_folder_skips_binary_undecodable_empty_hidden(corpus):
    (corpus / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (corpus / "sub" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    docs, report = read_documents(str(corpus))
    assert sorted(docs) == sorted(DOCS.values())
    assert (report["skipped_binary"], report["skipped_undecodable"], report["skipped_empty"]) == (1, 1, 1)
    assert report["n_docs"] == len(DOCS) and report["n_files"] == len(DOCS) + 3


def test_text_file_is_one_document(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("héllo\nworld\n", encoding="utf-8")
    assert read_documents(str(p))[0] == ["héllo\nworld\n"]


def test_jsonl_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = ['{"text": "first"}', "{not json", '{"text": "second"}', "", '{"title": "no text"}',
             '[1, 2]', '{"text": 5}', '{"text": "lone \\ud800 surrogate"}']
    p.write_text("\n".join(lines) + "\n")
    docs, report = read_documents(str(p))
    assert docs == ["first", "second", "lone \ufffd surrogate"]
    assert report["bad_lines"] == 4 and report["bad_line_numbers"] == [2, 5, 6, 7]
    with pytest.raises(ValueError, match=r"d.jsonl:2: malformed line .*on_bad_line='skip'"):
        read_documents(str(p), on_bad_line="fail")
    with pytest.raises(ValueError, match=r"on_bad_line must be 'skip' or 'fail', got 'ignore'"):
        read_documents(str(p), on_bad_line="ignore")


def test_bad_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data '.*nope' does not exist: give a text file"):
        read_documents(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache"), progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"holds no documents .*1 binary"):
        read_documents(str(tmp_path / "empty"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"bin.txt' is binary \(not UTF-8 text\)"):
        read_documents(str(tmp_path / "bin.txt"))
    (tmp_path / "l1.txt").write_bytes("déjà".encode("latin-1"))
    with pytest.raises(ValueError, match=r"l1.txt' is undecodable \(not UTF-8 text\)"):
        read_documents(str(tmp_path / "l1.txt"))
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match=r"holds no documents .*1 empty"):
        read_documents(str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        prepare_data(str(tmp_path / "bin.txt"), val_fraction=0.0, cache_dir=str(tmp_path), progress=False)


def test_split_is_whole_documents_by_hash():
    docs = [f"document {i}\n" * (i + 1) for i in range(20)]
    train, val = split_documents(docs, 0.1)
    by_hash = sorted(docs, key=lambda d: hashlib.sha1(d.encode()).hexdigest())
    assert sorted(val) == sorted(by_hash[:2]) and sorted(train + val) == sorted(docs)
    assert split_documents(docs[::-1], 0.1)[1] == val[::-1]  # the same documents whatever the file order
    one = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([one], 0.1)
    assert train[0] + val[0] == one and val[0].startswith("line 90\n") and train[0].endswith("\n")


# ---- prepared shards

def test_shards_hold_bos_plus_tokens_of_every_document(prepared):
    tok = prepared.tokenizer
    assert tok.vocab_size == 300 and prepared.train.tokens.dtype == np.uint16
    assert isinstance(prepared.train.tokens, np.memmap) and prepared.train.doc_starts.dtype == np.int64
    seen = []
    for shard in (prepared.train, prepared.val):
        assert shard.doc_starts[0] == 0 and shard.doc_starts[-1] == len(shard.tokens)
        for i in range(shard.n_docs):
            doc = shard.document(i)
            assert doc[0] == tok.bos_id and tok.pad_id not in doc
            text = tok.decode(doc[1:])
            assert list(doc[1:]) == tok.encode(text)  # special-token text stayed plain text
            seen.append(text)
    assert sorted(seen) == sorted(DOCS.values())
    val = sorted(DOCS.values(), key=lambda d: hashlib.sha1(d.encode()).hexdigest())[:1]  # 20% of 6 docs
    assert [tok.decode(prepared.val.document(0)[1:])] == val
    n_targets = len(prepared.val.tokens) - prepared.val.n_docs
    assert prepared.bytes_per_token == pytest.approx(len(val[0].encode()) / n_targets)
    assert prepared.report["n_docs"] == len(DOCS) and prepared.report["cached"] is False


def test_shard_is_uint32_for_big_vocabularies(tmp_path, corpus):
    # a Llama-3 style file with 65,792 ranks (+256 specials): ids above 65,535 need uint32
    tokens = [bytes([i]) for i in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    path = tmp_path / "big.model"
    with open(path, "wb") as f:
        for rank, t in enumerate(tokens):
            f.write(base64.b64encode(t) + b" %d\n" % rank)
    prep = prepare_data(str(corpus), str(path), cache_dir=str(tmp_path / "cache"), progress=False)
    assert prep.tokenizer.vocab_size == 65792 + 256 and prep.train.tokens.dtype == np.uint32
    assert prep.train.document(0)[0] == prep.tokenizer.bos_id == 65792
    text = prep.tokenizer.decode(prep.train.document(0)[1:])
    assert list(prep.train.document(0)[1:]) == prep.tokenizer.encode(text) and text in DOCS.values()


def test_cache_is_reused(corpus, tmp_path, prepared, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(data_mod, "train_bpe", no_training)
    again = prepare_data(str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                         progress=False)
    assert again.report["cached"] is True and again.path == prepared.path
    assert np.array_equal(again.train.tokens, prepared.train.tokens)
    assert again.tokenizer.state() == prepared.tokenizer.state()


def test_cache_is_invalidated_by_changes(corpus, tmp_path, prepared):
    cache = str(tmp_path / "cache")
    other_vocab = prepare_data(str(corpus), vocab_size=280, cache_dir=cache, val_fraction=0.2, progress=False)
    assert other_vocab.path != prepared.path and other_vocab.tokenizer.vocab_size == 280
    (corpus / "a.txt").write_text("changed contents\n" * 10)
    changed = prepare_data(str(corpus), vocab_size=300, cache_dir=cache, val_fraction=0.2, progress=False)
    assert changed.path != prepared.path and changed.report["cached"] is False
    tok = changed.tokenizer
    texts = [tok.decode(s.document(i)[1:]) for s in (changed.train, changed.val) for i in range(s.n_docs)]
    assert "changed contents\n" * 10 in texts


@pytest.mark.parametrize("damage", ["no_meta", "incomplete_meta", "truncated_tokens", "missing_index"])
def test_damaged_cache_is_rebuilt(corpus, tmp_path, prepared, damage):
    folder = prepared.path
    expected = np.array(prepared.train.tokens)
    if damage == "no_meta":
        os.remove(os.path.join(folder, "meta.json"))
    elif damage == "incomplete_meta":
        with open(os.path.join(folder, "meta.json"), "w") as f:
            f.write('{"format": 1, "comp')
    elif damage == "truncated_tokens":
        with open(os.path.join(folder, "train.bin"), "r+b") as f:
            f.truncate(100)
    else:
        os.remove(os.path.join(folder, "val.idx.npy"))
    again = prepare_data(str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                         progress=False)
    assert again.report["cached"] is False and again.path == folder
    assert np.array_equal(np.array(again.train.tokens), expected)


def test_killed_build_leaves_nothing_that_is_read(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = data_mod._write_shards

    def dies_after_the_shards(*args):
        real(*args)
        raise KeyboardInterrupt  # killed after the shards were written, before meta.json
    monkeypatch.setattr(data_mod, "_write_shards", dies_after_the_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(corpus), vocab_size=300, cache_dir=str(cache), progress=False)
    assert os.listdir(cache) == []
    monkeypatch.setattr(data_mod, "_write_shards", real)
    # a SIGKILLed run leaves its temporary folder behind: it is never read, and removed later
    good = prepare_data(str(corpus), vocab_size=300, cache_dir=str(cache), progress=False)
    stale = good.path + ".tmp-999999999-1"
    shutil.copytree(good.path, stale)
    shutil.rmtree(good.path)
    again = prepare_data(str(corpus), vocab_size=300, cache_dir=str(cache), progress=False)
    assert again.report["cached"] is False and os.listdir(cache) == [os.path.basename(good.path)]


def test_single_text_file_and_jsonl(tmp_path):
    text = "".join(f"{i} the cat sat on the mat\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    cache = str(tmp_path / "c")
    prep = prepare_data(str(tmp_path / "t.txt"), vocab_size=270, cache_dir=cache, progress=False)
    tok = prep.tokenizer
    assert (prep.train.n_docs, prep.val.n_docs) == (1, 1)
    assert tok.decode(prep.train.document(0)[1:]) + tok.decode(prep.val.document(0)[1:]) == text
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n"
                                              for i in range(30)))
    prep = prepare_data(str(tmp_path / "d.jsonl"), vocab_size=270, cache_dir=cache, progress=False)
    assert (prep.train.n_docs, prep.val.n_docs) == (29, 1)


# ---- packed loader: a shard whose tokens are their own positions, so every token names its document

def position_shard(lengths):
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Shard(np.arange(starts[-1], dtype=np.uint32), starts, "train")


LENGTHS = [1, 50, 3, 7, 130, 2, 64, 65, 9, 300, 11, 1, 40]  # bos-only, shorter and longer than a row


def doc_of(shard, tokens):
    return np.searchsorted(shard.doc_starts, tokens, side="right") - 1


def test_batches_against_document_ids():
    shard = position_shard(LENGTHS)
    B, T = 3, 16
    loader = PackedLoader(shard, B, T, seed=1)
    is_start = np.zeros(len(shard.tokens) + 1, bool)
    is_start[shard.doc_starts] = True
    for _ in range(40):  # several epochs
        x, y, cu = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and cu.dtype == torch.int32
        assert x.shape == y.shape == (B, T) and cu[0] == 0 and cu[-1] == B * T
        x, y, cu = x.numpy(), y.numpy(), cu.numpy()
        flat = x.reshape(-1)
        last = is_start[x + 1]  # x is the last token of its document: the next one starts another
        assert np.array_equal(y, np.where(last, -100, x + 1))
        assert np.all(doc_of(shard, x[~last]) == doc_of(shard, y[~last]))
        # rows are consecutive pieces of the stream: after a document's last token comes a document start
        cur, nxt = flat[:-1], flat[1:]
        assert np.all(np.where(is_start[cur + 1], is_start[nxt], nxt == cur + 1))
        # cu_seqlens: row starts and document starts, and each segment holds one document
        expected = np.flatnonzero((np.arange(B * T) % T == 0) | is_start[flat])
        assert np.array_equal(cu[:-1], expected)
        for a, b in zip(cu[:-1], cu[1:]):
            seg = flat[a:b]
            assert np.all(doc_of(shard, seg) == doc_of(shard, seg[0])) and np.all(np.diff(seg) == 1)


def test_epoch_is_every_document_whole_and_once():
    shard = position_shard(LENGTHS)
    n, T, B = len(shard.tokens), 8, 2
    loader = PackedLoader(shard, B, T, seed=3)
    stream = np.concatenate([loader.next_batch()[0].numpy().reshape(-1) for _ in range(2 * n // (B * T) + 1)])
    epochs = [stream[:n], stream[n:2 * n]]
    for ep in epochs:
        pieces = np.split(ep, np.flatnonzero(np.isin(ep, shard.doc_starts[:-1])))[1:]
        assert sorted(p[0] for p in pieces) == sorted(shard.doc_starts[:-1])  # every document once
        for p in pieces:  # ... whole, in order
            d = doc_of(shard, p[0])
            assert np.array_equal(p, np.arange(shard.doc_starts[d], shard.doc_starts[d + 1]))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_efficiency_counts_real_targets():
    shard = position_shard(LENGTHS)
    loader = PackedLoader(shard, 2, 32)
    ys = [loader.next_batch()[1] for _ in range(7)]
    real = sum(int((y != -100).sum()) for y in ys)
    assert loader.efficiency == pytest.approx(real / (7 * 2 * 32)) and real < 7 * 2 * 32


def test_determinism_and_seed():
    shard = position_shard(LENGTHS)
    a, b, c = (PackedLoader(shard, 2, 16, seed=s) for s in (5, 5, 6))
    batches_a = [a.next_batch() for _ in range(10)]
    batches_b = [b.next_batch() for _ in range(10)]
    for ba, bb in zip(batches_a, batches_b):
        assert all(torch.equal(p, q) for p, q in zip(ba, bb))
    assert any(not torch.equal(ba[0], c.next_batch()[0]) for ba in batches_a)


def test_resume_gives_exactly_the_next_batch():
    shard = position_shard(LENGTHS)
    run = PackedLoader(shard, 2, 16, seed=7)
    for _ in range(13):  # past an epoch boundary
        run.next_batch()
    buf = io.BytesIO()
    torch.save({"loader": run.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["loader"]
    assert all(isinstance(v, int) for v in state.values())
    resumed = PackedLoader(shard, 2, 16, seed=0)  # the seed comes back from the state
    resumed.load_state_dict(state)
    for _ in range(12):
        assert all(torch.equal(p, q) for p, q in zip(run.next_batch(), resumed.next_batch()))
    assert resumed.efficiency == run.efficiency
    with pytest.raises(ValueError, match=r"loader state lacks \['pos'\]"):
        resumed.load_state_dict({"seed": 1})


def test_ranks_see_disjoint_data():
    shard = position_shard([400, 300, 250, 350, 200])  # 1500 tokens: 4 steps x 3 ranks x 2 x 32 < 1 epoch
    world, B, T, steps = 3, 2, 32, 4
    targets = []
    for rank in range(world):
        loader = PackedLoader(shard, B, T, seed=11, rank=rank, world_size=world)
        ys = np.concatenate([loader.next_batch()[1].numpy().reshape(-1) for _ in range(steps)])
        targets.append(set(ys[ys >= 0].tolist()))
    assert sum(map(len, targets)) == len(set().union(*targets))  # disjoint
    single = PackedLoader(shard, B * world, T, seed=11)
    ys = np.concatenate([single.next_batch()[1].numpy().reshape(-1) for _ in range(steps)])
    assert set(ys[ys >= 0].tolist()) == set().union(*targets)  # the same data as one big batch


def test_loader_on_prepared_shard(prepared):
    loader = PackedLoader(prepared.train, 2, 64)
    x, y, cu = loader.next_batch()
    bos = prepared.tokenizer.bos_id
    assert bool((x == bos).any()) and not bool((y == bos).any())  # bos starts documents, is never a target
    assert set(np.flatnonzero(x.numpy().reshape(-1) == bos)) <= set(cu.tolist())


def test_loader_bad_inputs():
    shard = position_shard([5, 6])
    with pytest.raises(ValueError, match=r"the train split has 11 tokens, fewer than one training row "
                                         r"\(seq_len \+ 1 = 12\): use more data or a smaller --seq-len"):
        PackedLoader(shard, 1, 11)
    PackedLoader(shard, 4, 10)  # a row fits: batches may wrap around epochs
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        PackedLoader(shard, 0, 4)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        PackedLoader(shard, 1, -1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        PackedLoader(shard, 1, 4, rank=2, world_size=2)


def test_tokenizer_saved_with_the_shards_loads(prepared):
    tok = Tokenizer.load(os.path.join(prepared.path, "tokenizer.tiktoken"))
    assert tok.state() == prepared.tokenizer.state()


def test_batches_feed_the_model_as_separate_documents():
    # the loss on packed rows with cu_seqlens equals the loss of every piece run on its own
    from nano.config import ModelConfig
    from nano.model import Transformer
    torch.manual_seed(0)
    lengths = [5, 40, 3, 100, 20]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.random.default_rng(0).integers(0, 100, starts[-1]).astype(np.uint16)
    x, y, cu = PackedLoader(Shard(tokens, starts), 2, 32, seed=2).next_batch()
    model = Transformer(ModelConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    _, loss = model(x, y, cu_seqlens=cu)
    total, count = 0.0, 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits, _ = model(x.reshape(-1)[a:b][None])
        t = y.reshape(-1)[a:b]
        total += torch.nn.functional.cross_entropy(logits[0].double(), t, reduction="sum").item()
        count += int((t != -100).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
