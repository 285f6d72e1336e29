"""Chat templates and chat SFT data.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str} (the format of
OpenAI, Hugging Face and TRL); a chat .jsonl holds one {"messages": [...]} per line. render() writes it in
the template of the tokenizer's family, chosen by its special tokens (template()):

- llama3 (Meta's tokenizer.model, or a Llama-3 tokenizer.json): exactly the ids of Meta Llama 3.0's
  ChatFormat.encode_dialog_prompt (meta-llama/llama3, llama/tokenizer.py): <|begin_of_text|>, then per
  message <|start_header_id|> role <|end_header_id|> "\\n\\n" content.strip() <|eot_id|>, each piece encoded
  by itself. No 3.1 system preamble ("Cutting Knowledge Date: ..."): that belongs to 3.1's own template.
- chatml (Qwen3): "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, the text between the special
  tokens encoded in one piece as Hugging Face does. No default system prompt (Qwen3 adds none) and no
  <think> handling: Qwen3's own template writes "<think>\\n\\n</think>\\n\\n" before the content of the
  final assistant turn and drops think blocks from earlier ones; write them into the content to train with
  them (nano's encode reads "<think>" in the text as text, where Hugging Face matches its added token).
- nano (nano's BPE, or any other tokenizer): <|bos|>, then per message <|role|> content <|end|>, with
  NANO_CHAT_TOKENS appended to the tokenizer by with_chat_tokens() (a base model never saw them: the model
  grows its vocabulary, and LoRA keeps the rows of chat_token_ids() trainable).

The mask render() returns is True on the assistant turns' content and their end-of-turn token, the tokens
the model learns to write; headers, system and user turns are context (targets -100 in PackedLoader).
"""
import gzip
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from nano.data import Shard, token_dtype
from nano.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# nano's template: one token per role, then the content, then <|end|> (the end of every turn)
NANO_CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML = ("<|im_start|>", "<|im_end|>")
MAX_SCAN_LINES = 1000  # data_kind looks at most this far for a first valid line


def template(tok):
    """"llama3", "chatml" or "nano", from the tokenizer's special tokens."""
    if all(t in tok.special_tokens for t in _LLAMA3):
        return "llama3"
    if all(t in tok.special_tokens for t in _CHATML):
        return "chatml"
    return "nano"


def with_chat_tokens(tok):
    """(tokenizer, new ids): a nano-template tokenizer with NANO_CHAT_TOKENS numbered after its largest id
    (the ids it had are kept). Llama-3 and ChatML tokenizers, and one that has them, come back as they are."""
    missing = [t for t in NANO_CHAT_TOKENS if t not in tok.special_tokens]
    if template(tok) != "nano" or not missing:
        return tok, []
    first = max([*tok.mergeable_ranks.values(), *tok.special_tokens.values()]) + 1
    new = {t: first + i for i, t in enumerate(missing)}
    tok2 = Tokenizer(tok.name, tok.pat_str, tok.mergeable_ranks, {**tok.special_tokens, **new},
                     tok.bos, tok.eos, tok.pad, tok.normalizer)
    return tok2, list(new.values())


def _ids(tok, names):
    missing = [t for t in names if t not in tok.special_tokens]
    if missing:
        raise ValueError(f"tokenizer {tok.name!r} lacks the chat tokens {missing}: call "
                         "nano.chat.with_chat_tokens(tok) first (and grow the model's vocabulary to match)")
    return [tok.special_tokens[t] for t in names]


def chat_token_ids(tok):
    """The template's special tokens that a base model may never have trained (LoRA keeps their rows)."""
    kind = template(tok)
    if kind == "llama3":
        return _ids(tok, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    if kind == "chatml":
        return _ids(tok, list(_CHATML))
    return _ids(tok, NANO_CHAT_TOKENS)


def end_of_turn_id(tok):
    kind = template(tok)
    return _ids(tok, [{"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "nano": "<|end|>"}[kind]])[0]


def check_messages(messages):
    """Raise ValueError with a short reason unless `messages` is a non-empty list of {role, content}."""
    if not isinstance(messages, list):
        raise ValueError(f'"messages" is a {type(messages).__name__}, not a list of {{"role", "content"}}')
    if not messages:
        raise ValueError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {i} is not an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} ({m['role']}) has content that is not a string "
                             f"({type(m['content']).__name__})")


def _n_tokens_within(tok, ids, n_bytes):
    """How many of `ids` lie within their first n_bytes bytes (a token crossing the line is not counted)."""
    end = 0
    for k, i in enumerate(ids):
        end += len(tok.enc.decode_single_token_bytes(i))
        if end > n_bytes:
            return k
    return len(ids)


def render(tok, messages, *, add_generation_prompt=False):
    """(ids, mask) of one conversation in the tokenizer's template; mask True on what the model learns to
    write (the assistant turns' content and end-of-turn tokens). add_generation_prompt appends the
    assistant header, for sampling."""
    check_messages(messages)
    kind = template(tok)
    ids, mask = [], []

    def add(new, train=False):
        ids.extend(new)
        mask.extend([train] * len(new))

    if kind == "llama3":
        bot, start, end, eot = _ids(tok, _LLAMA3)
        header = lambda role: [start, *tok.encode(role), end, *tok.encode("\n\n")]  # noqa: E731
        add([bot])
        for m in messages:
            add(header(m["role"]))
            add(tok.encode(m["content"].strip()) + [eot], m["role"] == "assistant")
        if add_generation_prompt:
            add(header("assistant"))
    elif kind == "chatml":
        im_start, im_end = _ids(tok, _CHATML)
        newline = tok.encode("\n")
        for m in messages:
            # one piece between the special tokens, as Hugging Face encodes the template's string; the
            # header is the tokens within "role\n" (with the split regexes here "\n" never joins a letter)
            head = m["role"] + "\n"
            seg = tok.encode(head + m["content"])
            n_head = _n_tokens_within(tok, seg, len(head.encode()))
            add([im_start, *seg[:n_head]])
            add(seg[n_head:] + [im_end], m["role"] == "assistant")
            add(newline)  # after <|im_end|>: the model stops at <|im_end|>, so "\n" is not trained
        if add_generation_prompt:
            add([im_start, *tok.encode("assistant\n")])
    else:
        role_ids = dict(zip(NANO_CHAT_TOKENS, _ids(tok, NANO_CHAT_TOKENS)))
        add([tok.bos_id])
        for m in messages:
            add([role_ids[f"<|{m['role']}|>"]])
            add(tok.encode(m["content"]) + [role_ids["<|end|>"]], m["role"] == "assistant")
        if add_generation_prompt:
            add([role_ids["<|assistant|>"]])
    return ids, mask


# ---- chat data

def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def data_kind(path):
    """"chat", "dpo" or "text" for a --data value: a .jsonl / .jsonl.gz file is chat when its first valid
    JSON object has "messages", DPO when it has "chosen" and "rejected"; everything else is text. Reads
    only up to the first valid line."""
    path = os.fspath(path) if path else ""
    if not path.endswith((".jsonl", ".jsonl.gz")) or not os.path.isfile(path):
        return "text"
    with _open(path) as f:
        for _, line in zip(range(MAX_SCAN_LINES), f):
            try:
                rec = json.loads(line)
            except ValueError:  # blank or malformed (reported when the data is read)
                continue
            if isinstance(rec, dict):
                if "messages" in rec:
                    return "chat"
                return "dpo" if "chosen" in rec and "rejected" in rec else "text"
    return "text"


def read_conversations(path):
    """(conversations, bad_lines) of a chat .jsonl / .jsonl.gz: each conversation a checked list of
    messages, each bad line (lineno, reason) with lineno 1-based; blank lines are neither."""
    conversations, bad = [], []
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                bad.append((lineno, f"malformed JSON ({str(e)[:60]})"))
                continue
            try:
                if not isinstance(rec, dict) or "messages" not in rec:
                    raise ValueError('no "messages" field')
                check_messages(rec["messages"])
            except ValueError as e:
                bad.append((lineno, str(e)))
                continue
            conversations.append(rec["messages"])
    return conversations, bad


@dataclass
class ChatData:
    train: Shard  # with .mask: PackedLoader trains only the assistant tokens
    val: Shard
    report: dict


def _shard(rendered, dtype, name):
    lens = [len(ids) for ids, _ in rendered]
    tokens = np.fromiter((i for ids, _ in rendered for i in ids), dtype, sum(lens))
    mask = np.fromiter((b for _, m in rendered for b in m), bool, sum(lens))
    return Shard(tokens, np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64), name, mask)


def prepare_chat(path, tok, seq_len, *, val_fraction=0.01):
    """Render every conversation of a chat .jsonl into train / val Shards with masks (in memory).

    The val conversations are those whose messages have the smallest SHA-1 (independent of file order),
    val_fraction of them and at least one when there are two or more. Conversations without an assistant
    turn have nothing to train on and are skipped; longer ones than seq_len are kept (PackedLoader cuts them
    into rows like a long document) and counted. report: n_conversations (valid lines), n_train, n_val,
    n_tokens, n_trained_tokens, n_longer_than_seq_len, n_without_assistant, bad_lines (the first 20
    (lineno, reason)), n_bad_lines, template."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    conversations, bad = read_conversations(path)
    usable = [m for m in conversations if any(x["role"] == "assistant" for x in m)]
    if not usable:
        first = f"; line {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise ValueError(f"--data {path!r} holds no usable conversation ({len(conversations)} valid, "
                         f"{len(conversations) - len(usable)} without an assistant turn, {len(bad)} bad "
                         f'lines{first}): each line needs "messages" with an assistant turn')
    rendered = [render(tok, m) for m in usable]
    n = len(usable)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    keys = [hashlib.sha1(json.dumps(m, sort_keys=True).encode()).digest() for m in usable]
    val = set(sorted(range(n), key=keys.__getitem__)[:n_val])
    dtype = token_dtype(tok.vocab_size)
    train = _shard([r for i, r in enumerate(rendered) if i not in val], dtype, "train")
    held = _shard([r for i, r in enumerate(rendered) if i in val], dtype, "val")
    report = {"source": path, "template": template(tok), "n_conversations": len(conversations),
              "n_train": n - n_val, "n_val": n_val, "n_tokens": sum(len(ids) for ids, _ in rendered),
              "n_trained_tokens": sum(sum(m) for _, m in rendered),
              "n_longer_than_seq_len": sum(len(ids) > seq_len for ids, _ in rendered),
              "n_without_assistant": len(conversations) - n, "bad_lines": bad[:20], "n_bad_lines": len(bad)}
    return ChatData(train, held, report)
