"""DPO: the loss against a float64 hand derivation, packed per-sequence log-probs against each sequence run
alone through the model, the pair loader's coverage / packing / resume, and reading pairs."""
import json
import math
import random
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from nano.chat import render, with_chat_tokens
from nano.config import ModelConfig
from nano.dpo import (PairLoader, dpo_loss, dpo_metrics, evaluate, pair_loss, prepare_dpo, read_pairs,
                      reference_logps, render_pair, sequence_logps)
from nano.model import Transformer
from nano.tokenizer import train_bpe

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in trees near "
         "water yes no maybe four seven blue green red quick slow").split()


@pytest.fixture(scope="module")
def tok():
    # the words and the stand-in role names merge to whole tokens: short sequences, small rows
    base = train_bpe(" ".join(WORDS * 5) + " user: assistant: system: " * 5, 340, progress=False)
    return with_chat_tokens(base)[0]  # nano's template needs its role and end-of-turn tokens


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                   max_seq_len=128, attn_impl="reference"))  # not the Triton interpreter


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _pairs(tok, n, seed=0):
    """n rendered pairs of varied lengths; some prompts hold an earlier assistant turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": _sentence(rng, 1, 4)}]
        if i % 3 == 0:
            prompt += [{"role": "assistant", "content": _sentence(rng, 1, 3)},
                       {"role": "user", "content": _sentence(rng, 1, 3)}]
        chosen = [{"role": "assistant", "content": _sentence(rng, 1, 4)}]
        rejected = [{"role": "assistant", "content": _sentence(rng, 1, 6)}]
        out.append(render_pair(tok, prompt, chosen, rejected))
    return out


def _naive_logps(model, pairs):
    """(N, 2) float64: each sequence alone through the model (no packing, no cu_seqlens), full logits,
    log_softmax, gathered at the next token where the mask marks it a response token, summed."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    with torch.no_grad():
        for j, pair in enumerate(pairs):
            for s, (ids, mask) in enumerate(pair):
                ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
                logits, _ = model(ids[None, :-1])
                logp = torch.log_softmax(logits[0].double(), -1)
                for t in range(len(ids) - 1):
                    if mask[t + 1]:
                        out[j, s] += logp[t, ids[t + 1]]
    return out


# -----------------------------------------------------------------------------
# The loss

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradient_equal_float64_derivation(beta):
    g = torch.Generator().manual_seed(1)
    policy = (torch.randn(7, 2, generator=g, dtype=torch.float64) * 30).requires_grad_()
    reference = (torch.randn(7, 2, generator=g, dtype=torch.float64) * 30).requires_grad_()
    with torch.no_grad():
        policy[0] = reference[0]  # margin exactly 0: not counted correct
    loss, stats = dpo_loss(policy, reference, beta)
    loss.sum().backward()
    n_correct, margin_sum = 0, 0.0
    for j in range(7):
        pc, pr = policy[j].tolist()
        rc, rr = reference[j].tolist()
        z = beta * ((pc - rc) - (pr - rr))
        # -log sigmoid(z) = log(1 + e^-z); d/dpc = -beta * sigmoid(-z) = -beta / (1 + e^z), d/dpr = +that
        assert loss[j].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-12, abs=1e-12)
        d = beta / (1 + math.exp(z))
        assert policy.grad[j].tolist() == pytest.approx([-d, d], rel=1e-12, abs=1e-15)
        n_correct += z > 0
        margin_sum += z
    assert reference.grad is None  # the reference is a constant
    assert stats.dtype == torch.float64
    assert stats.tolist() == pytest.approx([7, n_correct, margin_sum], rel=1e-12)
    assert 0 < n_correct < 7  # both branches exercised


def test_dpo_metrics():
    assert dpo_metrics([4.0, 3.0, 2.0]) == {"dpo_accuracy": 0.75, "dpo_margin": 0.5}
    assert dpo_metrics([2, 1, -1], prefix="val_") == {"val_dpo_accuracy": 0.5, "val_dpo_margin": -0.5}
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_metrics([0, 0, 0])


# -----------------------------------------------------------------------------
# Log-probs of packed pairs

def test_sequence_logps_equal_each_sequence_alone(tok):
    model = _model(tok).eval()
    pairs = _pairs(tok, 9)
    loader = PairLoader(pairs, 2, 128, seed=3)
    seen = shared = 0
    while seen < len(pairs):
        batch = loader.next_batch()
        shared += len(batch.cu_seqlens) > 2 * 2 + 1  # several sequences share a row
        got = sequence_logps(model, batch)
        assert got.dtype == torch.float64 and got.shape == (batch.n_pairs, 2)
        want = _naive_logps(model, [pairs[j] for j in batch.pair_ids.tolist()])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
        seen += batch.n_pairs
    assert shared


def test_pair_loss_gradient_flows_and_starts_at_log2(tok):
    model = _model(tok).train()
    pairs = _pairs(tok, 6)
    table = reference_logps(model, pairs, 2, 64)
    assert model.training  # restored
    batch = PairLoader(pairs, 2, 64).next_batch()
    loss, stats = pair_loss(model, batch, 0.1, table)
    # the policy is the reference: every margin is 0, the loss -log sigmoid(0) = log 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert stats[0].item() == batch.n_pairs


@contextmanager
def _shifted_head(model, seen):
    """A stand-in for lora_disabled: the same model, other weights, restored on exit."""
    seen.append((model.training, torch.is_grad_enabled()))
    saved = model.output.weight.detach().clone()
    with torch.no_grad():
        model.output.weight.mul_(1.5).add_(0.01)
    try:
        yield
    finally:
        with torch.no_grad():
            model.output.weight.copy_(saved)


def test_reference_table_and_callable_agree(tok):
    model = _model(tok).train()
    pairs = _pairs(tok, 8, seed=1)
    seen = []
    with _shifted_head(model, seen):
        table = reference_logps(model, pairs, 2, 64)
    ctx = lambda: _shifted_head(model, seen)  # noqa: E731
    batch = PairLoader(pairs, 2, 128, seed=5).next_batch()
    results = []
    for ref in (table, ctx):
        model.zero_grad()
        loss, stats = pair_loss(model, batch, 0.3, ref)
        loss.backward()
        results.append((loss.detach(), stats, model.output.weight.grad.clone()))
        assert model.training
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert seen[-1] == (False, False)  # the callable's reference runs in eval mode, without grad
    assert results[0][1][2].abs() > 1e-3  # the reference differs from the policy

    # evaluate: both forms agree with the naive per-sequence oracle
    policy = _naive_logps(model, pairs)
    with _shifted_head(model, seen):
        ref_naive = _naive_logps(model, pairs)
    z = 0.3 * ((policy[:, 0] - ref_naive[:, 0]) - (policy[:, 1] - ref_naive[:, 1]))
    want = {"val_loss": torch.log1p(torch.exp(-z)).mean().item(),
            "val_dpo_accuracy": (z > 0).double().mean().item(), "val_dpo_margin": z.mean().item()}
    for ref in (table, ctx):
        got = evaluate(model, pairs, 2, 64, 0.3, ref)
        assert got == pytest.approx(want, abs=1e-4)
        assert model.training


def test_reference_logps_ranks_fill_disjoint_entries(tok):
    model = _model(tok)
    pairs = [render_pair(tok, [U("the cat")], [A("sat on a mat")], [A("ran")])] * 7
    (c, _), (r, _) = pairs[0]
    T = len(c) + len(r) - 2  # a pair fills a row exactly: one pair a batch
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    parts, n_forwards = [], []
    for r in range(3):
        calls.clear()
        parts.append(reference_logps(model, pairs, 1, T, rank=r, world_size=3))
        n_forwards.append(len(calls))
    # one pair a batch: shares of 3, 2, 2 pairs, but 3 forwards on every rank (DDP/FSDP collectives)
    assert n_forwards == [3, 3, 3]
    filled = torch.stack([(p != 0).all(1) for p in parts])  # (ranks, pairs)
    assert filled.sum(0).tolist() == [1] * 7  # each entry by exactly one rank
    torch.testing.assert_close(sum(parts), _naive_logps(model.eval(), pairs), atol=2e-4, rtol=1e-5)


# -----------------------------------------------------------------------------
# The loader

def _check_batch(batch, pairs, B, T, pad_id):
    """Every pair of the batch is there whole: each sequence inside one cu_seqlens segment of one row,
    tokens and targets as rendered; everything else is padding."""
    x, y, seq, cu = batch.x.view(-1), batch.y.view(-1), batch.seq, batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == B * T and all(a < b for a, b in zip(cu, cu[1:]))
    assert set(range(0, B * T, T)) <= set(cu)
    real = torch.zeros(B * T, dtype=torch.bool)
    for k, j in enumerate(batch.pair_ids.tolist()):
        for s, (ids, mask) in enumerate(pairs[j]):
            ids, mask = list(ids), list(mask)
            a = _segment_start(seq, 2 * k + s, cu)
            b = a + len(ids) - 1
            assert b in cu and a // T == (b - 1) // T  # one segment, one row
            assert x[a:b].tolist() == ids[:-1]
            assert y[a:b].tolist() == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
            assert seq[a:b].tolist() == [2 * k + s if m else -1 for m in mask[1:]]
            real[a:b] = True
    assert (x[~real] == pad_id).all() and (y[~real] == -100).all() and (seq[~real] == -1).all()
    for row in range(B):  # padding fills each row's tail, as a segment of its own
        pad = torch.nonzero(~real[row * T:(row + 1) * T]).view(-1)
        if len(pad):
            assert pad.tolist() == list(range(int(pad[0]), T)) and row * T + int(pad[0]) in cu
    return int(real.sum())


def _segment_start(seq, s, cu):
    first = int(torch.nonzero(seq == s)[0])
    return max(c for c in cu if c <= first)


@pytest.mark.parametrize("world_size", [1, 3])
def test_loader_covers_every_pair_once_per_epoch_unsplit(tok, world_size):
    pairs = _pairs(tok, 23, seed=4)
    B, T = 2, 64
    loaders = [PairLoader(pairs, B, T, seed=7, rank=r, world_size=world_size, pad_id=5)
               for r in range(world_size)]
    stream, real, n_batches = [], 0, 0
    while len(stream) < 2 * len(pairs) + 5:
        for ld in loaders:
            batch = ld.next_batch()
            assert batch.x.shape == batch.y.shape == (B, T) and batch.seq.shape == (B * T,)
            assert batch.x.dtype == batch.y.dtype == batch.seq.dtype == torch.int64
            assert batch.cu_seqlens.dtype == torch.int32 and batch.n_pairs == len(batch.pair_ids) >= 1
            real += _check_batch(batch, pairs, B, T, pad_id=5)
            stream += batch.pair_ids.tolist()
        n_batches += 1
    for e in range(2):  # the global stream is each epoch's permutation in turn
        assert sorted(stream[e * 23:(e + 1) * 23]) == list(range(23))
    assert stream[:23] != stream[23:46]  # epochs are reshuffled
    efficiency = sum(ld.efficiency for ld in loaders) / world_size
    assert efficiency == pytest.approx(real / (n_batches * world_size * B * T))


def test_loader_resumes_exactly(tok):
    pairs = _pairs(tok, 11, seed=5)
    a = PairLoader(pairs, 2, 64, seed=2, rank=1, world_size=2)
    for _ in range(4):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoint metadata)
    want = [a.next_batch() for _ in range(6)]  # crosses an epoch boundary
    b = PairLoader(pairs, 2, 64, seed=0, rank=1, world_size=2)
    b.load_state_dict(state)
    for w in want:
        g = b.next_batch()
        for name in ("x", "y", "cu_seqlens", "seq", "pair_ids"):
            assert torch.equal(getattr(g, name), getattr(w, name)), name
    assert b.efficiency == a.efficiency
    with pytest.raises(ValueError, match="state_dict"):
        b.load_state_dict({"seed": 1})


def test_loader_rejects_pairs_that_cannot_fit(tok):
    pairs = _pairs(tok, 3)
    longest = max(len(ids) for p in pairs for ids, _ in p)
    with pytest.raises(ValueError, match="seq_len"):
        PairLoader(pairs, 2, longest - 2)
    both = max(len(c[0]) + len(r[0]) - 2 for c, r in pairs)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        PairLoader(pairs, 1, both - 1)
    PairLoader(pairs, 2, both - 1)  # a row each: fine
    with pytest.raises(ValueError, match="no preference pairs"):
        PairLoader([], 2, 64)
    with pytest.raises(ValueError, match="batch_size"):
        PairLoader(pairs, 0, 64)
    with pytest.raises(ValueError, match="rank"):
        PairLoader(pairs, 2, 64, rank=2, world_size=2)


# -----------------------------------------------------------------------------
# Reading and rendering

def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731


def test_read_pairs_bad_lines_by_number(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "yes", "rejected": "no"},                       # 1 ok
        '{"prompt": "hi", "chosen": ',                                             # 2 malformed JSON
        {"prompt": "hi", "chosen": "yes"},                                         # 3 no rejected
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # 4 bad role
        "",                                                                        # 5 blank: ignored
        {"prompt": [U("hi")], "chosen": [A("yes")], "rejected": [A("no")]},      # 6 ok
        {"chosen": [U("hi"), A("yes")], "rejected": [U("hi"), A("no")]},         # 7 ok, implicit prompt
        {"prompt": "hi", "chosen": [A("a"), U("b")], "rejected": "c"},            # 8 chosen ends with user
        '[1, 2]',                                                                  # 9 not an object
        {"chosen": "yes", "rejected": "no"},                                       # 10 strings, no prompt
    ])
    pairs, bad = read_pairs(path)
    assert [n for n, _ in bad] == [2, 3, 4, 8, 9, 10]
    assert "rejected" in bad[1][1] and "assistant" in bad[3][1]
    assert len(pairs) == 3


def test_string_list_and_implicit_forms_render_the_same(tmp_path, tok):
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "the cat", "chosen": "sat", "rejected": "ran to the park"},
        {"prompt": [U("the cat")], "chosen": [A("sat")], "rejected": [A("ran to the park")]},
        {"chosen": [U("the cat"), A("sat")], "rejected": [U("the cat"), A("ran to the park")]},
    ])
    pairs, bad = read_pairs(path)
    assert bad == []
    assert pairs[0] == pairs[1] == pairs[2] == ([U("the cat")], [A("sat")], [A("ran to the park")])
    (ids_c, mask_c), (ids_r, mask_r) = render_pair(tok, *pairs[0])
    # nothing to clear: the prompt holds no assistant turn
    assert (ids_c, mask_c) == tuple(render(tok, [U("the cat"), A("sat")]))
    assert (ids_r, mask_r) == tuple(render(tok, [U("the cat"), A("ran to the park")]))


def test_assistant_turns_in_the_prompt_are_not_trained(tok):
    prompt = [U("the dog"), A("ran"), U("and the cat")]
    (ids, mask), _ = render_pair(tok, prompt, [A("sat on a mat")], [A("no")])
    full_ids, full_mask = render(tok, prompt + [A("sat on a mat")])
    n = len(render(tok, prompt)[0])
    assert ids == list(full_ids) and any(full_mask[:n])  # the template trains the earlier turn ...
    assert not any(mask[:n]) and mask[n:] == list(full_mask[n:]) and any(mask[n:])  # ... DPO does not


def test_prepare_dpo_drops_long_pairs_and_splits(tmp_path, tok):
    lines = [{"prompt": f"the cat {i}", "chosen": "yes", "rejected": "no"} for i in range(30)]
    lines += [{"prompt": "the dog", "chosen": "ran " * 60, "rejected": "no"}, "not json"]
    path = _write(tmp_path / "p.jsonl", lines)
    data = prepare_dpo(path, tok, 32, val_fraction=0.1)
    r = data.report
    counts = (r["n_pairs"], r["n_train"], r["n_val"], r["n_longer_than_seq_len"], r["n_bad_lines"])
    assert counts == (31, 27, 3, 1, 1)
    assert r["bad_lines"][0][0] == 32
    assert r["n_tokens"] == sum(len(ids) for p in data.train + data.val for ids, _ in p)
    assert all(len(ids) <= 33 for p in data.train + data.val for ids, _ in p)
    again = prepare_dpo(path, tok, 32, val_fraction=0.1)  # deterministic split
    assert [p[0][0].tolist() for p in again.val] == [p[0][0].tolist() for p in data.val]
    tiny = prepare_dpo(_write(tmp_path / "two.jsonl", lines[:2]), tok, 32)
    assert (len(tiny.train), len(tiny.val)) == (1, 1)
    # the bound is exact: a sequence of seq_len + 1 tokens fills a row
    n = max(len(ids) for ids, _ in render_pair(tok, [U("the dog")], [A("ran " * 60)], [A("no")]))
    assert prepare_dpo(path, tok, n - 1).report["n_longer_than_seq_len"] == 0
    assert prepare_dpo(path, tok, n - 2).report["n_longer_than_seq_len"] == 1
    with pytest.raises(ValueError, match="none.jsonl"):
        prepare_dpo(_write(tmp_path / "none.jsonl", lines[-2:]), tok, 32)
