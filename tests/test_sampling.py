"""The sampling transform against an independent float64 reference, for every combination of temperature,
top-k and top-p. The order is temperature, then top-k, then top-p on the renormalised survivors (as
Hugging Face's warpers apply them); the reference is plain Python over sorted lists."""
import itertools
import math

import pytest
import torch

from nano.generate import logits_to_probs

V = 12
TEMPERATURES = [0.0, 0.5, 1.0, 2.0]
TOP_K = [None, 1, 3, V, V + 5]
TOP_P = [None, 0.3, 0.8, 1.0]


def reference(row, temperature, top_k, top_p):
    """Float64 probabilities of one row of logits (a list of floats)."""
    if temperature == 0:
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        return [float(i == best) for i in range(len(row))]
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k is not None else order
    z = sum(math.exp(scaled[i]) for i in kept)
    p = {i: math.exp(scaled[i]) / z for i in kept}
    if top_p is not None:
        nucleus, mass = [], 0.0
        for i in kept:  # the smallest prefix (by probability) whose mass reaches top_p
            nucleus.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        p = {i: p[i] / mass for i in nucleus}
    return [p.get(i, 0.0) for i in range(len(row))]


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 2, V, generator=g, dtype=torch.float64) * 2  # (..., V): batch dims of any shape


@pytest.mark.parametrize("temperature,top_k,top_p", list(itertools.product(TEMPERATURES, TOP_K, TOP_P)))
def test_logits_to_probs_matches_reference(logits, temperature, top_k, top_p):
    got = logits_to_probs(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    for row, p in zip(logits.reshape(-1, V).tolist(), got.reshape(-1, V).double().tolist()):
        want = reference(row, temperature, top_k, top_p)
        assert max(abs(a - b) for a, b in zip(p, want)) < 1e-6, (row, p, want)


def test_cases_are_not_degenerate(logits):
    """The settings above separate the orders of the three steps: top-p before the temperature keeps other
    tokens than after it, and top-p on the full softmax other tokens than on the top-k survivors; no
    cumulative mass lies within float32 rounding of a top_p (the nucleus is the same in fp32 and fp64)."""
    rows = logits.reshape(-1, V).tolist()
    size = lambda p: sum(x > 0 for x in p)  # noqa: E731
    for t in (0.5, 2.0):  # nucleus of the tempered distribution != nucleus of the raw one
        assert any(size(reference(r, t, None, 0.8)) != size(reference(r, 1.0, None, 0.8)) for r in rows)
    # renormalising the top-k survivors shrinks the nucleus below min(k, nucleus of the full softmax)
    assert any(size(reference(r, 1.0, 3, 0.8)) < min(3, size(reference(r, 1.0, None, 0.8))) for r in rows)
    for r, t, k in itertools.product(rows, TEMPERATURES[1:], TOP_K):
        p = reference(r, t, k, None)
        cum = itertools.accumulate(sorted(p, reverse=True))
        assert all(abs(c - q) > 1e-5 for c in cum for q in TOP_P if q is not None and q < 1)
