"""The training forward as one graph with no host syncs (issue 13): torch.compile(fullgraph=True) of forward +
backward equals eager, few compilations over batches with other document counts, a dispatch-level sync
detector, and the kernels' custom ops checked by torch.library.opcheck. Graph capture uses aot_eager
(ENVIRONMENT.md: inductor compiles C++ for every graph on these CPUs); train.py --compile runs inductor once."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from nano.config import ModelConfig
from nano.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "gqa-qknorm": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True),
    "mla-qlora": dict(n_layer=2, n_head=2, n_embd=32, attn="mla", q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "mtp2": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mtp_depth=2),
    "moe": dict(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2,
                first_k_dense_replace=1, aux_loss_alpha=0.01),
}
B, T, V = 2, 24, 61


def _model(name, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=V, max_seq_len=64, intermediate_size=48, **CONFIGS[name])).train()


def _batch(bounds, seed):
    """(idx, targets, cu_seqlens): documents starting at `bounds` (plus every row start), -100 where a
    target would be another document's first token."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    starts = sorted(set(bounds) | set(range(0, B * T, T)))
    y = torch.roll(idx.reshape(-1), -1).clone()
    for s in starts[1:]:
        y[s - 1] = -100
    y[-1] = -100
    return idx, y.view(B, T), torch.tensor(starts + [B * T], dtype=torch.int32)


BATCHES = {  # other document counts each
    "one per row": [],
    "short documents": [3, 7, 8, 15, 30, 33, 41],
    "one-token documents": list(range(1, 12)) + [30, 31, 32, 40],
}


def _loss_and_grads(model, batch, fn=None):
    model.zero_grad()
    idx, y, cu = batch
    _, loss = (model if fn is None else fn)(idx, y, cu_seqlens=cu)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, grad_ckpt", [("gqa-qknorm", "none"), ("mla-qlora", "none"), ("mtp2", "full"),
                                             ("moe", "selective")])
def test_compiled_training_graph_equals_eager(name, grad_ckpt, monkeypatch):
    """fullgraph=True fails on any graph break; the counting backend shows the graph really was compiled
    (not a silent eager fallback) and how often: at most twice over batches with other document counts.
    The MLA model runs the Triton kernels' custom op (interpreted); the others the reference, which
    compile traces as plain ops (the interpreter is slow, and the op is the same in every model)."""
    if name != "mla-qlora":
        monkeypatch.setattr(kernels, "INTERPRET", False)
    torch._dynamo.reset()
    model = _model(name)
    model.set_grad_ckpt(grad_ckpt)
    compiled_graphs = []

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for seed, bounds in enumerate(BATCHES.values()):
        batch = _batch(bounds, seed)
        want, want_grads = _loss_and_grads(model, batch)
        got, got_grads = _loss_and_grads(model, batch, compiled)
        assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), name
        assert set(got_grads) == set(want_grads)
        for n, g in want_grads.items():
            assert (got_grads[n] - g).abs().max().item() <= 1e-5, (name, n)
    assert 1 <= len(compiled_graphs) <= 2, f"{name}: {len(compiled_graphs)} compilations"


# the ops that make a CUDA device sync (a host read of device memory or a data-dependent output size)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "bincount",
           "unique_consecutive", "item", "repeat_interleave", "masked_scatter", "argwhere"}


class SyncDetector(TorchDispatchMode):
    """Fails on any op that would read device memory back to the host (or size an output by data), also
    inside custom ops' implementations: they dispatch their aten calls through this mode too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING or (name == "index" and any(getattr(a, "dtype", None) == torch.bool
                                                        for a in (args[1] if len(args) > 1 else []) if a is not None)):
            raise AssertionError(f"host sync in the training step: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_host_sync_in_a_training_step(name, monkeypatch):
    """Eager forward + backward on packed documents under the detector. Under TRITON_INTERPRET the Triton
    kernels' launchers run too; the MoE layer runs the CUDA path's dispatch ("grouped": sorted rows,
    offsets by scatter-add and cumsum, torch._grouped_mm), as the issue asks."""
    monkeypatch.setattr(kernels, "INTERPRET", False)  # the interpreter itself reads tensors to the host
    model = _model(name)
    if name == "moe":
        for m in model.modules():
            if hasattr(m, "impl") and hasattr(m, "w1"):
                m.impl = "grouped"
    batch = _batch(BATCHES["short documents"], 0)
    idx, y, cu = batch
    with SyncDetector():
        _, loss = model(idx, y, cu_seqlens=cu)
        loss.backward()
        model.update_moe_bias()
        model.moe_stats()


def test_sync_detector_catches_a_sync():
    """The detector is not blind: the old MTP loss's `if ok.any():` and an int(tensor) are caught."""
    t = torch.tensor([1, 2])
    for bad in (lambda: bool((t > 1).any()), lambda: int(t.max()), lambda: t[t > 1]):
        with pytest.raises(AssertionError, match="host sync"):
            with SyncDetector():
                bad()


@pytest.mark.skipif(kernels.triton is None or not kernels.INTERPRET, reason="needs the Triton interpreter")
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_op_opcheck_and_compile(varlen):
    torch.manual_seed(0)
    if varlen:
        q, k, v = torch.randn(19, 4, 16), torch.randn(19, 2, 16), torch.randn(19, 2, 8)
        cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)
    else:
        q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 8)
        cu = None
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(kernels._flash_attn, (q, k, v, cu, True, 0.25, 7 if varlen else None))
    do = torch.randn(*q.shape[:-1], 8)
    o = kernels._flash_attn(q, k, v, cu, True, 0.25, None)[0]
    torch.library.opcheck(kernels._flash_attn_backward, (do, q.detach(), k.detach(), v.detach(), o.detach(),
                                                         kernels._flash_attn(q, k, v, cu, True, 0.25, None)[1].detach(),
                                                         cu, True, 0.25, None))
    fn = torch.compile(lambda q, k, v: kernels.flash_attention(q, k, v, softmax_scale=0.25, cu_seqlens=cu),
                       backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    want = torch.autograd.grad(kernels.attention_reference(q, k, v, softmax_scale=0.25, cu_seqlens=cu), (q, k, v), do)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.skipif(kernels.triton is None or not kernels.INTERPRET, reason="needs the Triton interpreter")
def test_linear_cross_entropy_op_opcheck_and_compile():
    torch.manual_seed(0)
    h, w = torch.randn(13, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    t = torch.randint(0, 37, (13,))
    t[3] = -100
    torch.library.opcheck(kernels._linear_ce, (h, w, t, -100, 1.0))
    rows, lse = kernels._linear_ce(h, w, t, -100, 1.0)
    torch.library.opcheck(kernels._linear_ce_backward, (torch.rand(13), h.detach(), w.detach(), t, lse.detach(),
                                                        -100, 1.0, True, True))
    torch.library.opcheck(kernels._linear_ce_fused, (h, w, t, -100, 1.0, True, True))
    fn = torch.compile(lambda h, w: kernels.linear_cross_entropy(h, w, t), backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(fn(h, w), (h, w))
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.T, t), (h, w))
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5


def test_train_py_compiled_follows_eager(tmp_path):
    """train.py --compile true (inductor, CPU) against --compile false: 12 steps, losses within 1e-4. One layer:
    inductor's C++ compilation is most of the test's time, and the step count barely changes it."""
    data = tmp_path / "docs.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:  # short documents of varied lengths: many per row, varying counts
        for i in range(400):
            n = int(torch.randint(5, 120, (1,), generator=g))
            f.write(json.dumps({"text": " ".join(f"w{int(x)}" for x in torch.randint(0, 50, (n,), generator=g))})
                    + "\n")
    env = dict(os.environ, NANO_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    losses = {}
    for c in ("false", "true"):
        out = tmp_path / f"run-{c}"
        args = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2",
                "--vocab-size", "300", "--seq-len", "64", "--batch-size", "4", "--max-steps", "12",
                "--eval-every", "100", "--eval-steps", "1", "--sample-every", "0", "--compile", c,
                "--data", str(data), "--out-dir", str(out)]
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                           text=True, env=env, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(out / "metrics.jsonl") as f:
            losses[c] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses["true"]) == 12
    for a, b in zip(losses["false"], losses["true"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (losses["false"], losses["true"])
