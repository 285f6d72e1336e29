"""The Triton flash-attention kernels (run by the interpreter on CPU) against attention_reference in float64.

Tolerance rule from flash-attention's tests: the kernel's error against the float64 result may be at most
twice the error of the same computation done by PyTorch in the input dtype, plus a small atol. bf16 is not
tested here: the interpreter's tl.dot on bf16 is wrong (triton#11584); bench/attention.py checks it on a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

import kernels
from nano.config import ModelConfig
from nano.model import Transformer

pytestmark = pytest.mark.skipif(kernels.triton is None or not kernels.INTERPRET,
                                reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it)")

# ~1 ulp of fp16 at the outputs' scale (1..2): the same-dtype reference computes in fp32 inside, so its
# error is little more than the final rounding, while the kernel also rounds P and dS to fp16 for its dots
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """These tests are about the kernel: run it even when NANO_FORCE_REFERENCE=1 is set for the suite."""
    monkeypatch.setattr(kernels, "FORCE_REFERENCE", False)


@pytest.fixture
def launches(monkeypatch):
    """Counts forward and backward launches, so that a silent fallback to the reference fails the test."""
    calls = {"fwd": 0, "bwd": 0}

    def spy(name, fn):
        def wrapped(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapped
    monkeypatch.setattr(kernels, "_flash_fwd", spy("fwd", kernels._flash_fwd))
    monkeypatch.setattr(kernels, "_flash_bwd", spy("bwd", kernels._flash_bwd))
    return calls


def attention_and_grads(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def check(q, k, v, launches, **kw):
    """Output and dq/dk/dv of flash_attention against float64, with the flash-attention tolerance rule."""
    do = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    got = attention_and_grads(kernels.flash_attention, q, k, v, do, **kw)
    same = attention_and_grads(kernels.attention_reference, q, k, v, do, **kw)
    exact = attention_and_grads(kernels.attention_reference, q.double(), k.double(), v.double(), do, **kw)
    assert launches == {"fwd": 1, "bwd": 1}, "the Triton kernel did not run"
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
        assert g.shape == e.shape and g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), name
        err, base = (g.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        assert err <= 2 * base + ATOL[q.dtype], f"{name}: error {err:.2e}, PyTorch {q.dtype} error {base:.2e}"
    return got


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


# dense: odd lengths (1, 17, 70 .. 200), GQA ratios 1/2/4/8, head dims 64/64, 192/128 (MLA), 96/96
DENSE = [(1, 1, 2, 1, 64, 64), (2, 17, 4, 4, 64, 64), (1, 200, 2, 1, 64, 64), (1, 100, 8, 1, 64, 64),
         (1, 70, 4, 1, 192, 128), (1, 129, 4, 2, 96, 96)]


def pairwise(shapes):
    """Each shape causal and non-causal, in fp32 and in fp16, but not all four pairings (the interpreter is
    slow): the pairing alternates from one shape to the next, so that every (mask, dtype) pair still meets
    several shapes. The dtype changes only the kernel's casts, the mask its loop bounds; the shape the rest."""
    dtypes = [(torch.float32, torch.float16), (torch.float16, torch.float32)]
    return [pytest.param(*shape, causal, dtype, id=f"{'-'.join(map(str, shape))}-"
                         f"{'causal' if causal else 'full'}-{'fp32' if dtype == torch.float32 else 'fp16'}")
            for i, shape in enumerate(shapes) for causal, dtype in zip((True, False), dtypes[i % 2])]


@pytest.mark.parametrize("B,T,Hq,Hkv,Dqk,Dv,causal,dtype", pairwise(DENSE))
def test_dense(B, T, Hq, Hkv, Dqk, Dv, causal, dtype, launches):
    torch.manual_seed(T * 7 + Hq + Dqk)
    q, k, v = (randn(B, T, h, d, dtype=dtype) for h, d in ((Hq, Dqk), (Hkv, Dqk), (Hkv, Dv)))
    check(q, k, v, launches, causal=causal)


def random_documents(seed, n, max_len=60):
    """n documents of random lengths in [1, max_len), one of them of length 1 when n > 1: int32 cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (n,), generator=g)
    if n > 1:
        lens[int(torch.randint(0, n, (1,), generator=g))] = 1
    return torch.cat((torch.zeros(1, dtype=torch.int64), lens.cumsum(0))).int()


@pytest.mark.parametrize("seed,n_docs,Hq,Hkv,Dqk,Dv,causal,dtype", pairwise([
    (1, 1, 2, 2, 64, 64), (0, 2, 4, 4, 64, 64), (1, 5, 4, 1, 192, 128), (2, 4, 8, 2, 96, 96), (0, 5, 2, 1, 64, 64)]))
def test_varlen(seed, n_docs, Hq, Hkv, Dqk, Dv, causal, dtype, launches):
    torch.manual_seed(seed)
    cu = random_documents(seed, n_docs)  # lengths e.g. [42], [23, 1], [42, 1, 46, 1, 30], [18, 33, 1, 45]
    total = int(cu[-1])
    q, k, v = (randn(total, h, d, dtype=dtype) for h, d in ((Hq, Dqk), (Hkv, Dqk), (Hkv, Dv)))
    check(q, k, v, launches, causal=causal, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Tq,Tk", [(20, 45), (45, 20)])
def test_unequal_lengths_and_empty_rows(Tq, Tk, causal, launches):
    # causal is aligned to the bottom right: with Tq > Tk the first Tq - Tk queries see no key at all,
    # and must come out as zeros with zero (not NaN) gradients
    torch.manual_seed(Tq)
    q, k, v = torch.randn(2, Tq, 4, 64), torch.randn(2, Tk, 2, 64), torch.randn(2, Tk, 2, 32)
    out, dq, _, _ = check(q, k, v, launches, causal=causal, softmax_scale=0.2)
    if causal and Tq > Tk:
        assert out[:, :Tq - Tk].abs().max() == 0 and dq[:, :Tq - Tk].abs().max() == 0


def test_strided_inputs(launches):
    # q, k, v as views into one fused projection, and a non-contiguous output gradient
    torch.manual_seed(5)
    qkv = torch.randn(2, 33, 3, 4, 64)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    do = torch.randn(2, 4, 33, 64).transpose(1, 2)
    got = attention_and_grads(kernels.flash_attention, q, k, v, do)
    ref = attention_and_grads(kernels.attention_reference, q.double(), k.double(), v.double(), do.double())
    for g, r in zip(got, ref):
        assert (g.double() - r).abs().max() < 1e-5
    assert launches == {"fwd": 1, "bwd": 1}


def test_dispatch(monkeypatch, launches):
    q = torch.randn(1, 8, 2, 16)
    kernels.flash_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())  # interpreter: bf16 dots are wrong
    kernels.flash_attention(q.double(), q.double(), q.double())  # no fp64 kernel
    monkeypatch.setattr(kernels, "FORCE_REFERENCE", True)
    kernels.flash_attention(q, q, q)
    assert launches["fwd"] == 0
    monkeypatch.setattr(kernels, "FORCE_REFERENCE", False)
    kernels.flash_attention(q, q, q)
    assert launches["fwd"] == 1


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="must divide"):
        kernels.flash_attention(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_model_matches_reference(packed, launches):
    """A small Transformer: the same logits and gradients through the kernel as with attn_impl="reference"."""
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg))
    ref = Transformer(ModelConfig(**cfg, attn_impl="reference"))
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (2, 40))
    cu = torch.tensor([0, 13, 14, 40, 71, 80], dtype=torch.int32) if packed else None
    results = []
    for m in (model, ref):
        logits, _ = m(idx, cu_seqlens=cu)
        logits.square().mean().backward()
        results.append((logits, {n: p.grad for n, p in m.named_parameters()}))
    assert launches == {"fwd": cfg["n_layer"], "bwd": cfg["n_layer"]}
    (logits, grads), (logits_ref, grads_ref) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        scale = grads_ref[name].abs().max().item()
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-3, atol=1e-6 * scale, msg=name)


def test_bench_smoke():
    """bench/attention.py --smoke runs a tiny shape through the interpreter and its correctness checks."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "attention.py"), "--smoke"], cwd=root,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "correct" in r.stdout


# -----------------------------------------------------------------------------
# issue 14: int64 offsets, tile tables once per batch, pinned configs, fp32 dot precision, scale > 0

def _offsets_past_2_31_elements():
    # q, k, v, O and dO as views whose token stride puts token 32 at element 2^31 of one buffer: rows *
    # stride wraps in int32 there (in the delta pre-pass too). The buffer is virtual memory: only the pages
    # of the 40 tokens are ever touched.
    T, D, S = 40, 16, 1 << 26
    buf = torch.empty(T * S, dtype=torch.float16)
    views = [buf.as_strided((T, 1, D), (S, D, 1), i * D) for i in range(5)]  # q, k, v, o, do
    torch.manual_seed(0)
    for x in views:
        x.copy_(torch.randn(T, 1, D))
    q, k, v, o_buf, do = views
    cu = torch.tensor([0, 3, T], dtype=torch.int32)
    o, lse = kernels._flash_fwd(q, k, v, True, 0.25, cu, None)
    ref = kernels.attention_reference(*(x.float() for x in (q, k, v)), softmax_scale=0.25, cu_seqlens=cu)
    assert (o.float() - ref).abs().max() < 2e-3
    o_buf.copy_(o)
    dq, dk, dv = kernels._flash_bwd(do, q, k, v, o_buf, lse, True, 0.25, cu, None)
    grads = attention_and_grads(kernels.attention_reference, *(x.float() for x in (q, k, v)), do.float(),
                                softmax_scale=0.25, cu_seqlens=cu)[1:]
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert (g.float() - r).abs().max() < 5e-3, name


def test_offsets_past_2_31_elements():
    # in a subprocess: an int32 offset that wraps reads far outside the buffer and crashes the interpreter
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import test_flash_attention as t; t._offsets_past_2_31_elements()"
    r = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.path.dirname(here)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_tile_tables_built_once_per_batch(monkeypatch, launches):
    builds = []
    real = kernels._varlen_tiles
    monkeypatch.setattr(kernels, "_varlen_tiles", lambda *a: builds.append(a[2:]) or real(*a))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, max_seq_len=64))
    idx = torch.randint(0, 97, (2, 24))
    cu = torch.tensor([0, 5, 24, 30, 48], dtype=torch.int32)
    model(idx, cu_seqlens=cu)[0].sum().backward()
    assert launches == {"fwd": 3, "bwd": 3}
    assert sorted(builds) == [(32, "kv"), (32, "q")]  # two tables for the 3 layers' 9 launches
    model(idx, cu_seqlens=cu.clone())[0].sum().backward()  # a new batch: new tables
    assert len(builds) == 4
    kernels._tiles(cu, 48, 16, "q")
    kernels._tiles(cu, 48, 16, "q")
    assert len(builds) == 5
    cu[1] = 7  # changed in place: its version counter moves, the table is rebuilt
    assert kernels._tiles(cu, 48, 16, "q").tolist() == real(cu, 48, 16, "q").tolist()
    assert len(builds) == 6


def test_pinned_configs(monkeypatch):
    # on a GPU (not interpreted): NANO_PIN_CONFIGS=1 or deterministic algorithms launch one fixed config
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "_smem_limit", lambda: 227 * 1024)  # H100 / H200
    hd128 = dict(D0=128, D1=0, DVP=128)
    assert kernels._launch_config("dkdv", 128, hd128, 2) is None  # autotuned
    monkeypatch.setattr(kernels, "PIN_CONFIGS", True)
    assert kernels._launch_config("dkdv", 128, hd128, 2) == {"BLOCK_M": 32, "num_warps": 8, "num_stages": 3}
    assert kernels._launch_config("fwd", 128, hd128, 2) == {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    # fp32 at head dim 256 does not fit 3 stages (or 2) in shared memory
    assert kernels._launch_config("fwd", 64, dict(D0=256, D1=0, DVP=256), 4)["num_stages"] == 1
    monkeypatch.setattr(kernels, "PIN_CONFIGS", False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert kernels._launch_config("dq", 128, hd128, 2) == {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3}


def test_fp32_dot_precision(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    assert kernels._dot_precision(torch.float32) == "tf32x3"  # not "ieee": FMA loops that spill
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert kernels._dot_precision(torch.float32) == "tf32"


def test_non_positive_scale_runs_the_reference(launches):
    # the kernels scale the scores after the row max, which holds only for scale > 0
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    out = kernels.flash_attention(q, k, v, softmax_scale=-0.3)
    assert launches["fwd"] == 0
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), softmax_scale=-0.3)
    assert (out.double() - ref).abs().max() < 1e-5
