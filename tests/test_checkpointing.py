"""Gradient checkpointing drops what it says it drops: bytes saved for the backward per block, on the kernel
path (TRITON_INTERPRET=1, so the attention is the `nano::flash_attn` op), and no matmul run again."""
import inspect
from functools import partial

import pytest
import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import nano.model
from nano.config import ModelConfig
from nano.model import Transformer

CONFIGS = {
    "gqa": dict(n_head=2, n_kv_head=1, qk_norm=True),
    "mla-moe": dict(n_head=2, attn="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=48),
}
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.nano.flash_attn.default}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in MATMULS
        return func(*args, **(kwargs or {}))


def _block_run(model, mode, x, ctx):
    """(bytes saved for the backward by one block, matmuls the backward runs) under a checkpointing mode.
    Saved storages are counted once each; the weights are not activations."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.set_grad_ckpt(mode)
    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = model._block(model.layers[0], x, ctx)
    with CountMatmuls() as counter:
        y.backward(torch.ones_like(y))
    return sum(saved.values()), counter.n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bytes_saved_for_backward_per_block(name, monkeypatch):
    if "respect_saved_tensors_hooks" not in inspect.signature(torch.utils.checkpoint.checkpoint).parameters:
        pytest.skip("this torch cannot route selective checkpointing's saved tensors through saved_tensors_hooks")
    # selective checkpointing keeps its tensors outside the autograd graph; this flag shows them to the hook
    monkeypatch.setattr(nano.model, "checkpoint",
                        partial(torch.utils.checkpoint.checkpoint, respect_saved_tensors_hooks=True))
    calls = []
    monkeypatch.setattr(kernels, "_flash_fwd", lambda *a: calls.append(1) or _flash_fwd(*a))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_embd=64, max_seq_len=64, **CONFIGS[name])).train()
    idx = torch.randint(0, 64, (1, 24))
    ctx = model._context(idx, torch.tensor([0, 5, 24], dtype=torch.int32), None, None, False)
    x = torch.randn(1, 24, 64)
    none, mm_none = _block_run(model, "none", x, ctx)
    assert calls, "the attention kernel op did not run"
    full, mm_full = _block_run(model, "full", x, ctx)
    selective, mm_selective = _block_run(model, "selective", x, ctx)
    assert full == x.numel() * 4  # the block's input alone
    print(f"{name}: selective keeps {selective / none:.1%} of none's bytes, full {full / none:.1%}")
    assert selective <= 0.65 * none, f"selective keeps {selective / none:.0%} of the bytes of none"
    assert mm_selective == mm_none < mm_full  # selective runs no matmul (nor the attention) twice


_flash_fwd = kernels._flash_fwd
