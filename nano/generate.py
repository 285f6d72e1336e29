"""Generation with a KV cache: prefill the prompt once, then decode one token at a time (generate), or
several per target forward with a draft model or MTP modules (speculative_generate).

The sampling transform (temperature, top-k, top-p) lives in one function, `logits_to_probs`, so
plain and speculative decoding sample from exactly the same distribution.
"""
import torch


def logits_to_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """fp32 probabilities (..., V) after temperature, top-k and top-p (nucleus) filtering.
    temperature 0 is greedy: a one-hot on the argmax (ties go to the lowest id, like argmax)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs, generator=None):
    """One token id per row of probs (B, V) -> (B, 1)."""
    return torch.multinomial(probs, 1, generator=generator)


def make_generator(seed, device):
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def prefill(model, idx):
    """Run the prompt (B, T) through the model, filling its KV cache; logits of the last position."""
    logits, _ = model(idx, prefill=True)
    return logits[:, -1]


def decode_one_token(model, token, pos):
    """token (B, 1) at position pos (int or (B,)) -> logits (B, V) for the next position."""
    logits, _ = model(token, start_pos=pos)
    return logits[:, -1]


@torch.no_grad()
def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, seed=None):
    """The prompt idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
    B, T = idx.shape
    if max_new_tokens <= 0:
        return idx
    gen = make_generator(seed, idx.device)
    model.setup_cache(B, T + max_new_tokens)
    try:
        out = [idx]
        logits = prefill(model, idx)
        for i in range(max_new_tokens):
            token = sample(logits_to_probs(logits, temperature, top_k, top_p), gen)
            out.append(token)
            if i + 1 < max_new_tokens:
                logits = decode_one_token(model, token, T + i)
    finally:
        model.clear_cache()
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
# Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").
#
# Each step a cheap proposer guesses k tokens d_1..d_k with distributions q_1..q_k, and one target
# forward over [cur, d_1..d_k] gives p_1..p_{k+1}. d_i is accepted with probability
# min(1, p_i(d_i) / q_i(d_i)) until the first rejection; at a rejection the replacement is sampled from
# norm(max(0, p_i - q_i)), and when all k are accepted a bonus token comes from p_{k+1}. Every
# emitted token is then distributed exactly as the target's, whatever the proposer does. p and q are
# both taken AFTER the temperature/top-k/top-p transform (logits_to_probs), so the output follows the
# target with those settings; at temperature 0 both are one-hots and the rule reduces to "accept while
# the draft's argmax equals the target's", which reproduces plain greedy decoding token for token.
#
# Batches: rows accept different numbers of tokens, so every row keeps its own position `pos` (of its
# last token, which is not yet in the target's cache) and the models are called with per-row start
# positions. Rollback is free: the caches mask entries beyond a query's position, so after a
# rejection the next step simply writes over the rejected entries.
#
# A proposer has start(idx, max_len) after the target's cache is set up, observe(h, start) with the
# target's final hidden states of each forward (if wants_hidden), propose(out, pos, k, to_probs, gen)
# -> (drafts (B, k), their distributions (B, k, V)), and stop(); k is its number of drafts per step.


class _DraftModel:
    """Proposals from a smaller Transformer that shares the target's tokenizer (same vocabulary)."""
    wants_hidden = False  # needs no hidden states of the target
    extra_len = 0  # cache positions it needs beyond the target's

    def __init__(self, draft, k):
        self.model, self.k = draft, k

    def start(self, idx, max_len):
        self.model.setup_cache(idx.shape[0], max_len)
        self.model(idx, prefill=True)  # fill the draft's cache with the prompt

    def observe(self, h, start):
        pass

    def propose(self, out, pos, k, to_probs, gen):
        """k tokens after each row's last token out[b, pos[b]] -> (d (B, k), q (B, k, V))."""
        rows = torch.arange(out.shape[0], device=out.device)
        # Feed [previous, last] token, not just the last: when all k proposals of the previous step
        # were accepted, the draft never saw its own d_k, which is now the previous token. Writing an
        # entry again with the same token at the same position changes nothing, so no row needs a
        # special case (one more token per step in a memory-bound forward costs ~nothing).
        tokens = torch.stack([out[rows, pos - 1], out[rows, pos]], dim=1)
        logits = self.model(tokens, start_pos=pos - 1)[0][:, -1]
        ds, qs = [], []
        for i in range(k):
            q = to_probs(logits)
            d = sample(q, gen)  # (B, 1)
            ds.append(d)
            qs.append(q)
            if i + 1 < k:
                logits = decode_one_token(self.model, d, pos + i + 1)
        return torch.cat(ds, dim=1), torch.stack(qs, dim=1)

    def stop(self):
        self.model.clear_cache()


class _MTPDraft:
    """Proposals from the target's own DeepSeek-V3 MTP modules (Transformer.mtp_draft). Module d, at the
    position just before the last token, reads h_{d-1} there and the token d further on (the last token
    for d = 1, then the drafts) and drafts the d-th token after the last. The first draft thus costs one
    small block on top of the target's verify pass; k is capped at mtp_depth (module d only learned to
    look d tokens ahead; chaining module 1 on its own output would feed it inputs it never saw).

    Module d's cache entry at position t depends on the tokens up to t + d, so after a step the entries
    from t = (start of the verify block) - d + 1 on may hold rejected drafts: every step feeds each
    module one window that starts mtp_depth - 1 positions before the verify block and covers it, with
    the main model's hidden states kept per position in `h0`. Entries past the last token are junk,
    masked and later overwritten, like the target's rejected entries.
    """
    wants_hidden = True

    def __init__(self, model, k):
        self.model, self.depth = model, model.config.mtp_depth
        self.k = min(k, self.depth)
        self.extra_len = 2 * self.depth  # the windows reach up to 2 * depth - 1 past the verify block

    def start(self, idx, max_len):  # the MTP modules' caches come with model.setup_cache
        B, D = idx.shape[0], self.model.config.n_embd
        self.h0 = self.model.output.weight.new_zeros(B, max_len, D)  # main hidden state per position

    def observe(self, h, start):
        """The target's hidden states h (B, L, D) at positions start..start + L - 1 (start: (B,))."""
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        self.h0[rows, start[:, None] + torch.arange(h.shape[1], device=h.device)] = h.to(self.h0.dtype)
        self.first = (start - self.depth + 1).clamp(min=0)  # the window of the next propose()
        self.length = h.shape[1] + self.depth - 1

    def propose(self, out, pos, k, to_probs, gen):
        B = out.shape[0]
        rows = torch.arange(B, device=out.device)
        win = self.first[:, None] + torch.arange(self.length, device=out.device)  # (B, W) positions
        # the window index of the last token's predecessor, where module d drafts the token pos + d
        # (the clamp only matters for finished rows, whose drafts are thrown away)
        at = (pos - 1 - self.first).clamp(min=0)
        seq = out.clone()  # the tokens, with each row's drafts written after its last token
        h = self.h0[rows[:, None], win]
        ds, qs = [], []
        for d in range(1, k + 1):
            logits, h = self.model.mtp_draft(h, seq[rows[:, None], win + d], start_pos=self.first, depth=d)
            q = to_probs(logits[rows, at])
            x = sample(q, gen)
            seq[rows, pos + d] = x[:, 0]
            ds.append(x)
            qs.append(q)
        return torch.cat(ds, dim=1), torch.stack(qs, dim=1)

    def stop(self):
        self.h0 = None


def _accept_prob(p_x, q_x):
    """Acceptance probability of a draft token x with target prob p(x) and draft prob q(x) > 0."""
    return (p_x / q_x).clamp(max=1.0)


@torch.no_grad()
def speculative_generate(model, idx, max_new_tokens, *, draft=None, k=4, temperature=1.0, top_k=None,
                         top_p=None, seed=None):
    """Like generate(), with k tokens proposed per step by `draft` and verified by one forward of `model`.

    draft: a smaller Transformer with the same vocabulary, or "mtp" (the model's own MTP modules, k
        capped at mtp_depth); None means "mtp" when the model has MTP modules, else a ValueError.
    Greedy (temperature 0) output equals generate()'s token for token, up to floating-point rounding: the
    verify forward over k + 1 tokens and a one-token forward round differently in the last bits, which
    can only matter where the two best logits (nearly) tie. Sampled output follows generate()'s
    distribution exactly. Returns (tokens (B, T + max_new_tokens), stats) with stats:
        acceptance_rate: accepted draft tokens / proposed draft tokens (nan when nothing was proposed)
        tokens_per_step: mean new tokens per verify forward of the target (accepted + 1), per row
        k: draft tokens per step; target_forwards: verify forwards + the prefill; draft_forwards;
        proposed; accepted; accepted_at: for i = 1..k, the fraction of steps whose first i drafts passed
    """
    return _speculative(model, idx, max_new_tokens, draft, k, temperature, top_k, top_p, seed, _accept_prob)


def _proposer(model, draft, k):
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per step) must be a positive integer, got {k!r}")
    if draft is None:
        if getattr(model.config, "mtp_depth", 0) > 0:
            draft = "mtp"
        else:
            raise ValueError("speculative_generate needs a draft: pass draft=<a smaller Transformer with the "
                             "same vocabulary> or use a model trained with MTP (mtp_depth > 0) and draft='mtp'")
    if isinstance(draft, str):
        if draft != "mtp":
            raise ValueError(f"draft must be a Transformer or 'mtp', got {draft!r}")
        if getattr(model.config, "mtp_depth", 0) == 0:
            raise ValueError("draft='mtp' needs a model with MTP modules (trained with --mtp-depth >= 1); "
                             "pass a draft model instead")
        return _MTPDraft(model, k)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) differs from the model's "
                         f"({model.config.vocab_size}); train the draft with the same tokenizer (same --data "
                         "and --vocab-size)")
    return _DraftModel(draft, k)


def _target(model, tokens, keep_hidden, **mode):
    """Logits of the target, and its final hidden states when an MTP proposer needs them. mode:
    prefill=True or start_pos=..., as Transformer.forward takes them."""
    if not keep_hidden:
        return model(tokens, **mode)[0], None
    h = model.hidden_states(tokens, **mode)
    return model.output(h), h


def _speculative(model, idx, max_new_tokens, draft, k, temperature, top_k, top_p, seed, accept):
    B, T = idx.shape
    if T < 1:
        raise ValueError("speculative_generate needs a prompt of at least one token per row")
    proposer = _proposer(model, draft, k)
    k = proposer.k
    nan = float("nan")
    stats = dict(acceptance_rate=nan, tokens_per_step=nan, k=k, target_forwards=0, draft_forwards=0,
                 proposed=0, accepted=0, accepted_at=[nan] * k)
    if max_new_tokens <= 0:
        return idx, stats
    dev = idx.device
    gen = make_generator(seed, dev)
    to_probs = lambda logits: logits_to_probs(logits, temperature, top_k, top_p)  # noqa: E731
    last = T + max_new_tokens - 1  # position of the last token to output
    # the verify forward writes positions up to pos + k with pos <= last, the output up to pos + k + 1
    max_len = T + max_new_tokens + k + 1 + proposer.extra_len
    rows = torch.arange(B, device=dev)
    j = torch.arange(k + 1, device=dev)
    out = idx.new_zeros(B, max_len)
    out[:, :T] = idx
    model.setup_cache(B, max_len)
    try:
        proposer.start(idx, max_len)
        logits, h = _target(model, idx, proposer.wants_hidden, prefill=True)
        pos = torch.full((B,), T, device=dev)  # each row's last token, not yet in the target's cache
        if h is not None:
            proposer.observe(h, pos - T)
        out[:, T] = sample(to_probs(logits[:, -1]), gen)[:, 0]
        steps = 0
        row_steps, emitted, accepted_at = (torch.zeros(n, device=dev, dtype=torch.long) for n in (1, 1, k))
        while True:
            active = pos < last
            if not active.any():  # the one host sync per step
                break
            # finished rows ride along at a safe position (their output is complete and never rewritten)
            pos = pos.clamp(max=last)
            d, q = proposer.propose(out, pos, k, to_probs, gen)  # (B, k), (B, k, V)
            block = torch.cat([out[rows, pos][:, None], d], dim=1)  # (B, k + 1)
            logits, h = _target(model, block, proposer.wants_hidden, start_pos=pos)
            p = to_probs(logits)  # (B, k + 1, V)
            p_x = p[:, :k].gather(-1, d[..., None])[..., 0]
            q_x = q.gather(-1, d[..., None])[..., 0]
            r = torch.rand(B, k, device=dev, generator=gen)
            ok = (r < accept(p_x, q_x)).long().cumprod(dim=1)  # 1 while every draft token so far passed
            a = ok.sum(dim=1)  # (B,) accepted draft tokens
            # the token after the accepted ones: from norm(max(0, p - q)) after a rejection, from p after
            # k acceptances (a zero q row at index k makes both the same formula)
            q_pad = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)
            resid = (p[rows, a] - q_pad[rows, a]).clamp(min=0)
            # p == q up to rounding leaves nothing to sample; rejection there has probability ~0 anyway
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[rows, a])
            x = sample(resid, gen)[:, 0]
            new = torch.cat([d, d.new_zeros(B, 1)], dim=1)
            new[rows, a] = x
            write = active[:, None] & (j <= a[:, None])  # the a accepted tokens and x, active rows only
            at = pos[:, None] + 1 + j
            out[rows[:, None], at] = torch.where(write, new, out[rows[:, None], at])
            if h is not None:
                proposer.observe(h, pos)
            pos = torch.where(active, pos + a + 1, pos)
            steps += 1
            row_steps += active.sum()
            emitted += ((a + 1) * active).sum()
            accepted_at += (ok * active[:, None]).sum(dim=0)
        row_steps, emitted = int(row_steps), int(emitted)
        proposed = row_steps * k
        stats.update(target_forwards=steps + 1, draft_forwards=steps * k, proposed=proposed,
                     accepted=emitted - row_steps)
        if row_steps:
            stats.update(acceptance_rate=(emitted - row_steps) / proposed, tokens_per_step=emitted / row_steps,
                         accepted_at=(accepted_at / row_steps).tolist())
    finally:
        model.clear_cache()
        proposer.stop()
    return out[:, :T + max_new_tokens], stats
