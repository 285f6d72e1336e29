"""kernels.attention_reference against an independent float64 loop over (batch, head, query)."""
import math

import pytest
import torch

import kernels


def naive(q, k, v, causal, scale, cu=None):
    """float64, one (document, head, query) at a time; GQA by head index arithmetic."""
    q, k, v = q.double(), k.double(), v.double()
    if cu is None:  # dense: treat each batch row as one document
        outs = [naive(q[b], k[b], v[b], causal, scale, [0, q.shape[1]]) for b in range(q.shape[0])]
        return torch.stack(outs)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    G = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        for h in range(q.shape[1]):
            for i in range(a, b):
                last = i if causal else b - 1
                s = torch.stack([q[i, h] @ k[j, h // G] * scale for j in range(a, last + 1)])
                p = torch.softmax(s, 0)
                out[i, h] = sum(p[n] * v[a + n, h // G] for n in range(len(p)))
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,Dv", [(2, 7, 4, 4, 8, 8), (1, 13, 4, 2, 16, 8), (2, 5, 6, 1, 8, 12)])
def test_dense(causal, B, T, Hq, Hkv, D, Dv):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, Dv)
    out = kernels.attention_reference(q, k, v, causal=causal)
    assert out.shape == (B, T, Hq, Dv)
    ref = naive(q, k, v, causal, 1 / math.sqrt(D))
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens,Hq,Hkv,D,Dv", [([1, 5, 3], 4, 2, 8, 8), ([9], 2, 2, 16, 8),
                                             ([2, 1, 1, 7, 4], 8, 1, 8, 4)])
def test_varlen(causal, lens, Hq, Hkv, D, Dv):
    torch.manual_seed(1)
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = torch.randn(total, Hq, D), torch.randn(total, Hkv, D), torch.randn(total, Hkv, Dv)
    out = kernels.attention_reference(q, k, v, causal=causal, softmax_scale=0.3, cu_seqlens=cu,
                                      max_seqlen=max(lens))
    ref = naive(q, k, v, causal, 0.3, cu.tolist())
    assert (out.double() - ref).abs().max() < 1e-5


def test_varlen_gradients_stay_in_document():
    torch.manual_seed(2)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 4, requires_grad=True) for _ in range(3))
    out = kernels.attention_reference(q, k, v, causal=False, cu_seqlens=cu)
    out[:3].sum().backward()
    assert k.grad[3:].abs().max() == 0 and v.grad[3:].abs().max() == 0
    assert torch.isfinite(q.grad).all() and k.grad[:3].abs().max() > 0


def test_bad_shapes_fail_clearly():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="must divide"):
        kernels.attention_reference(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    qkv = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    for bad in ([0, 4], [1, 5], [0, 4, 3, 5], [5]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            kernels.attention_reference(*qkv, cu_seqlens=torch.tensor(bad, dtype=torch.int32))
