"""Tree speculation is exact: greedy output equals plain greedy generate token for token for draft models
and MTP, GQA and MLA targets, and sampled output follows the target's distribution (chi-square against
enumeration), while a naive multi-candidate rule fails the same check. Models and checks are those of
test_speculative.py (float64 models, see there)."""
import copy

import pytest
import torch

from nano.generate import _tree_speculative, generate, speculative_generate
from test_speculative import (DRAFTS, MLA, MOE, N_NEW, N_SAMPLES, P_VALUE, PROMPT, SMALL_DRAFT, SMALL_MTP,
                              SMALL_TARGET, TARGET, _model, _noisy_copy, chi2_pvalue, exact_joint, one_thread)  # noqa: F401

TREES = [(1, 1, 1), (3, 2, 1), (2, 2, 2, 1)]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", list(DRAFTS))
def test_greedy_tree_equals_plain_greedy(kind, tree):
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(len(tree)))
    n = 30
    want = generate(TARGET, prompt, n, temperature=0)
    got, stats = speculative_generate(TARGET, prompt, n, draft=DRAFTS[kind], tree=tree, temperature=0)
    assert torch.equal(got, want)
    k = len(tree)
    if kind == "copy":  # a perfect draft: every step accepts the full depth
        assert stats["accepted_at"] == [1.0] * k and stats["tokens_per_step"] == k + 1
        assert stats["target_forwards"] == 1 + -(-(n - 1) // (k + 1))
    elif kind == "noisy":
        assert 0.2 < stats["acceptance_rate"] < 1.0  # rows of different accepted lengths
    assert stats["nodes"] == sum(torch.tensor(tree).cumprod(0).tolist())


def test_tree_beats_chain_with_a_noisy_draft():
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(0))
    chain = speculative_generate(TARGET, prompt, 30, draft=DRAFTS["noisy"], tree=(1, 1, 1), temperature=0)[1]
    tree = speculative_generate(TARGET, prompt, 30, draft=DRAFTS["noisy"], tree=(3, 2, 1), temperature=0)[1]
    assert tree["tokens_per_step"] > chain["tokens_per_step"]


@pytest.mark.parametrize("tree", [(1, 1, 1, 1), (3, 2, 1)])
def test_greedy_tree_mla_moe_target_compacts_its_latent_cache(tree):
    target = _model(0, scale=10.0, **MLA, **MOE)
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(1))
    want = generate(target, prompt, 25, temperature=0)
    for draft in (_noisy_copy(target, 0.06, seed=3), copy.deepcopy(target)):
        got, stats = speculative_generate(target, prompt, 25, draft=draft, tree=tree, temperature=0)
        assert torch.equal(got, want)
    assert stats["acceptance_rate"] == 1.0  # the copy


@pytest.mark.parametrize("tree,kw", [((1, 1), {}), ((3, 2), {}), ((2, 1, 2), MLA)])
def test_greedy_tree_mtp_equals_plain_greedy(tree, kw):
    target = _model(0, scale=10.0, mtp_depth=3, **kw)
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(2))
    want = generate(target, prompt, 25, temperature=0)
    got, stats = speculative_generate(target, prompt, 25, draft="mtp", tree=tree, temperature=0)
    assert torch.equal(got, want)
    assert len(stats["accepted_at"]) == len(tree)


def test_malformed_trees_are_refused():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for bad in ((), (2, 0), "3,x", [-1]):
        with pytest.raises(ValueError, match="branching factors"):
            speculative_generate(TARGET, prompt, 4, draft=DRAFTS["copy"], tree=bad)
    with pytest.raises(ValueError, match="MTP depth"):
        speculative_generate(SMALL_MTP, PROMPT, 4, draft="mtp", tree=(2, 1, 1))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(SMALL_TARGET, PROMPT, 4, draft=SMALL_DRAFT, tree=(7,))


# -----------------------------------------------------------------------------
# Sampling with trees: branching > 1 at several depths

def _sampled(tree, temperature, top_k, top_p, draft=SMALL_DRAFT, target=SMALL_TARGET, **kw):
    prompt = PROMPT.expand(N_SAMPLES, -1)
    out, stats = _tree_speculative(target, prompt, N_NEW, draft, tree, temperature, top_k, top_p, 0, **kw)
    return out[:, PROMPT.shape[1]:], stats


@pytest.mark.parametrize("tree,temperature,top_k,top_p", [
    ((3, 2), 1.0, None, None), ((2, 3), 0.8, 3, None), ((2, 1, 2), 1.3, None, 0.8), ((1, 3), 1.0, 4, 0.9)])
def test_tree_sampling_matches_target_distribution(tree, temperature, top_k, top_p):
    tokens, stats = _sampled(tree, temperature, top_k, top_p)
    assert 0.2 < stats["acceptance_rate"] < 0.95  # both acceptances and rejections happened
    joint = exact_joint(SMALL_TARGET, PROMPT, N_NEW, temperature, top_k, top_p)
    assert chi2_pvalue(tokens, joint) > P_VALUE


@pytest.mark.parametrize("tree,temperature,top_k,top_p", [((3, 2), 1.0, None, None), ((2, 2), 0.9, 4, 0.9)])
def test_tree_mtp_sampling_matches_target_distribution(tree, temperature, top_k, top_p):
    tokens, stats = _sampled(tree, temperature, top_k, top_p, draft="mtp", target=SMALL_MTP)
    assert 0.2 < stats["acceptance_rate"] < 0.95
    joint = exact_joint(SMALL_MTP, PROMPT, N_NEW, temperature, top_k, top_p)
    assert chi2_pvalue(tokens, joint) > P_VALUE


def test_naive_multi_candidate_rule_fails_the_check():
    """Testing every candidate against the unchanged target p (no residual between siblings) is biased
    towards tokens several candidates can hit."""
    joint = exact_joint(SMALL_TARGET, PROMPT, N_NEW, 1.0, None, None)
    tokens, _ = _sampled((3, 2), 1.0, None, None, residual=lambda r, q: r)
    assert chi2_pvalue(tokens, joint) < 1e-30
