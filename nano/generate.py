"""Generation with a KV cache: prefill the prompt once, then decode one token at a time.

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
    logits, _ = model(idx, start_pos=0)
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
