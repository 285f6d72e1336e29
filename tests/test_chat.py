"""Chat templates against ids and strings written out here (Meta's ChatFormat recipe, Qwen's ChatML), the
assistant mask, chat data files, masked packing against a naive re-derivation, and Tokenizer.from_hf
against Hugging Face's own encoder."""
import gzip
import hashlib
import json

import numpy as np
import pytest

from nano.chat import (NANO_CHAT_TOKENS, chat_token_ids, check_messages, data_kind, end_of_turn_id,
                       prepare_chat, read_conversations, render, template, with_chat_tokens)
from nano.data import IGNORE, PackedLoader, Shard, prepare_data
from nano.tokenizer import LLAMA3_SPECIALS, LLAMA3_SPLIT, Tokenizer, load_tokenizer, train_bpe

TEXT = ("You are a helpful assistant. What is the capital of France? The capital of France is Paris.\n"
        "Please write a short poem about the sea. The sea is wide, the sea is deep, its waves sing me to "
        "sleep. Thank you! You're welcome. 1234 + 5678 = 6912; café naïve résumé\n") * 20
CONVO = [{"role": "system", "content": "  Be brief.\n"},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris.  "},
         {"role": "user", "content": "A poem, please."},
         {"role": "assistant", "content": "The sea is wide,\nthe sea is deep."}]
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@pytest.fixture(scope="module")
def base():
    return train_bpe(TEXT, 360, progress=False)


@pytest.fixture(scope="module")
def llama3(base):
    first = max(base.mergeable_ranks.values()) + 1  # Meta numbers its 256 specials after the last rank
    specials = {t: first + i for i, t in enumerate(LLAMA3_SPECIALS)}
    return Tokenizer("llama3-test", LLAMA3_SPLIT, base.mergeable_ranks, specials, "<|begin_of_text|>",
                     "<|end_of_text|>", "<|finetune_right_pad_id|>")


@pytest.fixture(scope="module")
def chatml(base):
    first = max(base.mergeable_ranks.values()) + 1
    specials = {"<|endoftext|>": first, "<|im_start|>": first + 1, "<|im_end|>": first + 2}
    return Tokenizer("chatml-test", QWEN_SPLIT, base.mergeable_ranks, specials, "<|endoftext|>",
                     "<|im_end|>", "<|endoftext|>")


# ---- templates

def test_llama3_is_meta_chatformat(llama3):
    enc = llama3.encode
    first = max(llama3.mergeable_ranks.values()) + 1
    # Meta's ids: <|begin_of_text|> 128000, <|start_header_id|> 128006, <|end_header_id|> 128007,
    # <|eot_id|> 128009, i.e. the last rank + 1 + (0, 6, 7, 9)
    bot, sh, eh, eot = first, first + 6, first + 7, first + 9

    def header(role):  # ChatFormat.encode_header
        return [sh, *enc(role), eh, *enc("\n\n")]

    expected, mask = [bot], [False]
    for role, content in [("system", "Be brief."), ("user", "What is the capital of France?"),
                          ("assistant", "Paris."), ("user", "A poem, please."),
                          ("assistant", "The sea is wide,\nthe sea is deep.")]:  # content.strip()
        body = enc(content) + [eot]
        expected += header(role) + body
        mask += [False] * len(header(role)) + [role == "assistant"] * len(body)
    assert template(llama3) == "llama3"
    assert render(llama3, CONVO) == (expected, mask)
    # encode_dialog_prompt itself always ends with the assistant header: the generation prompt
    ids, m = render(llama3, CONVO, add_generation_prompt=True)
    assert ids == expected + header("assistant") and m == mask + [False] * len(header("assistant"))
    assert chat_token_ids(llama3) == [sh, eh, eot] and end_of_turn_id(llama3) == eot


def test_chatml_string_and_mask(chatml):
    text = ("<|im_start|>system\n  Be brief.\n<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.  <|im_end|>\n"
            "<|im_start|>user\nA poem, please.<|im_end|>\n"
            "<|im_start|>assistant\nThe sea is wide,\nthe sea is deep.<|im_end|>\n")
    ids, mask = render(chatml, CONVO)
    assert template(chatml) == "chatml"
    assert chatml.decode(ids) == text
    assert ids == chatml.enc.encode(text, allowed_special="all")  # tiktoken splitting at the specials
    start, end = chatml.special_tokens["<|im_start|>"], chatml.special_tokens["<|im_end|>"]
    trained = [i for i, m in zip(ids, mask) if m]
    poem = "The sea is wide,\nthe sea is deep."
    assert trained == chatml.encode("Paris.  ") + [end] + chatml.encode(poem) + [end]
    # each trained run starts right after "<|im_start|>assistant\n" and ends at <|im_end|> (its "\n" is not)
    runs = np.flatnonzero(np.diff(np.r_[0, np.array(mask, int), 0]))
    for s, e in zip(runs[::2], runs[1::2]):
        head = max(i for i in range(s) if ids[i] == start)
        assert chatml.decode(ids[head:s]) == "<|im_start|>assistant\n" and ids[e - 1] == end
        assert not mask[e] and chatml.decode([ids[e]]) == "\n"
    gen, gmask = render(chatml, CONVO, add_generation_prompt=True)
    assert chatml.decode(gen) == text + "<|im_start|>assistant\n"
    assert gmask == mask + [False] * (len(gen) - len(ids))
    assert chat_token_ids(chatml) == [start, end] and end_of_turn_id(chatml) == end


def test_nano_template_and_chat_tokens(base, llama3, chatml):
    assert template(base) == "nano"
    with pytest.raises(ValueError, match="lacks the chat tokens .*with_chat_tokens"):
        render(base, CONVO)
    tok, new = with_chat_tokens(base)
    V = base.vocab_size
    assert new == [V, V + 1, V + 2, V + 3] and [tok.special_tokens[t] for t in NANO_CHAT_TOKENS] == new
    assert tok.mergeable_ranks == base.mergeable_ranks and tok.vocab_size == V + 4
    assert all(tok.special_tokens[t] == i for t, i in base.special_tokens.items())  # old ids kept
    assert with_chat_tokens(tok) == (tok, [])  # idempotent
    assert with_chat_tokens(llama3) == (llama3, []) and with_chat_tokens(chatml) == (chatml, [])
    system, user, assistant, end = new
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}]
    ids, mask = render(tok, convo, add_generation_prompt=True)
    assert ids == [tok.bos_id, system, *tok.encode("Be brief."), end, user, *tok.encode("Hi"), end,
                   assistant, *tok.encode("Hello!"), end, assistant]
    n_sys, n_user, n_asst = (len(tok.encode(s)) for s in ("Be brief.", "Hi", "Hello!"))
    assert mask == [False] * (1 + 1 + n_sys + 1 + 1 + n_user + 1 + 1) + [True] * (n_asst + 1) + [False]
    assert chat_token_ids(tok) == new and end_of_turn_id(tok) == end


@pytest.mark.parametrize("kind", ["llama3", "chatml", "nano"])
def test_mask_covers_exactly_the_assistant_turns(kind, base, llama3, chatml):
    tok = {"llama3": llama3, "chatml": chatml, "nano": with_chat_tokens(base)[0]}[kind]
    convo = CONVO + [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": ""}]
    ids, mask = render(tok, convo)
    eot = end_of_turn_id(tok)
    strip = str.strip if kind == "llama3" else str
    expected = [i for m in convo if m["role"] == "assistant" for i in tok.encode(strip(m["content"])) + [eot]]
    assert [i for i, m in zip(ids, mask) if m] == expected and len(mask) == len(ids)
    assert sum(i == eot for i, m in zip(ids, mask) if not m) == 4  # the system and user turns' ends


def test_check_messages():
    check_messages([{"role": "user", "content": ""}])
    for bad, why in [({"role": "user"}, "not a list"), ([], "no messages"),
                     ([{"role": "user"}], "role.*content"), (["hi"], "role.*content"),
                     ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
                     ([{"role": "user", "content": None}], "not a string")]:
        with pytest.raises(ValueError, match=why):
            check_messages(bad)


# ---- chat data files

def _jsonl(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def test_data_kind(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert data_kind(_jsonl(tmp_path / "c.jsonl", ["{broken", "", chat, {"text": "x"}])) == "chat"
    assert data_kind(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])) == "dpo"
    assert data_kind(_jsonl(tmp_path / "t.jsonl", [{"text": "x"}, chat])) == "text"
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps(chat) + "\n")
    assert data_kind(str(tmp_path / "c.jsonl.gz")) == "chat"
    (tmp_path / "x.txt").write_text(json.dumps(chat))
    for p in ["", str(tmp_path), "hf:owner/name", str(tmp_path / "x.parquet"), str(tmp_path / "x.txt")]:
        assert data_kind(p) == "text"


def test_read_conversations_reports_bad_lines(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _jsonl(tmp_path / "c.jsonl", [
        good, "{not json", {"messages": [{"role": "robot", "content": "x"}]}, "", {"text": "no messages"},
        {"messages": [{"role": "user", "content": 3}]}, {"messages": []}, [1, 2], good])
    convs, bad = read_conversations(path)
    assert convs == [good["messages"]] * 2
    assert [n for n, _ in bad] == [2, 3, 5, 6, 7, 8]
    for (_, why), pattern in zip(bad, ["malformed JSON", "unknown role 'robot'", 'no "messages"',
                                       "not a string", "no messages", 'no "messages"']):
        assert pattern in why


def _convo(i, n_words=3):
    return [{"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": " ".join(["The sea is wide."] * n_words) + f" {i}"}]


def test_prepare_chat_report_and_split(tmp_path, llama3):
    convs = [_convo(i) for i in range(12)] + [_convo(99, n_words=40)]
    lines = [{"messages": c} for c in convs]
    lines[3:3] = ["{oops", {"messages": [{"role": "user", "content": "no answer"}]}]
    data = prepare_chat(_jsonl(tmp_path / "c.jsonl", lines), llama3, seq_len=64, val_fraction=0.1)
    r = data.report
    n_trained = sum(len(llama3.encode(m["content"].strip())) + 1 for c in convs for m in c
                    if m["role"] == "assistant")
    assert (r["n_conversations"], r["n_without_assistant"], r["n_bad_lines"]) == (14, 1, 1)
    assert r["bad_lines"][0][0] == 4 and r["template"] == "llama3"
    assert (r["n_train"], r["n_val"]) == (12, 1) and r["n_longer_than_seq_len"] == 1
    assert r["n_trained_tokens"] == n_trained == int(data.train.mask.sum() + data.val.mask.sum())
    assert r["n_tokens"] == len(data.train) + len(data.val)
    # the val conversation: the smallest SHA-1 of its messages, whatever the file order
    key = lambda c: hashlib.sha1(json.dumps(c, sort_keys=True).encode()).digest()  # noqa: E731
    assert data.val.document(0).tolist() == render(llama3, min(convs, key=key))[0]
    again = prepare_chat(_jsonl(tmp_path / "r.jsonl", lines[::-1]), llama3, seq_len=64, val_fraction=0.1)
    assert again.val.tokens.tolist() == data.val.tokens.tolist()
    docs = sorted(data.train.document(i).tolist() for i in range(data.train.n_docs))
    assert docs == sorted(render(llama3, c)[0] for c in convs if c != min(convs, key=key))
    assert data.train.tokens.dtype == np.uint16 and data.train.mask.dtype == bool
    one = prepare_chat(_jsonl(tmp_path / "one.jsonl", [{"messages": convs[0]}]), llama3, 64)
    assert (one.report["n_train"], one.report["n_val"], one.val.n_docs) == (1, 0, 0)
    with pytest.raises(ValueError, match=r"empty.jsonl' holds no usable conversation .*line 1: malformed"):
        prepare_chat(_jsonl(tmp_path / "empty.jsonl", ["{", lines[4]]), llama3, 64)


def _naive_batches(shard, B, T, seed, n_batches):
    """Lay the epochs out in full (the loader's documented order) and cut rows; targets -100 where the
    target starts a document or its mask is False."""
    toks, keep, starts = [], [], []
    for epoch in range(3):
        for d in np.random.default_rng([seed, epoch]).permutation(shard.n_docs):
            a, b = shard.doc_starts[d], shard.doc_starts[d + 1]
            toks += shard.tokens[a:b].tolist()
            keep += shard.mask[a:b].tolist()
            starts += [True] + [False] * (b - a - 1)
    out = []
    for k in range(n_batches):
        s = k * B * T
        x = [toks[s + r * T: s + r * T + T] for r in range(B)]
        y = [[toks[s + r * T + t + 1] if keep[s + r * T + t + 1] and not starts[s + r * T + t + 1] else IGNORE
              for t in range(T)] for r in range(B)]
        out.append((x, y))
    return out


def test_packed_loader_masks_targets(tmp_path, chatml):
    lines = [{"messages": _convo(i, n_words=1 + i % 5)} for i in range(20)]
    data = prepare_chat(_jsonl(tmp_path / "c.jsonl", lines), chatml, seq_len=16)
    B, T, n = 3, 16, 2 * len(data.train) // (3 * 16) + 1  # past the end of the first epoch
    loader = PackedLoader(data.train, B, T, seed=5)
    for x_ref, y_ref in _naive_batches(data.train, B, T, 5, n):
        x, y, cu = loader.next_batch()
        assert x.tolist() == x_ref and y.tolist() == y_ref
    assert 0 < loader.efficiency < 1
    # as text (no mask) only the document starts are -100
    plain = PackedLoader(Shard(data.train.tokens, data.train.doc_starts), B, T, seed=5)
    assert (plain.next_batch()[1] == IGNORE).sum() < (PackedLoader(data.train, B, T, seed=5).next_batch()[1]
                                                      == IGNORE).sum()
    with pytest.raises(ValueError, match="mask has 3 entries"):
        PackedLoader(Shard(data.train.tokens, data.train.doc_starts, "train", np.ones(3, bool)), B, T)


def test_long_conversation_is_cut_into_rows_with_its_mask(tmp_path, llama3):
    convo = [{"role": "user", "content": "Write the poem."}, {"role": "assistant", "content": TEXT[:400]},
             {"role": "user", "content": "Again."}, {"role": "assistant", "content": TEXT[400:700]}]
    ids, mask = render(llama3, convo)
    T = 24
    data = prepare_chat(_jsonl(tmp_path / "long.jsonl", [{"messages": convo}]), llama3, seq_len=T)
    assert data.report["n_longer_than_seq_len"] == 1 and len(ids) > 4 * T
    for seq_len, n_longer in ((len(ids) - 1, 1), (len(ids), 0)):
        again = prepare_chat(_jsonl(tmp_path / "long.jsonl", [{"messages": convo}]), llama3, seq_len)
        assert again.report["n_longer_than_seq_len"] == n_longer
    loader = PackedLoader(data.train, 1, T)
    for row in range(len(ids) // T):  # the rows of the first epoch: consecutive cuts of the one conversation
        x, y, cu = loader.next_batch()
        lo = row * T
        assert x[0].tolist() == ids[lo:lo + T] and cu.tolist() == [0, T]
        want = [ids[lo + t + 1] if mask[lo + t + 1] else IGNORE for t in range(T)]
        assert y[0].tolist() == want


# ---- Hugging Face tokenizer.json

def _hf_tokenizer(folder, gpt2_style=False):
    """A byte-level BPE trained by Hugging Face's own trainer, saved as tokenizer.json (+ config)."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    t = tk.Tokenizer(models.BPE())
    if gpt2_style:
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:  # Qwen's: NFC, its split regex, then bytes
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tk.Regex(QWEN_SPLIT), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                            use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=450, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir()
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None,
                                                              "pad_token": "<|endoftext|>"}))
    return str(folder)


SAMPLES = ["The sea is wide, the sea is deep.", "cafe\u0301 nai\u0308ve 1234567 x\n\n\n  y\t\tz  ",
           "Paris?! You're   welcome.\r\n", "日本語のテキスト 😀 ümlaut"]


@pytest.mark.parametrize("gpt2_style", [False, True])
def test_from_hf_encodes_like_transformers(tmp_path, gpt2_style):
    transformers = pytest.importorskip("transformers")
    folder = _hf_tokenizer(tmp_path / "qwen-tiny", gpt2_style)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=folder + "/tokenizer.json")
    tok = load_tokenizer(folder)
    assert tok.name == "hf-qwen-tiny" and tok.vocab_size == len(hf)
    assert (tok.bos, tok.eos, tok.pad) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    assert tok.normalizer == (None if gpt2_style else "NFC")
    for s in SAMPLES:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == (s if gpt2_style else hf.decode(hf.encode(s)))
    # the chat template: transformers reads the specials in the ChatML string
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVO)
    assert render(tok, CONVO)[0] == hf.encode(text, add_special_tokens=False)
    # the normalizer survives state() / from_state() and save() / load(); the file path loads too
    for again in (Tokenizer.from_state(tok.state()), load_tokenizer(folder + "/tokenizer.json")):
        assert again.normalizer == tok.normalizer and again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])
    tok.save(tmp_path / "t.tiktoken")
    loaded = Tokenizer.load(tmp_path / "t.tiktoken")
    assert loaded.state() == tok.state() and loaded.fingerprint() == tok.fingerprint()


def test_shards_of_a_normalizing_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _hf_tokenizer(tmp_path / "qwen-tiny")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=folder + "/tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SAMPLES))
    prepared = prepare_data(str(data), tokenizer=folder, cache_dir=str(tmp_path / "cache"), progress=False,
                            val_fraction=0.25)
    docs = [prepared.train.document(i).tolist() for i in range(prepared.train.n_docs)]
    docs += [prepared.val.document(i).tolist() for i in range(prepared.val.n_docs)]
    bos = hf.convert_tokens_to_ids("<|endoftext|>")
    assert sorted(docs) == sorted([bos] + hf.encode(s, add_special_tokens=False) for s in SAMPLES)


def test_from_hf_refuses_what_it_cannot_read(tmp_path):
    folder = _hf_tokenizer(tmp_path / "t")
    good = json.loads(open(folder + "/tokenizer.json").read())

    def attempt(change, pattern):
        tj = json.loads(json.dumps(good))
        change(tj)
        (tmp_path / "bad.json").write_text(json.dumps(tj))
        with pytest.raises(ValueError, match=pattern):
            Tokenizer.from_hf(tmp_path / "bad.json")

    attempt(lambda tj: tj["model"].update(type="WordPiece"), "its model is 'WordPiece', not BPE")
    attempt(lambda tj: tj["model"].update(byte_fallback=True), "byte fallback")
    attempt(lambda tj: tj.update(normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'")
    attempt(lambda tj: tj.update(pre_tokenizer={"type": "Whitespace"}), r"pre-tokenizers \['Whitespace'\]")
    attempt(lambda tj: tj["model"]["merges"].reverse(), "does not follow the vocabulary's numbering")
    attempt(lambda tj: tj["model"]["vocab"].update({"a b": 10_000}), "not in the byte-level alphabet")
    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        Tokenizer.from_hf(tmp_path)
    # GPT-2 lists <|endoftext|> in its vocab too: a special token, not also a rank
    eot = next(t["id"] for t in good["added_tokens"] if t["content"] == "<|endoftext|>")
    good["model"]["vocab"]["<|endoftext|>"] = eot
    (tmp_path / "gpt2.json").write_text(json.dumps(good))
    tok = Tokenizer.from_hf(tmp_path / "gpt2.json")
    assert eot not in tok.mergeable_ranks.values() and tok.special_tokens["<|endoftext|>"] == eot
