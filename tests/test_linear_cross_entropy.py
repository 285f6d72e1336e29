"""kernels.linear_cross_entropy: the Triton path (interpreted on CPU, TRITON_INTERPRET=1 from conftest)
against float64 PyTorch, with flash-attention's tolerance rule: max|err| <= 2 * max|err of the same
computation in plain PyTorch at the same dtype| + a small atol."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from nano.config import ModelConfig
from nano.model import Transformer

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="needs triton (interpreted on CPU)")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: a second OpenMP thread only adds wake-up latency to every op (x10 on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# atol relative to the largest reference value: only for cases where torch's own error is ~0
ATOL = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _oracle(h, w, t, ignore_index=-100, scale=None):
    """float64 loss and gradients, written out independently of kernels.py."""
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    z = h @ w.T * (1.0 if scale is None else scale)
    keep = t != ignore_index
    loss = (torch.logsumexp(z[keep], -1) - z[keep].gather(-1, t[keep][:, None]).squeeze(-1)).mean()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _run(fn, h, w, t, dloss=1.0, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, t, **kw)
    (loss * dloss).backward()
    return loss.detach(), h.grad / dloss, w.grad / dloss


def _assert_close(name, got, torch_same_dtype, ref, dtype):
    err = (got.double() - ref).abs().max().item()
    base = (torch_same_dtype.double() - ref).abs().max().item()
    atol = ATOL[dtype] * ref.abs().max().item()
    assert err <= 2 * base + atol, f"{name}: err {err:.3g} > 2 * torch err {base:.3g} + {atol:.3g}"


def _data(N, D, V, dtype, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * D ** -0.5 * 3).to(dtype)  # logits with std ~3: peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    if N > 1 and ignore_frac > 0:
        t[0] = -100
    return h, w, t


# (N, D, V, softmax_scale, fraction ignored, vocabulary columns per chunk or None = one chunk);
# chunk widths round up to whole 128-column tiles
SHAPES = [
    (1, 16, 97, None, 0.0, None),
    (17, 48, 257, 0.5, 0.2, 100),  # 3 chunks of 86 columns round up to 128: 128, 128 and a 1-column one
    (64, 64, 1000, None, 0.1, 128),  # 8 chunks: 7 of 128 columns, the last 104
    (129, 96, 5000, 2.0, 0.3, 1700),  # 3 chunks of 1667 -> 1792 columns: 1792, 1792, 1416
    (300, 33, 1531, None, 0.05, None),
    (200, 192, 1024, 0.125, 0.5, 512),  # 2 chunks of exactly the interpreter's BLOCK_V
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s[:3]))
def test_matches_float64(shape, dtype, monkeypatch):
    # bf16 is tested here because this kernel has no tl.dot (the interpreter's bf16 dot is what breaks)
    N, D, V, scale, ignore_frac, chunk = shape
    if chunk is not None:
        monkeypatch.setattr(kernels, "LCE_CHUNK_BYTES", N * chunk * dtype.itemsize)
        assert kernels._lce_chunk_cols(N, V, dtype.itemsize) < V  # the chunk boundaries are really crossed
    h, w, t = _data(N, D, V, dtype, ignore_frac, seed=N + V)
    ref = _oracle(h, w, t, scale=scale)
    got = _run(kernels.linear_cross_entropy, h, w, t, softmax_scale=scale)
    base = _run(kernels.linear_cross_entropy_reference, h, w, t, softmax_scale=scale)
    for name, a, b, r in zip(("loss", "dh", "dW"), got, base, ref):
        _assert_close(name, a, b, r, dtype)
    assert got[1].dtype == dtype and got[2].dtype == dtype


def test_tied_weight_gets_both_gradients():
    # the LM head's weight is also the embedding table: autograd must add the two gradients
    N, D, V = 40, 32, 211
    h, w, t = _data(N, D, V, torch.float32, 0.1, seed=1)
    idx = torch.randint(0, V, (N,))
    proj = torch.randn(D, D) * D ** -0.5

    def run(loss_fn, w):
        w = w.detach().clone().requires_grad_()
        hh = torch.tanh(F.embedding(idx, w) @ proj.to(w.dtype)) + h.to(w.dtype)  # h depends on w too
        loss = loss_fn(hh, w, t)
        loss.backward()
        return loss.detach(), w.grad

    loss, dw = run(kernels.linear_cross_entropy, w)
    loss64, dw64 = run(lambda hh, w, t: _oracle_loss(hh, w, t), w.double())
    assert abs(loss.item() - loss64.item()) < 1e-5
    assert (dw.double() - dw64).abs().max() < 1e-6 * dw64.abs().max() + 1e-8
    # and the embedding's part is really there: it changes dW
    _, dw_head_only = _run(kernels.linear_cross_entropy, h, w, t)[1:]
    assert (dw_head_only.double() - dw64).abs().max() > 1e-3 * dw64.abs().max()


def _oracle_loss(h, w, t):
    z = h @ w.T
    keep = t != -100
    return (torch.logsumexp(z[keep], -1) - z[keep].gather(-1, t[keep][:, None]).squeeze(-1)).mean()


@pytest.mark.parametrize("N", [0, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_ignored_is_nan_loss_with_zero_grads_like_torch(dtype, N):
    h, w, t = _data(N, 16, 101, dtype, 0.0, seed=2)
    t[:] = -100
    loss, dh, dw = _run(kernels.linear_cross_entropy, h, w, t)
    ref_loss, ref_dh, ref_dw = _run(kernels.linear_cross_entropy_reference, h, w, t)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.equal(dh, ref_dh) and torch.equal(dw, ref_dw) and not dh.any() and not dw.any()


def test_fp16_gradients_survive_loss_scaling():
    # a GradScaler's dloss of 2^16 must reach (softmax - onehot) before its rounding to fp16 together with
    # 1/n_valid: without dloss small values underflow, without 1/n_valid the target's (p - 1) * 2^16 overflows
    h, w, t = _data(256, 32, 3001, torch.float16, 0.0, seed=3)
    ref = _oracle(h, w, t)
    got = _run(kernels.linear_cross_entropy, h, w, t, dloss=2.0 ** 16)
    base = _run(kernels.linear_cross_entropy_reference, h, w, t, dloss=2.0 ** 16)
    for name, a, b, r in zip(("loss", "dh", "dW"), got, base, ref):
        _assert_close(name, a, b, r, torch.float16)


def _saved_tensors(fn, h, w, t):
    """fn(h, w, t) and every tensor its autograd graph saves for the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = fn(h, w, t)
    return loss, saved


def test_graph_saves_no_logits(monkeypatch):
    # the point of both designs: no (N, V) tensor lives from the forward to the backward. The recompute path
    # saves h, W, targets (autograd holds them anyway) and (N,) floats; the fused one the fp32 gradients
    N, D, V = 64, 32, 1000
    monkeypatch.setattr(kernels, "LCE_CHUNK_BYTES", N * 256 * 4)  # several chunks
    h, w, t = _data(N, D, V, torch.float32, 0.1, seed=9)
    h, w = h.requires_grad_(), w.requires_grad_()
    nbytes = lambda x: x.numel() * x.element_size()  # noqa: E731
    rows = lambda h, w, t: kernels.linear_cross_entropy(h, w, t, reduction="none").sum()  # noqa: E731
    loss, saved = _saved_tensors(rows, h, w, t)
    inputs = {x.data_ptr() for x in (h, w, t)}
    assert inputs <= {x.data_ptr() for x in saved}  # the hook sees the Function's saves
    others = [x for x in saved if x.data_ptr() not in inputs]
    assert all(x.numel() <= N and x.dtype == torch.float32 for x in others), [x.shape for x in others]
    assert sum(map(nbytes, saved)) <= nbytes(h) + nbytes(w) + nbytes(t) + 4 * N  # + lse
    loss.backward()
    assert h.grad is not None and w.grad is not None
    loss, saved = _saved_tensors(kernels.linear_cross_entropy, h, w, t)  # the fused training loss
    assert sorted(tuple(x.shape) for x in saved) == [(), (N, D), (V, D)], [x.shape for x in saved]
    # and the check can fail: the reference's graph holds (N, V) tensors
    _, saved_ref = _saved_tensors(kernels.linear_cross_entropy_reference, h, w, t)
    assert max(x.numel() for x in saved_ref) >= N * V


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "N{}-D{}-V{}".format(*s[:3]))
def test_recompute_path_per_row_losses(shape, dtype, reduction, monkeypatch):
    # reduction "none" (DPO's per-token log-probs) and "sum" take the recompute path: each row's loss and
    # the gradients of a random weighting of them, against float64
    N, D, V, scale, ignore_frac, chunk = shape
    monkeypatch.setattr(kernels, "LCE_CHUNK_BYTES", N * chunk * dtype.itemsize)
    h, w, t = _data(N, D, V, dtype, ignore_frac, seed=N)
    weights = torch.rand(N, dtype=torch.float64) if reduction == "none" else torch.ones((), dtype=torch.float64)

    def run(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = fn(h, w, t, softmax_scale=scale, reduction=reduction)
        (out.double() * weights).sum().backward()
        return out.detach(), h.grad, w.grad

    got = run(kernels.linear_cross_entropy, h, w)
    base = run(kernels.linear_cross_entropy_reference, h, w)
    ref = run(kernels.linear_cross_entropy_reference, h.double(), w.double())
    assert got[0].shape == ((N,) if reduction == "none" else ())
    for name, a, b, r in zip(("loss", "dh", "dW"), got, base, ref):
        _assert_close(name, a, b, r, dtype)


def test_mean_without_grad_equals_fused_mean():
    h, w, t = _data(70, 24, 500, torch.float16, 0.2, seed=11)
    with torch.no_grad():
        plain = kernels.linear_cross_entropy(h, w, t)  # recompute path: the mean of per-row losses
    fused = kernels.linear_cross_entropy(h, w.clone().requires_grad_(), t)
    assert torch.allclose(plain, fused.detach(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        kernels.linear_cross_entropy(h, w, t, reduction="max")


def test_second_backward_with_retain_graph_gives_the_same_gradients():
    # the backward recomputes from what was saved and must not change any of it
    h, w, t = _data(33, 16, 300, torch.float32, 0.2, seed=10)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = kernels.linear_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    dh, dw = h.grad.clone(), w.grad.clone()
    loss.backward()
    assert torch.allclose(h.grad, 2 * dh) and torch.allclose(w.grad, 2 * dw)


def test_custom_ignore_index_int32_targets_and_one_input_needing_grad():
    h, w, t = _data(30, 16, 150, torch.float32, 0.0, seed=4)
    t[::3] = 7  # ignore_index 7: also a valid vocabulary id, must still be skipped
    ref_loss, ref_dh, ref_dw = _oracle(h, w, t, ignore_index=7)
    hg = h.clone().requires_grad_()
    loss = kernels.linear_cross_entropy(hg, w, t.int(), ignore_index=7)  # frozen weight
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert (hg.grad.double() - ref_dh).abs().max() < 1e-6
    wg = w.clone().requires_grad_()
    kernels.linear_cross_entropy(h, wg, t, ignore_index=7).backward()  # frozen h
    assert (wg.grad.double() - ref_dw).abs().max() < 1e-6


def test_no_grad_and_autocast():
    h, w, t = _data(50, 24, 333, torch.float32, 0.1, seed=5)
    ref = _oracle(h, w, t)[0]
    with torch.no_grad():
        assert abs(kernels.linear_cross_entropy(h, w, t).item() - ref.item()) < 1e-5
    # under autocast both inputs are cast to its dtype first (fp32 master weights, as in training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(kernels.linear_cross_entropy, h, w, t)
        base = _run(kernels.linear_cross_entropy_reference, h, w, t)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, a, b, r in zip(("loss", "dh", "dW"), got, base, _oracle(h, w, t)):
        _assert_close(name, a, b, r, torch.bfloat16)


def test_dispatch_reaches_the_kernel_and_force_reference(monkeypatch):
    h, w, t = _data(5, 16, 97, torch.float32, 0.0, seed=6)
    calls = []
    real = kernels.linear_cross_entropy_reference
    monkeypatch.setattr(kernels, "linear_cross_entropy_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    kernels.linear_cross_entropy(h, w, t)
    assert calls == []  # the Triton path ran, not the reference
    monkeypatch.setattr(kernels, "FORCE_REFERENCE", True)
    kernels.linear_cross_entropy(h, w, t)
    assert calls == [1]


def test_out_of_range_target_gives_nan():
    h, w, t = _data(6, 16, 97, torch.float32, 0.0, seed=7)
    t[2] = 97
    with torch.no_grad():
        assert torch.isnan(kernels.linear_cross_entropy(h, w, t))


@pytest.mark.parametrize("args, match", [
    (((3, 16), (97, 8), (3,), torch.int64, torch.float32), "must be \\(N, D\\) and weight \\(V, D\\)"),
    (((2, 3, 16), (97, 16), (6,), torch.int64, torch.float32), "flatten the batch"),
    (((3, 16), (97, 16), (4,), torch.int64, torch.float32), "targets must be int64"),
    (((3, 16), (97, 16), (3,), torch.float32, torch.float32), "targets must be int64"),
    (((3, 16), (97, 16), (3,), torch.int64, torch.float16), "cast one or run under torch.autocast"),
])
def test_bad_input_errors(args, match):
    hs, ws, ts, tdtype, wdtype = args
    with pytest.raises(ValueError, match=match):
        kernels.linear_cross_entropy(torch.randn(hs), torch.randn(ws, dtype=wdtype),
                                     torch.zeros(ts, dtype=tdtype))


def test_under_torch_compile():
    # the fused path is a graph break for torch.compile (aot_eager here: no C++ toolchain needed)
    h, w, t = _data(40, 16, 211, torch.float32, 0.1, seed=8)
    p = torch.randn(16, 16) / 4

    def f(h, w, t, p):
        return kernels.linear_cross_entropy(torch.tanh(h @ p), w, t)

    got = [x.grad for x in _grads(torch.compile(f, backend="aot_eager"), h, w, t, p)]
    ref = [x.grad for x in _grads(f, h.double(), w.double(), t, p.double())]
    for a, b in zip(got, ref):
        assert (a.double() - b).abs().max() < 1e-6 * b.abs().max()


def _grads(f, h, w, t, p):
    w, p = w.clone().requires_grad_(), p.clone().requires_grad_()
    f(h, w, t, p).backward()
    return w, p


def _train_curve(fused, steps=10):
    torch.manual_seed(0)
    # the attention runs the PyTorch reference in both curves: it is the same in both, and the interpreted
    # attention kernel would take most of the test's time
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=32,
                      tie_embeddings=True, attn_impl="reference")
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (4, 16), generator=g)
    tgt = torch.roll(idx, -1, 1)
    tgt[:, -1] = -100
    curve = []
    for _ in range(steps):
        if fused:
            h = model.hidden_states(idx)
            loss = kernels.linear_cross_entropy(h.flatten(0, 1), model.output.weight, tgt.reshape(-1))
        else:
            _, loss = model(idx, tgt)  # lm_loss's plain path (the fused one is CUDA only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve, dtype=torch.float64), model.tok_embeddings.weight.detach()


def test_training_curve_agrees_with_plain_path():
    plain, w_plain = _train_curve(fused=False)
    fused, w_fused = _train_curve(fused=True)
    assert plain[-1] < plain[0] - 0.5  # it learns (memorises the batch), so the curves mean something
    assert (plain - fused).abs().max() < 1e-5, (plain, fused)
    assert (w_plain - w_fused).abs().max() < 1e-4



def _nan_filled(make):
    # uninitialised memory may hold any bit pattern: give every new float buffer NaNs, so that a read of
    # memory that was never written shows up every time instead of now and then
    def empty(*args, **kw):
        x = make(*args, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    return empty


def _read_row_padding(a):
    # torch 2.13's CPU bf16 GEMM was seen to read a row-strided operand's padding (the columns between its
    # width and its row stride), multiplying it by zeros: harmless when finite, a NaN row when it holds a
    # NaN. Not every CPU does (this one may not), so the test does it on every machine.
    if a.dim() == 2 and a.numel() and a.stride(1) == 1 and a.stride(0) > a.shape[1]:
        pad = a.as_strided((a.shape[0], a.stride(0) - a.shape[1]), a.stride(), a.storage_offset() + a.shape[1])
        a = a + (pad * 0).sum(1, keepdim=True)
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_no_read_of_uninitialised_memory(dtype, monkeypatch):
    # issue 22: the logits buffer's padding columns came from torch.empty and reached a GEMM
    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, _nan_filled(getattr(torch, name)))
    mm, addmm_ = torch.mm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: mm(_read_row_padding(a), b, **kw))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda c, a, b, **kw: addmm_(c, _read_row_padding(a), b, **kw))
    # one padded chunk (V = 333 -> 384 columns), and several chunks whose last one is narrower
    for N, D, V, chunk_cols in [(37, 24, 333, None), (300, 33, 1531, 600)]:
        if chunk_cols is not None:
            monkeypatch.setattr(kernels, "LCE_CHUNK_BYTES", N * chunk_cols * dtype.itemsize)
        h, w, t = _data(N, D, V, dtype, 0.1, seed=V)
        got = _run(kernels.linear_cross_entropy, h, w, t)
        ref = _oracle(h, w, t)
        plain = _run(kernels.linear_cross_entropy_reference, h, w, t)
        for name, g, p, r in zip(("loss", "dh", "dw"), got, plain, ref):
            _assert_close(f"{name} V={V}", g, p, r, dtype)
