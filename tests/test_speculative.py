"""Speculative decoding is exact: greedy output equals plain greedy generate token for token, and sampled
output follows the target's distribution (checked against enumeration, with a test that a wrong
acceptance rule fails the same check).

The models here run in float64: the verify forward over k + 1 tokens and one-token decoding round
differently in the last bits (matmuls of different shapes), which in fp32 could flip a near-tie
argmax and make a greedy comparison depend on the BLAS build; in float64 that cannot happen at these
logit gaps.
"""
import copy
import itertools

import pytest
import torch

from nano.config import ModelConfig
from nano.generate import _speculative, generate, logits_to_probs, speculative_generate
from nano.model import Transformer


@pytest.fixture(autouse=True)
def one_thread():
    # these models are tiny: one thread is as fast, and does not stall when other processes hold the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed, scale=1.0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=128, tie_embeddings=False)
    model = Transformer(ModelConfig(**{**cfg, **kw})).double().eval()
    with torch.no_grad():  # larger weights: peaked, distinct distributions instead of near-uniform ones
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def _noisy_copy(model, noise, seed):
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return draft


# -----------------------------------------------------------------------------
# Greedy: token for token equal to plain greedy decoding

TARGET = _model(0, scale=10.0)
DRAFTS = {
    "other": _model(1, scale=10.0, n_layer=1, n_embd=16, n_head=2, n_kv_head=1),  # mostly rejected
    "noisy": _noisy_copy(TARGET, 0.06, seed=2),  # a mix of acceptances and rejections, differing per row
    "copy": copy.deepcopy(TARGET),  # everything accepted
}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("kind", list(DRAFTS))
def test_greedy_equals_plain_greedy(kind, k):
    prompt = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(k))
    n = 40
    want = generate(TARGET, prompt, n, temperature=0)
    got, stats = speculative_generate(TARGET, prompt, n, draft=DRAFTS[kind], k=k, temperature=0, seed=k)
    assert got.shape == (3, 5 + n)
    assert torch.equal(got, want)
    rate = stats["acceptance_rate"]
    assert stats["accepted"] == round(rate * stats["proposed"])
    if kind == "copy":
        assert rate == 1.0 and stats["tokens_per_step"] == k + 1
        assert stats["target_forwards"] == 1 + -(-(n - 1) // (k + 1))  # prefill + ceil((n - 1) / (k + 1))
    elif kind == "other":
        assert rate < 0.1  # the test really went through many rejections
    else:
        assert 0.2 < rate < 0.9
    assert 1.0 <= stats["tokens_per_step"] <= k + 1


MLA = dict(attn="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
MOE = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
           first_k_dense_replace=1)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_mla_moe_target_rolls_back_its_latent_cache(k):
    target = _model(0, scale=10.0, **MLA, **MOE)
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(k))
    want = generate(target, prompt, 30, temperature=0)
    for draft in (_noisy_copy(target, 0.06, seed=3), copy.deepcopy(target)):
        got, stats = speculative_generate(target, prompt, 30, draft=draft, k=k, temperature=0)
        assert torch.equal(got, want)
    assert stats["acceptance_rate"] == 1.0  # the copy


@pytest.mark.parametrize("depth,k,kw", [(1, 1, {}), (2, 2, {}), (3, 2, MLA), (2, 4, {**MLA, **MOE})])
def test_greedy_mtp_equals_plain_greedy(depth, k, kw):
    target = _model(0, scale=10.0, mtp_depth=depth, **kw)
    prompt = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(depth))
    want = generate(target, prompt, 30, temperature=0)
    got, stats = speculative_generate(target, prompt, 30, draft="mtp", k=k, temperature=0)
    assert torch.equal(got, want)
    assert len(stats["accepted_at"]) == min(k, depth)  # k is capped at mtp_depth
    got, _ = speculative_generate(target, prompt, 30, k=k, temperature=0)  # draft=None means "mtp" here
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw,prompt_len", [({}, 1), ({**MLA, **MOE}, 4)])
def test_mtp_drafts_equal_recomputation_from_scratch(kw, prompt_len, monkeypatch):
    """The MTP proposer keeps its modules' caches and hidden states across steps in which rows accept
    different numbers of tokens. Each step's draft distributions must equal those of the chain computed
    from scratch (no cache) on the tokens known at that step. Random MTP modules are rarely right, so an
    acceptance rule that accepts at random makes the rows advance by different amounts."""
    import nano.generate as G
    depth, k = 3, 3
    target = _model(0, scale=10.0, mtp_depth=depth, **kw)
    steps, propose = [], G._MTPDraft.propose

    def recording(self, out, pos, k, to_probs, gen):
        d, q = propose(self, out, pos, k, to_probs, gen)
        steps.append((out.clone(), pos.clone(), d, q))
        return d, q

    monkeypatch.setattr(G._MTPDraft, "propose", recording)
    prompt = torch.randint(0, 61, (3, prompt_len), generator=torch.Generator().manual_seed(0))
    coin = lambda p_x, q_x: torch.full_like(p_x, 0.6)  # noqa: E731
    _speculative(target, prompt, 25, "mtp", k, 1.0, None, None, 0, coin)
    advanced = set()
    with torch.no_grad():
        for out, pos, d, q in steps:
            for b in range(3):
                n = int(pos[b])  # the last token's position; tokens after it: this step's drafts
                seq = torch.cat([out[b, :n + 1], d[b, :k - 1]])[None]
                h = target.hidden_states(seq[:, :n + 1])  # recomputed, no cache
                for depth_i in range(1, k + 1):
                    logits, h = target.mtp_draft(h[:, :n], seq[:, depth_i:n + depth_i], depth=depth_i)
                    want = logits_to_probs(logits[0, -1], 1.0)
                    assert torch.allclose(q[b, depth_i - 1], want, atol=1e-9), (n, depth_i)
        for (_, p0, _, _), (_, p1, _, _) in zip(steps, steps[1:]):
            advanced.update((p1 - p0).tolist())
    assert {1, 2, 3, 4} <= advanced  # rows advanced by every possible amount (0..k accepted, + 1)


def test_greedy_rows_of_different_lengths_and_short_outputs():
    # rows accept different numbers of tokens per step; outputs shorter than one step; one new token
    prompt = torch.randint(0, 61, (4, 3), generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 3, 7):
        want = generate(TARGET, prompt, n, temperature=0)
        got, _ = speculative_generate(TARGET, prompt, n, draft=DRAFTS["noisy"], k=4, temperature=0)
        assert torch.equal(got, want), n
    got, stats = speculative_generate(TARGET, prompt, 0, draft=DRAFTS["noisy"])
    assert torch.equal(got, prompt) and stats["proposed"] == 0


def test_bad_arguments():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(TARGET, prompt, 4, draft=_model(0, vocab_size=50))
    with pytest.raises(ValueError, match="needs a draft"):
        speculative_generate(TARGET, prompt, 4)
    with pytest.raises(ValueError, match="k"):
        speculative_generate(TARGET, prompt, 4, draft=DRAFTS["copy"], k=0)
    with pytest.raises(ValueError, match="'mtp'"):
        speculative_generate(TARGET, prompt, 4, draft="medusa")


# -----------------------------------------------------------------------------
# Sampling: the joint distribution of the first generated tokens equals the target's

V, N_NEW, N_SAMPLES = 6, 3, 20000
SMALL = dict(vocab_size=V, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=32)
SMALL_TARGET = _model(0, scale=10.0, **SMALL)
SMALL_DRAFT = _model(1, scale=10.0, **SMALL)  # total variation ~0.4 from the target per token
SMALL_MTP = _model(2, scale=10.0, mtp_depth=2, **SMALL)  # drafts with its own (random) MTP modules
PROMPT = torch.tensor([[1, 4, 2]])


def exact_joint(model, prompt, n, temperature, top_k, top_p):
    """P(first n new tokens) for every sequence in V^n: products of the target's conditional
    probabilities after the sampling transform, by enumeration with full forwards (no cache)."""
    joint = torch.ones(1, dtype=torch.float64)
    for t in range(n):
        prefixes = torch.tensor(list(itertools.product(range(V), repeat=t)), dtype=torch.long).view(V ** t, t)
        seqs = torch.cat([prompt.expand(V ** t, -1), prefixes], dim=1)
        with torch.no_grad():
            probs = logits_to_probs(model(seqs)[0][:, -1], temperature, top_k, top_p).double()  # (V^t, V)
        joint = (joint[:, None] * probs).reshape(-1)  # index = sum tok_i * V^(n-1-i), like product()
    return joint


def chi2_pvalue(tokens, joint):
    """Pearson chi-square p-value of sampled sequences (N, n) against the exact joint over V^n.
    Cells expected to hold fewer than 5 samples are pooled into one (the usual validity rule)."""
    n_samples, n = tokens.shape
    cell = (tokens * V ** torch.arange(n - 1, -1, -1)).sum(1)
    counts = torch.bincount(cell, minlength=V ** n).double()
    expected = n_samples * joint
    if counts[expected == 0].sum() > 0:  # sampled a sequence of probability 0
        return 0.0
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


def _sampled(temperature, top_k, top_p, k, accept=None, draft=SMALL_DRAFT, seed=0, target=SMALL_TARGET):
    """N_SAMPLES independent runs at once: every batch row draws its own random numbers."""
    from nano.generate import _accept_prob
    prompt = PROMPT.expand(N_SAMPLES, -1)
    out, stats = _speculative(target, prompt, N_NEW, draft, k, temperature, top_k, top_p, seed,
                              accept or _accept_prob)
    return out[:, PROMPT.shape[1]:], stats


# P_VALUE: the correct sampler fails with probability 1e-4 per seed (the seeds are fixed, so the test is
# deterministic); the wrong rules below land at p-values below 1e-30, far beyond it.
P_VALUE = 1e-4
SETTINGS = [(1.0, None, None, 2), (0.8, 3, None, 1), (1.3, None, 0.8, 3), (1.0, 4, 0.9, 2)]


@pytest.mark.parametrize("temperature,top_k,top_p,k", SETTINGS)
def test_sampling_matches_target_distribution(temperature, top_k, top_p, k):
    tokens, stats = _sampled(temperature, top_k, top_p, k)
    assert 0.2 < stats["acceptance_rate"] < 0.95  # both acceptances and rejections happened
    joint = exact_joint(SMALL_TARGET, PROMPT, N_NEW, temperature, top_k, top_p)
    assert chi2_pvalue(tokens, joint) > P_VALUE


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.9, 4, 0.9)])
def test_mtp_sampling_matches_target_distribution(temperature, top_k, top_p):
    tokens, stats = _sampled(temperature, top_k, top_p, 2, draft="mtp", target=SMALL_MTP)
    assert 0.2 < stats["acceptance_rate"] < 0.95
    joint = exact_joint(SMALL_MTP, PROMPT, N_NEW, temperature, top_k, top_p)
    assert chi2_pvalue(tokens, joint) > P_VALUE
    tokens, _ = _sampled(temperature, top_k, top_p, 2, draft="mtp", target=SMALL_MTP,
                         accept=lambda p_x, q_x: torch.ones_like(p_x))  # the MTP modules' own distribution
    assert chi2_pvalue(tokens, joint) < 1e-30


def test_wrong_acceptance_rules_fail_the_check():
    joint = exact_joint(SMALL_TARGET, PROMPT, N_NEW, 1.0, None, None)
    always = lambda p_x, q_x: torch.ones_like(p_x)  # noqa: E731 - output follows the draft
    inverted = lambda p_x, q_x: (q_x / p_x).clamp(max=1.0)  # noqa: E731 - min(1, q/p) instead of p/q
    subtle = lambda p_x, q_x: (p_x / q_x).clamp(max=1.0) ** 1.2  # noqa: E731 - slightly too many rejections
    for rule in (always, inverted, subtle):
        tokens, _ = _sampled(1.0, None, None, 2, accept=rule)
        assert chi2_pvalue(tokens, joint) < 1e-30
    # and the check is not fooled by a draft that is the target itself (accepts ~everything)
    tokens, stats = _sampled(1.0, None, None, 2, draft=copy.deepcopy(SMALL_TARGET))
    assert stats["acceptance_rate"] > 0.999 and chi2_pvalue(tokens, joint) > P_VALUE


def test_plain_generate_passes_the_same_check():
    # the check itself against the reference sampler (plain generate), so a broken check cannot pass
    out = generate(SMALL_TARGET, PROMPT.expand(N_SAMPLES, -1), N_NEW, temperature=1.3, top_p=0.8, seed=0)
    joint = exact_joint(SMALL_TARGET, PROMPT, N_NEW, 1.3, None, 0.8)
    assert chi2_pvalue(out[:, PROMPT.shape[1]:], joint) > P_VALUE
    wrong = exact_joint(SMALL_DRAFT, PROMPT, N_NEW, 1.3, None, 0.8)  # another model's distribution
    assert chi2_pvalue(out[:, PROMPT.shape[1]:], wrong) < 1e-30
