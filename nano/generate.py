"""Generation with a KV cache: prefill the prompt once, then decode one token at a time (generate), or
several per target forward with a draft model or MTP modules (speculative_generate).

The sampling transform (temperature, top-k, top-p) lives in one function, `logits_to_probs`, so
plain and speculative decoding sample from exactly the same distribution.
"""
import contextlib

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


# Compiled decoding (gpt-fast's recipe): the decode forward is compiled with static shapes. The caches
# are allocated in a few sizes (cache_size: powers of two, >= 256), and positions are passed as tensors,
# so a new prompt length or a new step is a new input, not a new graph. On CUDA the graph is captured as a
# CUDA graph (mode="reduce-overhead"): one launch per token instead of one per kernel. The prefill, whose
# length varies, runs eagerly.
_COMPILED = {}


def _forward(model, tokens, **mode):
    """(logits, final hidden states) of model on tokens; mode: start_pos=... or tree=(...), as
    Transformer.forward takes them (the hidden states feed MTP proposers and cost nothing extra)."""
    h = model.hidden_states(tokens, **mode)
    return model.output(h), h


def forward_fn(compile, device):
    """_forward, compiled if asked (one graph per model and input shape, reused across calls)."""
    if not compile:
        return _forward
    if device.type != "cuda":
        if "cpu" not in _COMPILED:
            _COMPILED["cpu"] = torch.compile(_forward, fullgraph=True, dynamic=False)
        return _COMPILED["cpu"]
    if "cuda" not in _COMPILED:
        graph = torch.compile(_forward, mode="reduce-overhead", fullgraph=True, dynamic=False)

        def step(model, tokens, **mode):
            # each call is a new step: a replay overwrites the previous call's outputs, which every
            # caller here has consumed by then (sampled from, or copied)
            torch.compiler.cudagraph_mark_step_begin()
            return graph(model, tokens, **mode)
        _COMPILED["cuda"] = step
    return _COMPILED["cuda"]


def cache_size(n, compile):
    """Cache slots for n positions: n eagerly, else the next power of two >= max(n, 256), so that new
    prompt lengths reuse the compiled graphs."""
    return max(256, 1 << (n - 1).bit_length()) if compile else n


def _use_compile(compile, device):
    return device.type == "cuda" if compile is None else bool(compile)


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, seed=None, compile=None):
    """The prompt idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens).
    compile: compile the one-token decode step (static shapes; default: on for CUDA)."""
    if max_new_tokens <= 0:
        return idx
    steps = _decode(model, idx, max_new_tokens, temperature, top_k, top_p, seed, compile)
    return torch.cat([idx, *steps], dim=1)


def stream(model, idx, max_new_tokens, *, stop=(), temperature=1.0, top_k=None, top_p=None, seed=None,
           compile=None):
    """Yield the sampled token ids (ints) of one prompt idx (1, T) one at a time, as generate samples them,
    until max_new_tokens or a token in `stop` (which is yielded too): a chat streams its reply."""
    if idx.shape[0] != 1:
        raise ValueError(f"stream takes one prompt (1, T), got a batch of {idx.shape[0]}")
    if max_new_tokens <= 0:
        return
    with contextlib.closing(_decode(model, idx, max_new_tokens, temperature, top_k, top_p, seed, compile)) as steps:
        for token in steps:
            token = token.item()
            yield token
            if token in stop:
                return


@torch.no_grad()
def _decode(model, idx, max_new_tokens, temperature, top_k, top_p, seed, compile):
    """Yield (B, 1) tokens: prefill the prompt into the KV cache, then one decode step per token. The cache
    is freed when the generator ends or is closed."""
    B, T = idx.shape
    gen = make_generator(seed, idx.device)
    compile = _use_compile(compile, idx.device)
    step = forward_fn(compile, idx.device)
    model.setup_cache(B, cache_size(T + max_new_tokens, compile))
    try:
        logits = prefill(model, idx)
        pos = torch.full((B,), T, device=idx.device)
        for i in range(max_new_tokens):
            token = sample(logits_to_probs(logits, temperature, top_k, top_p), gen)
            yield token
            if i + 1 < max_new_tokens:
                logits = step(model, token, start_pos=pos + i)[0][:, -1]
    finally:
        model.clear_cache()


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
# -> (drafts (B, k), their distributions (B, k, V)), propose_tree(out, pos, tree, draw) for tree
# speculation (below), and stop(); k is its number of drafts per step.


class _DraftModel:
    """Proposals from a smaller Transformer that shares the target's tokenizer (same vocabulary)."""
    wants_hidden = False  # needs no hidden states of the target
    extra_len = 0  # cache positions it needs beyond the target's

    def __init__(self, draft, k, fwd=_forward):
        self.model, self.k, self.fwd = draft, k, fwd  # fwd: _forward or its compiled form

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
        logits = self.fwd(self.model, tokens, start_pos=pos - 1)[0][:, -1]
        ds, qs = [], []
        for i in range(k):
            q = to_probs(logits)
            d = sample(q, gen)  # (B, 1)
            ds.append(d)
            qs.append(q)
            if i + 1 < k:
                logits = self.fwd(self.model, d, start_pos=pos + i + 1)[0][:, -1]
        return torch.cat(ds, dim=1), torch.stack(qs, dim=1)

    def propose_tree(self, out, pos, tree, draw):
        """The tree, depth by depth: one draft forward over the nodes of depth d - 1 (tree attention, as
        the target's verify forward) gives each its children. -> (tokens (B, N + 1), q (B, N + 1, V)):
        node 0 is the last token; q of node i is the distribution it was drawn from (zero for node 0).
        The nodes' entries land in the draft's cache at the target's slots, so the same move_cache
        compacts both."""
        rows = torch.arange(out.shape[0], device=out.device)
        tokens = torch.stack([out[rows, pos - 1], out[rows, pos]], dim=1)  # as in propose()
        logits = self.fwd(self.model, tokens, start_pos=pos - 1)[0][:, -1:]  # (B, 1, V) at the root
        nodes, qs = [tokens[:, 1:]], [None]
        for d, b in enumerate(tree.branching, 1):
            c, q = draw(logits, b)  # (B, width, b), (B, width, b, V)
            nodes.append(c.flatten(1))
            qs.append(q.flatten(1, 2))
            if d < tree.k:
                at = torch.arange(tree.start[d], tree.start[d + 1], device=out.device)
                logits = self.fwd(self.model, c.flatten(1), tree=tree.inputs(pos, self.model.cache_len, at))[0]
        qs[0] = qs[1].new_zeros(out.shape[0], 1, qs[1].shape[-1])
        return torch.cat(nodes, dim=1), torch.cat(qs, dim=1)

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
        def pick(logits):
            q = to_probs(logits)
            return sample(q, gen), q
        return self._chain(out, pos, k, pick)

    def propose_tree(self, out, pos, tree, draw):
        """Medusa-style: module d's distribution, computed along the spine (each depth's most likely
        draft, fed to the next module), proposes the children of every node at depth d - 1. Any proposal
        is exact under the verification rule; the MTP modules never see the tree, so their caches hold
        nothing of it."""
        B = out.shape[0]
        _, logits = self._chain(out, pos, tree.k, lambda logits: (logits.argmax(-1, keepdim=True), logits))
        tokens, qs = [out[torch.arange(B, device=out.device), pos][:, None]], [None]
        for d, b in enumerate(tree.branching, 1):
            c, q = draw(logits[:, d - 1, None].expand(-1, tree.width[d - 1], -1), b)
            tokens.append(c.flatten(1))
            qs.append(q.flatten(1, 2))
        qs[0] = qs[1].new_zeros(B, 1, qs[1].shape[-1])
        return torch.cat(tokens, dim=1), torch.cat(qs, dim=1)

    def _chain(self, out, pos, k, pick):
        """k drafts after each row's last token; pick(logits (B, V)) -> (draft (B, 1), its q (B, V))."""
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
            x, q = pick(logits[rows, at])
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
                         top_p=None, seed=None, tree=None, compile=None):
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
    tree: branching factors per depth, e.g. (3, 2, 1, 1) (a tuple or "3,2,1,1"): each step drafts a tree
        of candidates and verifies all its nodes in one target forward (see Tree); k is then its depth,
        `proposed`/`acceptance_rate` count one draft per depth (the path), and stats add `tree` and
        `nodes` (tokens per verify forward - 1). (1,) * k is a chain (with a draft model it proposes
        what k=k does; with MTP, module d's distribution follows the most likely earlier drafts rather
        than the sampled ones). With draft="mtp" the depth must not exceed mtp_depth.
    compile: compile the target's verify forward and the draft model's decode forwards (static shapes,
        see forward_fn; default: on for CUDA). The MTP modules and the prefills run eagerly.
    """
    if tree is not None:
        return _tree_speculative(model, idx, max_new_tokens, draft, tree, temperature, top_k, top_p, seed,
                                 compile=compile)
    return _speculative(model, idx, max_new_tokens, draft, k, temperature, top_k, top_p, seed, _accept_prob,
                        compile)


def _proposer(model, draft, k, fwd=_forward):
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
    return _DraftModel(draft, k, fwd)


def _target(model, tokens, keep_hidden, fwd=_forward, **mode):
    """Logits of the target, and its final hidden states when an MTP proposer needs them. mode:
    prefill=True, start_pos=... or tree=..., as Transformer.forward takes them; fwd: _forward or its
    compiled form."""
    logits, h = fwd(model, tokens, **mode)
    return logits, h if keep_hidden else None


def _speculative(model, idx, max_new_tokens, draft, k, temperature, top_k, top_p, seed, accept, compile=False):
    B, T = idx.shape
    if T < 1:
        raise ValueError("speculative_generate needs a prompt of at least one token per row")
    compile = _use_compile(compile, idx.device)
    fwd = forward_fn(compile, idx.device)
    proposer = _proposer(model, draft, k, fwd)
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
    model.setup_cache(B, cache_size(max_len, compile))
    try:
        proposer.start(idx, model.cache_len)
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
            logits, h = _target(model, block, proposer.wants_hidden, fwd, start_pos=pos)
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


# -----------------------------------------------------------------------------
# Tree speculation (SpecInfer, Miao et al. 2024; Medusa, Cai et al. 2024): the proposer drafts a tree of
# continuations, and one target forward verifies all of its nodes with tree attention. Node tokens sit
# at the RoPE position of their depth but each in a slot of its own, seeing the prefix and its
# ancestors only (Transformer.forward's `tree=`). Afterwards the accepted path's cache entries move to
# the slots of their positions (Transformer.move_cache); the rest are junk past the row's end, masked
# and later overwritten, as in the chain.
#
# The rule, at each accepted node, with the target's distribution p there and candidates c_1..c_b drawn
# from the proposal q WITHOUT replacement (recursive rejection sampling; Jeon et al. 2024, "Recursive
# Speculative Decoding"; Yang et al. 2024, "Multi-Candidate Speculative Decoding"):
#     r_1 = p; q_1 = q
#     for i = 1..b: accept c_i with probability min(1, r_i(c_i) / q_i(c_i));
#                   else r_{i+1} = norm(max(0, r_i - q_i)), q_{i+1} = norm(q_i without c_i)
#     all rejected: sample the token from r_{b+1}.
# Why the output token is distributed as p: given c_1..c_{i-1}, c_i is a draw from q_i (that is what
# drawing without replacement means), so stage i is one step of ordinary speculative sampling with
# target r_i and proposal q_i: "accept c_i, or else draw from norm(max(0, r_i - q_i))" yields a token
# distributed as r_i (Leviathan et al., appendix A.1). Stage i + 1 replaces that residual draw by a
# procedure whose output is distributed as r_{i+1} (induction from the last stage, which draws from
# r_{b+1} directly), so stage 1 outputs a token distributed as r_1 = p. The argument holds for any q
# chosen before the node's coins are flipped, so q may depend on earlier draws (Medusa-style MTP
# proposals, siblings' subtrees), and the next node's test starts afresh from the target's p there.
# Testing every c_i against the unchanged p instead (a tempting shortcut) over-weights tokens that
# several candidates can hit; tests/test_speculative.py shows it failing the distribution check.
# At temperature 0 the candidates are the draft's top b, each with q_i = one-hot(c_i): a candidate is
# accepted iff it is the target's argmax and r stays that one-hot, which is plain greedy decoding.


class Tree:
    """The shape of a speculation tree from branching factors (b_1, ..., b_k): every node at depth d - 1
    has b_d children. Node 0 is the root (the last token, depth 0); nodes are numbered breadth first,
    so the children of a node are consecutive and depth d holds nodes start[d]..start[d + 1] - 1."""

    def __init__(self, branching, device):
        self.branching, self.k = tuple(branching), len(branching)
        self.width = [1]  # nodes per depth
        for b in self.branching:
            self.width.append(self.width[-1] * b)
        self.start = [sum(self.width[:d]) for d in range(self.k + 2)]
        self.n = self.start[-1] - 1  # drafted nodes
        parent, depth = [0], [0]
        for d, b in enumerate(self.branching, 1):
            parent += [self.start[d - 1] + j // b for j in range(self.width[d])]
            depth += [d] * self.width[d]
        self.depth = torch.tensor(depth, device=device)
        anc = torch.zeros(self.n + 1, self.n + 1, dtype=torch.bool)  # anc[i, j]: j is i or an ancestor
        for i in range(self.n + 1):
            if i:
                anc[i] = anc[parent[i]]
            anc[i, i] = True
        self.anc = anc.to(device)

    def inputs(self, pos, cache_len, nodes=None):
        """Transformer.forward's tree=(positions, slots, mask) for `nodes` (indices, default all) when
        each row's root is at position pos (B,): node i sits at position pos + depth(i) in slot pos + i
        and sees the slots before pos and those of its ancestors and itself."""
        nodes = torch.arange(self.n + 1, device=pos.device) if nodes is None else nodes
        rel = torch.arange(cache_len, device=pos.device) - pos[:, None]  # (B, L): slot - root slot
        seen = self.anc[nodes][:, rel.clamp(0, self.n)].transpose(0, 1)  # (B, n, L)
        mask = (rel < 0)[:, None] | (seen & (rel <= self.n)[:, None])
        return pos[:, None] + self.depth[nodes], pos[:, None] + nodes, mask


def parse_tree(tree):
    """A tree given as (3, 2, 1, 1) or "3,2,1,1" -> tuple of ints; a one-line ValueError when malformed."""
    try:
        tree = tuple(int(b) for b in (tree.split(",") if isinstance(tree, str) else tree))
    except (TypeError, ValueError):
        tree = ()
    if not tree or min(tree) < 1:
        raise ValueError(f"tree must be branching factors >= 1 per depth, e.g. (3, 2, 1, 1), got {tree!r}")
    return tree


def _draw(logits, b, to_probs, greedy, gen):
    """b candidates without replacement from each row of logits (..., V) -> (tokens (..., b), the
    distribution q_i each was drawn from (..., b, V)); greedy: the top b, q_i = one-hot(c_i)."""
    V = logits.shape[-1]
    if greedy:
        c = logits.topk(b, dim=-1).indices
        return c, torch.nn.functional.one_hot(c, V).float()
    q = to_probs(logits)
    # Gumbel top-b: the b largest of log q + Gumbel noise are, in order, b draws without replacement
    u = torch.rand(q.shape, device=q.device, generator=gen).clamp(min=1e-20)
    c = (q.log() - (-u.log()).log()).topk(b, dim=-1).indices
    taken = torch.nn.functional.one_hot(c, V).float()
    before = taken.cumsum(-2) - taken  # (..., b, V): the candidates drawn before c_i
    qi = q[..., None, :] * (1 - before)
    # all zero once q's support is used up: such a candidate has q_i(c_i) = 0 and is never accepted
    return c, qi / qi.sum(-1, keepdim=True).clamp(min=1e-30)


def _residual(r, q):
    """norm(max(0, r - q)): what remains to be matched after a rejection (r itself when nothing is left,
    which only happens when the rejection had probability 0)."""
    res = (r - q).clamp(min=0)
    total = res.sum(-1, keepdim=True)
    return torch.where(total > 0, res / total.clamp(min=1e-30), r)


def _verify_tree(tree, tokens, p, q, gen, residual=_residual):
    """The rule above at each depth for every row: tokens (B, N + 1), p (B, N + 1, V) the target's
    distributions at the nodes, q (B, N + 1, V) the ones the nodes were drawn from.
    -> (path (B, k) accepted node per depth (valid for the first a), a (B,), next token x (B,))."""
    B, k = tokens.shape[0], tree.k
    rows = torch.arange(B, device=tokens.device)
    node = torch.zeros(B, dtype=torch.long, device=tokens.device)
    going = torch.ones(B, dtype=torch.bool, device=tokens.device)
    a, x = torch.zeros_like(node), torch.zeros_like(node)
    path = node.new_zeros(B, k)
    for d, b in enumerate(tree.branching, 1):
        r = p[rows, node]
        first = tree.start[d] + (node - tree.start[d - 1]) * b  # the current node's first child
        chosen = torch.full_like(node, -1)
        for i in range(b):
            c = first + i
            t = tokens[rows, c]
            qi = q[rows, c]
            q_t, r_t = qi[rows, t], r[rows, t]
            u = torch.rand(B, device=tokens.device, generator=gen)
            ok = (chosen < 0) & (q_t > 0) & (u * q_t < r_t)  # probability min(1, r(c) / q_i(c))
            chosen = torch.where(ok, c, chosen)
            r = torch.where((chosen < 0)[:, None], residual(r, qi), r)
        stop = going & (chosen < 0)
        x = torch.where(stop, sample(r, gen)[:, 0], x)
        going &= chosen >= 0
        node = torch.where(going, chosen, node)
        path[:, d - 1] = node
        a += going.long()
    x = torch.where(going, sample(p[rows, node], gen)[:, 0], x)  # every depth accepted: the bonus token
    return path, a, x


def _tree_speculative(model, idx, max_new_tokens, draft, tree, temperature, top_k, top_p, seed,
                      residual=_residual, compile=False):
    B, T = idx.shape
    if T < 1:
        raise ValueError("speculative_generate needs a prompt of at least one token per row")
    tree = parse_tree(tree)
    if max(tree) > model.config.vocab_size:
        raise ValueError(f"tree branching {max(tree)} exceeds the vocabulary ({model.config.vocab_size})")
    compile = _use_compile(compile, idx.device)
    fwd = forward_fn(compile, idx.device)
    proposer = _proposer(model, draft, len(tree), fwd)
    if proposer.k < len(tree):
        raise ValueError(f"tree depth {len(tree)} exceeds the model's MTP depth ({proposer.k}); pass a "
                         f"shallower tree or a draft model")
    dev = idx.device
    tree = Tree(tree, dev)
    k, nan = tree.k, float("nan")
    stats = dict(acceptance_rate=nan, tokens_per_step=nan, k=k, tree=tree.branching, nodes=tree.n,
                 target_forwards=0, draft_forwards=0, proposed=0, accepted=0, accepted_at=[nan] * k)
    if max_new_tokens <= 0:
        return idx, stats
    gen = make_generator(seed, dev)
    greedy = temperature == 0
    to_probs = lambda logits: logits_to_probs(logits, temperature, top_k, top_p)  # noqa: E731
    draw = lambda logits, b: _draw(logits, b, to_probs, greedy, gen)  # noqa: E731
    last = T + max_new_tokens - 1
    # the verify forward writes slots up to pos + n with pos <= last, the output up to pos + k + 1
    max_len = T + max_new_tokens + tree.n + 1 + proposer.extra_len
    rows = torch.arange(B, device=dev)
    j = torch.arange(k + 1, device=dev)
    out = idx.new_zeros(B, max_len)
    out[:, :T] = idx
    model.setup_cache(B, cache_size(max_len, compile))
    try:
        proposer.start(idx, model.cache_len)
        logits, h = _target(model, idx, proposer.wants_hidden, prefill=True)
        pos = torch.full((B,), T, device=dev)
        if h is not None:
            proposer.observe(h, pos - T)
        out[:, T] = sample(to_probs(logits[:, -1]), gen)[:, 0]
        steps = 0
        row_steps, emitted, accepted_at = (torch.zeros(n, device=dev, dtype=torch.long) for n in (1, 1, k))
        while True:
            active = pos < last
            if not active.any():  # the one host sync per step
                break
            pos = pos.clamp(max=last)
            tokens, q = proposer.propose_tree(out, pos, tree, draw)  # (B, N + 1), (B, N + 1, V)
            logits, h = _target(model, tokens, proposer.wants_hidden, fwd, tree=tree.inputs(pos, model.cache_len))
            path, a, x = _verify_tree(tree, tokens, to_probs(logits), q, gen, residual)
            # the accepted path's entries move from their nodes' slots to those of their positions
            src = torch.where(j[None, 1:] <= a[:, None], pos[:, None] + path, pos[:, None] + j[1:])
            model.move_cache(src, pos[:, None] + j[1:])
            if isinstance(proposer, _DraftModel):
                proposer.model.move_cache(src, pos[:, None] + j[1:])
            new = torch.cat([tokens[rows[:, None], path], path.new_zeros(B, 1)], dim=1)
            new[rows, a] = x
            write = active[:, None] & (j <= a[:, None])
            at = pos[:, None] + 1 + j
            out[rows[:, None], at] = torch.where(write, new, out[rows[:, None], at])
            if h is not None:  # the hidden states along the accepted path, as the chain would have them
                proposer.observe(h[rows[:, None], torch.cat([path.new_zeros(B, 1), path], dim=1)], pos)
            pos = torch.where(active, pos + a + 1, pos)
            steps += 1
            row_steps += active.sum()
            emitted += ((a + 1) * active).sum()
            accepted_at += ((j[None, 1:] <= a[:, None]) * active[:, None]).sum(dim=0)
        row_steps, emitted = int(row_steps), int(emitted)
        stats.update(target_forwards=steps + 1, draft_forwards=steps * k, proposed=row_steps * k,
                     accepted=emitted - row_steps)
        if row_steps:
            stats.update(acceptance_rate=(emitted - row_steps) / (row_steps * k),
                         tokens_per_step=emitted / row_steps, accepted_at=(accepted_at / row_steps).tolist())
    finally:
        model.clear_cache()
        proposer.stop()
    return out[:, :T + max_new_tokens], stats
