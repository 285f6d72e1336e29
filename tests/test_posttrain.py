"""Post-training end to end, as a user runs it: train.py --init-from a base with chat (SFT) or preference
(DPO) data, with and without LoRA; resume; merge; sample.py --chat. Tiny random bases and tokenizers are
made here; each behaviour is checked against what the data forces (a fixed reply, a fixed preference)."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from common import ROOT, run_script, script_env
from nano.checkpoint import load_checkpoint, save_checkpoint
from nano.chat import render
from nano.config import ModelConfig
from nano.finetune import load_model
from nano.model import Transformer
from nano.tokenizer import train_bpe

REPLY = "The answer is always the same."
TRAIN = ["--device", "cpu", "--batch-size", "8", "--seq-len", "96", "--warmup-steps", "5", "--eval-every", "1000",
         "--ckpt-every", "1000", "--log-every", "1000", "--sample-every", "0", "--eval-steps", "2"]


def noise(rng, n):
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                    for _ in range(n))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return script_env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A nano run directory holding a random tiny model and a BPE trained on some English-like text."""
    rng = random.Random(0)
    text = [noise(rng, 200) + " " + REPLY * 20 for _ in range(5)]
    tok = train_bpe(text, 320, progress=False)
    config = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=tok.vocab_size, max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(config)
    # a trained model's head tells tokens apart; a fresh one's (std 0.02, frozen under LoRA) caps every logit
    # near 1 and with it the loss near log(vocab): give the tied embedding the spread of a trained one
    torch.nn.init.normal_(model.tok_embeddings.weight, 0.0, 0.15)
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(str(folder / "ckpt.pt"), {"model": model.state_dict(), "model_config": config.__dict__,
                                              "train_config": {}, "tokenizer": tok.state(), "step": 0})
    return str(folder)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Conversations whose user turns are random noise and whose assistant replies are one fixed sentence:
    the reply is learnable, the user turns are not (a loss that trained on them could not fall near zero)."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            messages = [{"role": "system", "content": noise(rng, 3)}] if i % 3 == 0 else []
            for _ in range(rng.randint(1, 2)):
                messages += [{"role": "user", "content": noise(rng, rng.randint(3, 12))},
                             {"role": "assistant", "content": REPLY}]
            f.write(json.dumps({"messages": messages}) + "\n")
        f.write("{not json\n")  # reported by line number and skipped
        f.write(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    return str(path)


def run(script, args, env, check=True, stdin=None, timeout=600):
    if stdin is None:  # the pre-imported script server (tests/common.py): a fork, no torch import to pay
        r = run_script(os.path.join(ROOT, script), args, env, timeout=timeout)
    else:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                           env=env, cwd=ROOT, input=stdin, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_lora(base, chat_data, env, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "lora")
    r = run("train.py", [*TRAIN, "--init-from", base, "--data", chat_data, "--out-dir", out, "--max-steps", "80",
                         "--lr", "1e-2", "--lora-rank", "8", "--lora-alpha", "16"], env)
    return out, r.stdout + r.stderr


@pytest.mark.parametrize("lora", [True, False])
def test_sft_learns_only_the_assistant_turns(base, chat_data, env, sft_lora, tmp_path, lora):
    if lora:
        out, log = sft_lora
    else:
        out = str(tmp_path / "full")
        r = run("train.py", [*TRAIN, "--init-from", base, "--data", chat_data, "--out-dir", out, "--max-steps",
                             "60", "--lr", "5e-3"], env)
        log = r.stdout + r.stderr
    assert "line 201" in log and "line 202" in log, log  # the bad lines, by number
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert losses[0] > 2.0 and min(losses[-5:]) < 0.1, losses  # the user noise is never a target
    state = load_checkpoint(out)
    if lora:  # adapters and token rows only, and the base they belong to
        assert state["lora"]["base"] == os.path.abspath(base)
        n_adapter = sum(v.numel() for v in state["model"].values())
        assert n_adapter < Transformer(ModelConfig(**state["model_config"])).num_params() / 2
        assert all(".lora_" in k or k.endswith((".rows", ".ids")) for k in state["model"]), list(state["model"])


def test_chat_answers_piped_turns(sft_lora, env):
    out, _ = sft_lora
    r = run("sample.py", ["--ckpt", out, "--chat", "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu",
                          "--system", "be brief"], env, stdin="qwe rty uiop\nzxcv bnm\n")
    replies = [line for line in r.stdout.splitlines() if line.startswith("assistant: ")]
    assert replies == ["assistant: " + REPLY] * 2, r.stdout  # two turns, each ended by the end-of-turn token


def test_merge_writes_a_plain_checkpoint(sft_lora, env, tmp_path):
    from nano.finetune import lora_model
    out, _ = sft_lora
    p = subprocess.run([sys.executable, "-m", "nano.finetune", "merge", out, str(tmp_path / "merged")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    merged = load_checkpoint(str(tmp_path / "merged"))
    assert "lora" not in merged
    model = Transformer(ModelConfig(**merged["model_config"]))
    model.load_state_dict(merged["model"])
    unmerged = lora_model(load_checkpoint(out))  # base + adapters, computed apart
    idx = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.eval()(idx)[0], unmerged.eval()(idx)[0], rtol=1e-5, atol=1e-5)


def test_lora_resume_is_bit_identical(base, chat_data, env, tmp_path):
    args = [*TRAIN, "--init-from", base, "--data", chat_data, "--max-steps", "6", "--lr", "1e-2", "--lora-rank", "4"]
    run("train.py", [*args, "--out-dir", str(tmp_path / "straight")], env)
    run("train.py", [*args, "--out-dir", str(tmp_path / "sliced"), "--stop-after", "3"], env)
    run("train.py", [*args, "--out-dir", str(tmp_path / "sliced"), "--resume"], env)
    a, b = (load_checkpoint(str(tmp_path / d)) for d in ("straight", "sliced"))
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("case", ["lora without base", "bad target", "foreign tokenizer", "other base on resume"])
def test_post_training_refusals(base, chat_data, env, tmp_path, case):
    out = str(tmp_path / "run")
    args = [*TRAIN, "--data", chat_data, "--out-dir", out, "--max-steps", "2"]
    if case == "other base on resume":
        run("train.py", [*args, "--init-from", base], env)
        args += ["--resume", "--init-from", str(tmp_path)]
        expect = "was started from --init-from"
    else:
        args += {"lora without base": ["--lora-rank", "4"],
                 "bad target": ["--init-from", base, "--lora-rank", "4", "--lora-targets", "wq,nosuch"],
                 "foreign tokenizer": ["--init-from", base, "--tokenizer", str(tmp_path / "other.tiktoken")]}[case]
        train_bpe(["another text entirely, " * 50], 270, progress=False).save(str(tmp_path / "other.tiktoken"))
        expect = {"lora without base": "--init-from", "bad target": "nosuch",
                  "foreign tokenizer": "is not the tokenizer of --init-from"}[case]
    r = run("train.py", args, env, check=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err and expect in err[-1] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_dpo_learns_a_preference(base, env, tmp_path):
    """Prompts of noise, chosen = the fixed REPLY, rejected = another fixed sentence: after a short DPO run the
    policy prefers the chosen reply on held-out prompts (chance is 0.5), with and without LoRA."""
    rng = random.Random(2)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            prompt = noise(rng, rng.randint(3, 10))
            if i % 2:
                f.write(json.dumps({"prompt": prompt, "chosen": REPLY, "rejected": "No idea, sorry."}) + "\n")
            else:  # the message-list form (TRL's conversational format)
                f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                    "chosen": [{"role": "assistant", "content": REPLY}],
                                    "rejected": [{"role": "assistant", "content": "No idea, sorry."}]}) + "\n")
    for extra in (["--lora-rank", "8"], []):
        out = str(tmp_path / f"dpo{len(extra)}")
        run("train.py", [*TRAIN, "--init-from", base, "--data", str(path), "--out-dir", out, "--max-steps", "30",
                         "--lr", "3e-3", "--dpo-beta", "0.5", "--eval-every", "30", *extra], env)
        recs = records(out)
        steps = [r for r in recs if "loss" in r]
        assert len(steps) == 30 and all("dpo_accuracy" in r and "dpo_margin" in r for r in steps)
        val = [r["val_dpo_accuracy"] for r in recs if "val_dpo_accuracy" in r]
        assert len(val) == 2 and val[-1] >= 0.99 and steps[-1]["dpo_margin"] > 0.5, (extra, val, steps[-1])
        # and, computed apart from the run's own bookkeeping from plain full logits, the trained model prefers
        # the chosen reply on fresh prompts more than the starting model does (the base, grown by the chat
        # tokens' mean rows, is where both runs start)
        model, tok, _ = load_model(out)
        start = load_model(base)[0]
        start.grow_vocab(model.config.vocab_size)
        for _ in range(4):
            prompt = [{"role": "user", "content": noise(rng, 6)}]
            gain = [reply_logp(m.eval(), tok, prompt, REPLY) - reply_logp(m.eval(), tok, prompt, "No idea, sorry.")
                    for m in (model, start)]
            assert gain[0] - gain[1] > 1.0, (extra, gain)


def reply_logp(model, tok, prompt, reply):
    ids, mask = render(tok, prompt + [{"role": "assistant", "content": reply}])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
    return sum(logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1])
