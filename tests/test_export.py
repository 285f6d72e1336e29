"""Export to Hugging Face format: models trained a few steps by train.py, written by save_hf / `python -m
nano.convert export`, and read back by transformers (the oracle: logits, MTP logits, tokenizer ids) and by
load_hf (bit-exact round trip). Refusals leave nothing behind."""
import json
import itertools
import os
import random
import sysconfig
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

from nano.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from nano.config import ModelConfig  # noqa: E402
from nano.convert import SUPPORTED, hf_family, load_hf, rope_rows, save_hf  # noqa: E402
from nano.model import Transformer  # noqa: E402
from nano.tokenizer import GPT4_SPLIT, NANO_SPECIALS, Tokenizer  # noqa: E402
from common import run_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--vocab-size", "600", "--seq-len", "64",
         "--batch-size", "4", "--max-steps", "3", "--eval-every", "100", "--eval-steps", "1",
         "--sample-every", "0"]
# Llama-3.1 RoPE scaling, active beyond 16 positions
SCALING = ["--rope-theta", "500000", "--rope-scaling", json.dumps(
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})]
ARCHS = {  # one run per Hugging Face family
    "llama": ["--preset", "tiny", "--n-kv-head", "2", *SCALING],
    "qwen3": ["--preset", "tiny", "--n-kv-head", "2", "--qk-norm", "true", "--head-dim", "24"],
    "deepseek_v3": ["--preset", "deepseek-tiny", "--q-lora-rank", "16", "--kv-lora-rank", "12",
                    "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "6", "--v-head-dim", "10",
                    "--n-routed-experts", "6", "--moe-intermediate-size", "16", "--n-group", "3",
                    "--topk-group", "2", "--routed-scaling-factor", "1.5", "--intermediate-size", "48",
                    "--mtp-depth", "2", "--tie-embeddings", "false", *SCALING],
}
TEXTS = ["Hello, world!", "  leading spaces\n\n\n  trailing   ", "123456789 1,234.56 3.14159",
         "\t\ttabs\r\n\r\nCRLF", "naïve café, Straße, İstanbul, ǅ", "日本語のテキスト 中文 한국어",
         "emoji 🙂🚀👍🏽 👨\u200d👩\u200d👧 💩💩",
         "no\u00a0break\u3000ideographic\u2003em\u2028line", "it's I'M they'll WE'VE you'd",
         "def f(x):\n    return {k: v ** 2 for k, v in x.items()}  # dict\n", "x" * 40 + " " * 9 + "\n \n",
         "aba" * 12, "spaced , out . like ! this ? it 's do n't", "", " ", "\n"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()  # tiny models: one thread beats two on a shared 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, NANO_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONPATH=ROOT)
    e.pop("TRITON_INTERPRET", None)
    return e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~25 standard-library files and one of the texts above (so the BPE learns multi-byte merges)."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for n in sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:25]:
        with open(os.path.join(stdlib, n), encoding="utf-8", errors="replace") as f:
            (d / (n + ".txt")).write_text(f.read())
    (d / "unicode.txt").write_text("\n".join(TEXTS * 20))
    return str(d)


@pytest.fixture(scope="module")
def runs(corpus, env, tmp_path_factory):
    """arch -> a run directory trained 3 steps by train.py (trained once, on first use)."""
    done = {}

    def get(arch):
        if arch not in done:
            out = str(tmp_path_factory.mktemp(arch) / "run")
            r = run("train.py", [*ARCHS[arch], *SMALL, "--data", corpus, "--out-dir", out], env)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            done[arch] = out
        return done[arch]
    return get


def run(script, args, env):
    if script == "nano.convert":  # python -m nano.convert args (from a pre-imported interpreter: tests/common.py)
        return run_script(None, args, env, module=script)
    return run_script(os.path.join(ROOT, script), args, env)


def load_run(path):
    state = load_checkpoint(path)
    return model_from_checkpoint(state).eval(), Tokenizer.from_state(state["tokenizer"])


def peak(model, s=6.0):
    """Scale what makes the attention scores (q/k projections, or the QK-norm weights, which undo a
    scaled projection) so attention is peaked: at init every score is ~0, positions barely matter, and
    a wrong RoPE layout would pass."""
    names = ("wq", "wk", "wq_b", "wkv_a") + (("q_norm", "k_norm") if model.config.qk_norm else ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(tuple(f"attention.{n}.weight" for n in names)):
                p.mul_(s)
    return model


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """arch -> (nano model with peaked attention, its export: sharded by a tiny limit)."""
    done = {}

    def get(arch):
        if arch not in done:
            model, tok = load_run(runs(arch))
            out = str(tmp_path_factory.mktemp("hf") / arch)
            save_hf(peak(model), out, tok, max_shard_bytes=40_000)
            done[arch] = model, out
        return done[arch]
    return get


def logits_diff(hf_dir, model, T=48):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == SUPPORTED[hf_family(model.config)]
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(idx).logits - model(idx)[0]).abs().max().item()


def rewrite(folder, fn):
    """Apply fn(name, tensor) -> tensor to every tensor of an exported folder, in place."""
    for f in (f for f in os.listdir(folder) if f.endswith(".safetensors")):
        path = os.path.join(folder, f)
        tensors = safetensors.load_file(path)
        safetensors.save_file({n: fn(n, t) for n, t in tensors.items()}, path, metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# weights and config: transformers gives nano's logits

@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_logits_match(exported, arch, tmp_path):
    model, out = exported(arch)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == arch
    assert logits_diff(out, model) <= 1e-4
    # negative control: a wrong RoPE row order in q/k must miss the 1e-4 above by 100x. Llama/Qwen3
    # as if nano's layout were Meta's interleaved one; DeepSeek-V3 without its re-interleaving.
    c = model.config
    wrong = str(tmp_path / "wrong")
    save_hf(model, wrong)
    if arch == "deepseek_v3":
        def bad(name, t):
            if name.endswith(("q_b_proj.weight", "q_proj.weight")):
                return rope_rows(t, c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim)
            if name.endswith("kv_a_proj_with_mqa.weight"):
                return rope_rows(t, 1, c.kv_lora_rank, c.qk_rope_head_dim)
            return t
    else:
        def bad(name, t):
            heads = {"q_proj": c.n_head, "k_proj": c.n_kv_head}.get(name.split(".")[-2])
            return rope_rows(t, heads, 0, c.head_dim, to_interleaved=True) if heads else t
    rewrite(wrong, bad)
    assert logits_diff(wrong, model) > 1e-2


def test_transformers_mtp_logits_match(exported):
    """DeepSeek's MTP layers (model.layers.{n_layer + k}) read by transformers' own MtpModel loader."""
    from transformers.modeling_layers import MtpModel
    model, out = exported("deepseek_v3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # transformers finds MTP weights by its DeepSeek-V3 pattern "model.layers.61" (the full model's
    # layer count); point it at this model's MTP layers
    c = model.config
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{c.n_layer + k}\..*"
                                             for k in range(c.mtp_depth)]
    mtp = MtpModel.from_pretrained(hf).eval()
    T = 21
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h, pos = hf.model(idx).last_hidden_state, torch.arange(T - 1)[None]
        h1 = mtp.forward_layer(0, h[:, :-1], pos, None, input_ids=idx[:, 1:])
        h2 = mtp.forward_layer(1, h1[:, :-1], pos[:, :-1], None, input_ids=idx[:, 2:])
        ours1, g1 = model.mtp_draft(model.hidden_states(idx)[:, :-1], idx[:, 1:], depth=1)
        ours2, _ = model.mtp_draft(g1[:, :-1], idx[:, 2:], depth=2)
        assert (ours1 - hf.lm_head(h1)).abs().max().item() <= 1e-4
        assert (ours2 - hf.lm_head(h2)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_bit_exact_and_sharded(exported, arch):
    model, out = exported(arch)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    stored = {n: f for f in files for n in safetensors.load_file(os.path.join(out, f))}
    assert index["weight_map"] == stored
    back = load_hf(out)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_dense_mla_is_deepseek_with_dense_layers(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, attn="mla", q_lora_rank=0,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      intermediate_size=48, max_seq_len=64)
    model = peak(Transformer(cfg)).eval()
    save_hf(model, tmp_path / "out")
    assert logits_diff(str(tmp_path / "out"), model) <= 1e-4
    back = load_hf(str(tmp_path / "out")).state_dict()
    assert all(torch.equal(t, back[n]) for n, t in model.state_dict().items())


# -----------------------------------------------------------------------------
# tokenizer: AutoTokenizer gives nano's ids

@pytest.mark.parametrize("flavour", ["nano", "llama3"])
def test_auto_tokenizer_matches_nano(runs, corpus, flavour, tmp_path):
    tok = load_run(runs("llama"))[1]
    if flavour == "llama3":  # the same ranks as a bare tiktoken file: read as Meta's tokenizer.model
        tok.save(tmp_path / "tokenizer.model")
        os.remove(tmp_path / "tokenizer.model.special.json")
        tok = Tokenizer.load(tmp_path / "tokenizer.model")
        assert tok.bos == "<|begin_of_text|>" and len(tok.special_tokens) == 256
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save_hf(model, tmp_path / "out", tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    docs = [open(os.path.join(corpus, f), encoding="utf-8").read() for f in sorted(os.listdir(corpus))[:3]]
    specials_as_text = " ".join(tok.special_tokens) + "x<|bos|>y"
    for text in TEXTS + docs + [specials_as_text]:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False, split_special_tokens=True).input_ids == ids, text[:50]
        # <bos> first by default, as in training
        assert hf(text, split_special_tokens=True).input_ids == [tok.bos_id] + ids
        assert hf.decode(ids) == text
    for t, i in tok.special_tokens.items():
        assert hf.convert_tokens_to_ids(t) == i and hf.decode([i]) == t
        assert hf(t, add_special_tokens=False).input_ids == [i]  # spelled out, it is the special token
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_auto_tokenizer_takes_whole_chunk_tokens(tmp_path):
    """tiktoken looks a whole chunk up before merging (Llama-3 has tokens that its merges never build):
    a token with no merge leading to it is still found."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b" abc": 257})  # " abc" is not reachable: no " a", "bc" or " ab" token
    tok = Tokenizer("t", GPT4_SPLIT, ranks, {"<|bos|>": 258, "<|eos|>": 259, "<|pad|>": 260}, *NANO_SPECIALS)
    save_hf(Transformer(ModelConfig(vocab_size=261, n_layer=1, n_head=2, n_embd=16)), tmp_path / "out", tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in (" abc", "abc", " abcd", "xab abc"):
        assert hf(text, add_special_tokens=False).input_ids == tok.encode(text), text
    assert tok.encode(" abc") == [257]


def test_auto_tokenizer_matches_tiktoken_on_random_vocabularies(tmp_path):
    """tiktoken merges the adjacent pair whose bytes make the lowest-ranked token, Hugging Face the pair
    listed first among the merges: on small random vocabularies, every string of a, b, c up to length 6
    gets the same ids."""
    strings = ["".join(w) for n in range(1, 7) for w in itertools.product("abc", repeat=n)]
    for seed in range(4):
        rnd, ranks, pieces = random.Random(seed), {bytes([b]): b for b in range(256)}, [b"a", b"b", b"c"]
        while len(ranks) < 256 + 24:  # each new token joins two existing ones, as BPE training does
            t = rnd.choice(pieces) + rnd.choice(pieces)
            if t not in ranks and len(t) <= 5:
                ranks[t] = len(ranks)
                pieces.append(t)
        specials = {s: len(ranks) + i for i, s in enumerate(NANO_SPECIALS)}
        tok = Tokenizer("t", GPT4_SPLIT, ranks, specials, *NANO_SPECIALS)
        out = tmp_path / str(seed)
        save_hf(Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)), out, tok)
        hf = transformers.AutoTokenizer.from_pretrained(str(out))
        assert hf(strings, add_special_tokens=False).input_ids == [tok.encode(s) for s in strings], seed


# -----------------------------------------------------------------------------
# the CLI and refusals

def one_line_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_cli_export(runs, env, tmp_path):
    out = tmp_path / "hf"
    r = run("nano.convert", ["export", runs("llama"), str(out), "--dtype", "bf16"], env)
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    gen = json.load(open(out / "generation_config.json"))
    tok = load_run(runs("llama"))[1]
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tok.bos_id, tok.eos_id)

    (out / "config.json").write_text("mine")  # an existing folder is kept, unless --force
    one_line_error(run("nano.convert", ["export", runs("llama"), str(out)], env), "not empty", "--force")
    assert (out / "config.json").read_text() == "mine"
    r = run("nano.convert", ["export", runs("llama"), str(out), "--force"], env)
    assert r.returncode == 0, r.stderr
    assert json.load(open(out / "config.json"))["model_type"] == "llama"
    assert os.listdir(tmp_path) == ["hf"]  # no temp or old folders left


def test_cli_refusals_leave_nothing(env, runs, tmp_path):
    one_line_error(run("nano.convert", ["export", str(tmp_path), str(tmp_path / "a")], env), "no checkpoint")
    # a config with no Hugging Face equivalent: experts under GQA attention
    tok = load_run(runs("llama"))[1]
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, n_routed_experts=4)
    save_checkpoint(str(tmp_path / "moe" / "ckpt.pt"), {"model": Transformer(cfg).state_dict(),
                                                       "model_config": asdict(cfg), "tokenizer": tok.state(),
                                                       "step": 0})
    one_line_error(run("nano.convert", ["export", str(tmp_path / "moe"), str(tmp_path / "b")], env),
                   "n_routed_experts=4")
    assert sorted(os.listdir(tmp_path)) == ["moe"]


@pytest.mark.parametrize("kw,field", [
    (dict(n_routed_experts=4), "n_routed_experts=4"), (dict(mtp_depth=1), "mtp_depth=1"),
    (dict(attn="mla", qk_norm=True), "qk_norm"), (dict(attn="mla", n_routed_experts=4, score_func="softmax"),
                                                   "score_func"),
    (dict(attn="mla", n_routed_experts=4, n_shared_experts=0), "n_shared_experts=0")])
def test_refused_configs_name_the_field(kw, field, tmp_path):
    model = Transformer(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, kv_lora_rank=8,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, **kw))
    with pytest.raises(ValueError, match=field):
        save_hf(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_no_new_folder(monkeypatch, tmp_path, existing):
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    out = tmp_path / "out"
    if existing:  # --force over an old export: the old one stays when the new one fails
        save_hf(model, out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls, save_file = [], safetensors.save_file

    def interrupted(*a, **kw):  # Ctrl-C after the first shard is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save_file(*a, **kw)
    monkeypatch.setattr(safetensors, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_hf(model, out, force=True, max_shard_bytes=1000)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])


def test_tokenizer_larger_than_the_model_is_refused(runs, tmp_path):
    tok = load_run(runs("llama"))[1]
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        save_hf(Transformer(ModelConfig(vocab_size=tok.vocab_size - 1, n_layer=1, n_head=2, n_embd=16)),
                tmp_path / "out", tok)
    assert os.listdir(tmp_path) == []
