"""nano/optim.py: Newton-Schulz against an SVD reference, one Muon step against a float64 re-derivation,
the learning-rate schedule, the parameter groups; train.py --optimizer muon end to end, exact resume,
and 2 processes (DDP, FSDP2) following 1."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nano.config import ModelConfig, TrainConfig
from nano.model import Transformer
from nano.optim import NS_COEFFS, Muon, build_optimizers, lr_at, newton_schulz, param_groups
from common import run_script, script_env, stdlib_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_spectrum(shape, s, seed=0):
    """A float64 matrix (or stack) U diag(s) V^T with random orthonormal U, V: (G, U, V)."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    U = torch.linalg.qr(torch.randn(*batch, m, len(s), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, len(s), generator=g, dtype=torch.float64))[0]
    return U @ torch.diag_embed(s.expand(*batch, len(s))) @ V.mT, U, V


def ns_reference(G, steps=5):
    """What the quintic iteration does, in float64 through the SVD: each singular value x of G / ||G||_F
    goes through p(x) = a x + b x^3 + c x^5 `steps` times; the singular vectors stay."""
    a, b, c = NS_COEFFS
    U, s, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    x = s / s.square().sum(-1, keepdim=True).sqrt()
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return U @ torch.diag_embed(x) @ Vh


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (3, 48, 24)])
def test_newton_schulz_against_svd(shape):
    k = min(shape[-2:])
    s = torch.logspace(0, -1.7, k, dtype=torch.float64)  # singular values 1 .. 0.02
    assert (s / s.norm()).min() >= 3e-3  # the floor above which NS_COEFFS promise [0.68, 1.21]
    G, U, V = with_spectrum(shape, s)
    X = newton_schulz(G.float(), steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    assert (X.double() - ns_reference(G)).abs().max() < 1e-5
    # singular vectors kept: U^T X V is diagonal, and its diagonal (the new singular values) is in the band
    D = U.mT @ X.double() @ V
    sv = torch.diagonal(D, dim1=-2, dim2=-1)
    assert (D - torch.diag_embed(sv)).abs().max() < 1e-5
    assert sv.min() > 0.68 and sv.max() < 1.21, (sv.min(), sv.max())
    # in bf16 (as on CUDA) the singular values still land near the band
    sv16 = torch.linalg.svdvals(newton_schulz(G.float(), dtype=torch.bfloat16).double())
    assert sv16.min() > 0.6 and sv16.max() < 1.3


def test_muon_steps_match_float64_rederivation():
    torch.manual_seed(0)
    shapes, lr, mu, wd = [(24, 40), (40, 24), (3, 16, 8)], 0.02, 0.9, 0.1
    for nesterov in (True, False):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        ref = [p.detach().double().clone() for p in params]
        bufs = [torch.zeros_like(r) for r in ref]
        opt = Muon(params, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
        for _ in range(3):
            grads = [torch.randn(s) for s in shapes]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for i, g in enumerate(grads):  # the rule of Muon's docstring, re-derived in float64
                g = g.double()
                bufs[i] = mu * bufs[i] + g
                u = g + mu * bufs[i] if nesterov else bufs[i]
                rows, cols = shapes[i][-2:]
                ref[i] = ref[i] * (1 - lr * wd) - lr * 0.2 * max(rows, cols) ** 0.5 * ns_reference(u)
        for p, r in zip(params, ref):
            assert (p.double() - r).abs().max() < 1e-5, nesterov
    with pytest.raises(ValueError, match="give it to AdamW"):
        Muon([torch.nn.Parameter(torch.ones(4))], lr=0.1)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup to the peak
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # cosine: halfway between peak and floor at mid-decay
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(150, cfg) == pytest.approx(0.1)
    cosine = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert lr_at(55, cfg, peak=0.02) == pytest.approx(0.011)  # another peak (Muon's): same shape, scaled
    wsd = TrainConfig(lr=1.0, max_steps=100, warmup_steps=10, min_lr_ratio=0.2, schedule="wsd")
    assert lr_at(5, wsd) == pytest.approx(0.6)
    assert [lr_at(s, wsd) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])  # stable until 80%
    assert [lr_at(s, wsd) for s in (90, 100)] == pytest.approx([0.6, 0.2])  # then linear to lr * min_lr_ratio


def names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_param_groups():
    # dense, tied: AdamW only; no weight decay on the norms and the (tied) embedding
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, qk_norm=True))
    g = param_groups(model)
    assert set(g) == {"decay", "no_decay"}
    assert names(model, g["decay"]) == {f"layers.0.{n}.weight" for n in ("attention.wq", "attention.wk",
                                        "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                        "feed_forward.w3")}
    assert names(model, g["no_decay"]) == {"tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight",
                                           "layers.0.ffn_norm.weight", "layers.0.attention.q_norm.weight",
                                           "layers.0.attention.k_norm.weight"}
    opt = build_optimizers(model, TrainConfig(weight_decay=0.1))
    assert list(opt) == ["adamw"] and [grp["weight_decay"] for grp in opt["adamw"].param_groups] == [0.1, 0.0]

    # MLA + MoE + MTP, untied: Muon for every hidden matrix (expert stacks, router, MTP projection and block
    # included); AdamW with decay for the head, without for the embedding and every norm
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, attn="mla", q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, mtp_depth=1,
                      tie_embeddings=False)
    model = Transformer(cfg)
    g = param_groups(model, muon=True)
    all_names = {n for n, _ in model.named_parameters()}
    assert sum(len(v) for v in g.values()) == len(all_names)  # disjoint
    assert set().union(*(names(model, v) for v in g.values())) == all_names  # and complete
    assert names(model, g["decay"]) == {"output.weight"}
    assert names(model, g["no_decay"]) == {n for n in all_names if n == "tok_embeddings.weight" or "norm" in n}
    muon = names(model, g["muon"])
    for n in ("layers.0.attention.wq_a.weight", "layers.0.attention.wkv_b.weight", "layers.0.feed_forward.w1.weight",
              "layers.1.feed_forward.experts.w2", "layers.1.feed_forward.gate.weight",
              "layers.1.feed_forward.shared_experts.w3.weight", "mtp.0.eh_proj.weight",
              "mtp.0.block.feed_forward.experts.w1", "mtp.0.block.attention.wo.weight"):
        assert n in muon, n
    opt = build_optimizers(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1))
    assert opt["muon"].param_groups[0]["lr"] == 0.02 and opt["adamw"].param_groups[0]["lr"] == 1e-3
    assert build_optimizers(model, TrainConfig(optimizer="muon", lr=1e-3))["muon"].param_groups[0]["lr"] == 1e-3


# -----------------------------------------------------------------------------
# train.py end to end (subprocesses): one small MoE model, so that Muon also meets 3-D expert stacks

ARGS = ["--preset", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1",
        "--n-routed-experts", "4", "--num-experts-per-tok", "2", "--moe-intermediate-size", "32",
        "--first-k-dense-replace", "1", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
        "--grad-accum", "2", "--warmup-steps", "1", "--max-steps", "6", "--eval-every", "3", "--eval-steps", "1",
        "--log-every", "1", "--lr", "3e-3", "--muon-lr", "1e-2", "--optimizer", "muon", "--sample-every", "0"]


def train(args, env, nproc=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if nproc > 1:
        r = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
    else:  # python train.py args, from a pre-imported interpreter (tests/common.py)
        r = run_script(os.path.join(ROOT, "train.py"), args, env)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process Muon run every other test here compares with."""
    d = stdlib_corpus(tmp_path_factory.mktemp("corpus"))
    env = script_env(tmp_path_factory.mktemp("cache"))
    out = str(tmp_path_factory.mktemp("single"))
    train([*ARGS, "--data", str(d), "--out-dir", out], env)
    return [*ARGS, "--data", str(d)], env, out


def test_train_muon_end_to_end_and_exact_resume(single, tmp_path):
    args, env, ref = single
    losses = [r["loss"] for r in records(ref)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    state = torch.load(os.path.join(ref, "ckpt.pt"), weights_only=True)
    assert state["train_config"]["optimizer"] == "muon"
    momentum = {k for k, v in state["optimizer"]["state"].items() if "momentum_buffer" in v}
    assert "layers.1.feed_forward.experts.w1" in momentum and "layers.0.attention.wq.weight" in momentum
    assert "tok_embeddings.weight" not in momentum

    out = str(tmp_path / "resumed")
    train([*args, "--out-dir", out, "--stop-after", "3"], env)
    r = train([*args, "--out-dir", out, "--resume", "--optimizer", "adamw"], env, check=False)
    assert r.returncode != 0 and "was trained with --optimizer muon" in r.stderr.strip().splitlines()[-1]
    train([*args, "--out-dir", out, "--resume"], env)
    key = lambda r: (r["step"], r["loss"], r["grad_norm"])  # noqa: E731
    assert list(map(key, records(out))) == list(map(key, records(ref)))  # bit-identical
    resumed = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_one(single, tmp_path, parallel):
    """Muon's update from the all-reduced gradient (DDP), or from gathered shards (FSDP2), is the
    1-process one: losses and gradient norms within 1e-5."""
    args, env, ref = single
    out = str(tmp_path / parallel)
    train([*args, "--out-dir", out, "--parallel", parallel], env, nproc=2)
    got, want = records(out), records(ref)
    assert len(got) == len(want) == 6
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in got], [r[key] for r in want]
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b)), (key, a, b)
