"""DPO (Rafailov et al. 2023, "Direct Preference Optimization"): preference pairs, their packed loader,
and the loss the training loop calls.

Data: a .jsonl with "prompt", "chosen", "rejected" per line, each a string or a message list (TRL's
convention). Without "prompt", chosen and rejected are whole conversations and the prompt is their
common leading messages (TRL's implicit prompt).

Loss, per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where pi_* / ref_* are the
summed log-probs of the chosen / rejected response tokens under the policy and under a frozen
reference. The log-probs come from the model's forward with reduction="none" (per-token cross-entropy,
through the fused kernel on CUDA: no (tokens, vocab) logits). The reference is either a table computed
once (reference_logps) or a context under which the same model is the reference (LoRA switched off).

Packing: both sequences of a pair go into one batch, each whole inside one row, several per row as
documents (cu_seqlens keeps them apart); `seq` maps every target position to its sequence, so the
per-sequence sums are one index_add.
"""
import gzip
import json
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nano.chat import check_messages, render
from nano.data import IGNORE  # the target of a position that is not a response token


# -----------------------------------------------------------------------------
# Reading and rendering pairs

def _normalise(rec):
    """(prompt, chosen, rejected) message lists of one JSON record; ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise ValueError(f"missing {missing}")
    chosen, rejected = rec["chosen"], rec["rejected"]
    if "prompt" in rec:
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = ([{"role": "assistant", "content": s}] if isinstance(s, str) else s
                            for s in (chosen, rejected))
    else:  # implicit prompt: the leading messages both conversations share
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError('no "prompt": chosen and rejected must then be message lists (whole '
                             'conversations)')
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, part in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(part, list):
            raise ValueError(f"{name} must be a string or a list of messages, got {type(part).__name__}")
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or not isinstance(resp[-1], dict) or resp[-1].get("role") != "assistant":
            raise ValueError(f"{name} must end with an assistant message")
        check_messages(prompt + resp)
    return prompt, chosen, rejected


def read_pairs(path):
    """(pairs, bad_lines): pairs = [(prompt, chosen, rejected) message lists], bad_lines = [(lineno,
    reason)] of the lines skipped (malformed JSON, missing keys, bad roles). Blank lines are ignored."""
    pairs, bad = [], []
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                pairs.append(_normalise(json.loads(line)))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
                bad.append((lineno, str(e)[:120]))
    return pairs, bad


def render_pair(tok, prompt, chosen, rejected):
    """((ids_c, mask_c), (ids_r, mask_r)): render(tok, prompt + response), the mask True on response
    tokens only. Assistant turns inside the prompt are context, not trained: the mask is cleared over
    the tokens that rendering the prompt alone produces (the common prefix, should a template render a
    conversation's end differently)."""
    p_ids = render(tok, prompt)[0] if prompt else []
    out = []
    for resp in (chosen, rejected):
        ids, mask = render(tok, prompt + resp)
        ids, mask = list(ids), list(mask)
        n = 0
        while n < min(len(p_ids), len(ids)) and p_ids[n] == ids[n]:
            n += 1
        mask[:n] = [False] * n
        out.append((ids, mask))
    return tuple(out)


@dataclass
class DPOData:
    train: list  # rendered pairs ((ids_c, mask_c), (ids_r, mask_r)), numpy arrays
    val: list
    report: dict


def prepare_dpo(path, tok, seq_len, *, val_fraction=0.01):
    """Read, render and split a DPO .jsonl. A sequence of n tokens fills n - 1 positions of a row (x and y
    are it shifted by one), so pairs with a sequence longer than seq_len + 1 tokens are dropped (counted).
    report: n_pairs (valid lines read), n_train, n_val, n_tokens (kept, both sequences),
    n_longer_than_seq_len, bad_lines (the first 20 (lineno, reason)), n_bad_lines."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pairs, bad = read_pairs(path)
    kept, n_long, n_tokens = [], 0, 0
    for p in pairs:
        rendered = render_pair(tok, *p)
        if max(len(ids) for ids, _ in rendered) > seq_len + 1:
            n_long += 1
            continue
        kept.append(tuple((np.asarray(ids, np.int64), np.asarray(mask, bool)) for ids, mask in rendered))
        n_tokens += sum(len(ids) for ids, _ in rendered)
    if not kept:
        raise ValueError(f"{path}: no usable preference pair ({len(pairs)} valid, {n_long} longer than "
                         f"seq_len + 1 = {seq_len + 1} tokens, {len(bad)} bad lines"
                         + (f", first: line {bad[0][0]}: {bad[0][1]}" if bad else "")
                         + '): each line needs "prompt", "chosen", "rejected" (or chosen/rejected '
                         "conversations) and fitting a row (raise --seq-len)")
    # deterministic split: a fixed permutation, independent of the training seed
    perm = np.random.default_rng(0).permutation(len(kept))
    n_val = min(max(1, round(len(kept) * val_fraction)), len(kept) - 1)
    val, train = [kept[i] for i in sorted(perm[:n_val])], [kept[i] for i in sorted(perm[n_val:])]
    report = {"n_pairs": len(pairs), "n_train": len(train), "n_val": len(val), "n_tokens": n_tokens,
              "n_longer_than_seq_len": n_long, "bad_lines": bad[:20], "n_bad_lines": len(bad)}
    return DPOData(train, val, report)


# -----------------------------------------------------------------------------
# Packing pairs into batches

@dataclass
class DPOBatch:
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 targets: the next token where it is a response token, else -100
    cu_seqlens: torch.Tensor  # int32: every sequence start, row start and padding start, then B*T
    seq: torch.Tensor  # (B*T,) int64: 2j / 2j+1 (pair j's chosen / rejected) whose target it is, else -1
    pair_ids: torch.Tensor  # (P,) int64 indices into the pair list
    n_pairs: int  # P, on the host

    def to(self, device):
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return DPOBatch(move(self.x), move(self.y), move(self.cu_seqlens), move(self.seq),
                        move(self.pair_ids), self.n_pairs)


def _positions(pairs):
    """(N, 2) row positions each sequence fills: its length - 1."""
    return np.array([[len(c[0]) - 1, len(r[0]) - 1] for c, r in pairs], np.int64).reshape(-1, 2)


def _check_fits(lens, B, T):
    """Every pair must fit an empty batch, or packing could never place it."""
    if len(lens) == 0:
        raise ValueError("no preference pairs to load: give a non-empty list (prepare_dpo's val split is "
                         "empty when the file holds a single pair)")
    if lens.max() > T:
        raise ValueError(f"a sequence fills {lens.max()} positions, more than seq_len = {T}: drop it "
                         "(prepare_dpo does) or raise seq_len")
    if B == 1 and (lens.sum(1) > T).any():
        j = int(np.argmax(lens.sum(1) > T))
        raise ValueError(f"pair {j} needs {lens[j].sum()} positions, more than one row of seq_len = {T}: "
                         "use batch_size >= 2 (chosen and rejected then get a row each) or a larger seq_len")


def _pack(lens, pair_at, start, B, T):
    """First-fit: place pairs pair_at(start), pair_at(start + 1), ... into B rows of T positions, both
    sequences of a pair or neither, until one does not fit (or pair_at returns None: the end).
    Returns ([(pair, (row_c, off_c), (row_r, off_r))], next stream position)."""
    free = np.full(B, T, np.int64)
    placed, i = [], start
    while (j := pair_at(i)) is not None:
        spots = []
        for n in lens[j]:
            row = int(np.argmax(free >= n))
            if free[row] < n:  # no row has room
                break
            spots.append((row, T - int(free[row])))
            free[row] -= n
        if len(spots) < 2:  # the batch is full (a lone chosen's place is never used)
            break
        placed.append((j, *spots))
        i += 1
    return placed, i


def _materialise(pairs, placed, B, T, pad_id):
    """The DPOBatch of a packing; returns it and the number of real (non-pad) positions."""
    x = np.full((B, T), pad_id, np.int64)
    y = np.full((B, T), IGNORE, np.int64)
    seq = np.full((B, T), -1, np.int64)
    starts, used = [], np.zeros(B, np.int64)
    for k, (j, *spots) in enumerate(placed):
        for s, (row, off) in enumerate(spots):
            ids, mask = pairs[j][s]
            n = len(ids) - 1
            x[row, off:off + n] = ids[:-1]
            y[row, off:off + n] = np.where(mask[1:], ids[1:], IGNORE)
            seq[row, off:off + n] = np.where(mask[1:], 2 * k + s, -1)
            starts.append(row * T + off)
            used[row] = max(used[row], off + n)
    rows = np.arange(B) * T
    # boundaries: each sequence's start, each row's start, where each row's padding starts (its own
    # segment; rows + used is the next row's start, or B*T, when the row is full), and the end
    cu = np.unique(np.concatenate([starts, rows, rows + used, [B * T]]).astype(np.int64))
    pair_ids = torch.tensor([j for j, *_ in placed], dtype=torch.int64)
    batch = DPOBatch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(cu.astype(np.int32)),
                     torch.from_numpy(seq.reshape(-1)), pair_ids, len(placed))
    return batch, int(used.sum())


class PairLoader:
    """DPOBatches of whole pairs, infinite over epochs.

    The pairs stream is the epochs' permutations (seeded by (seed, epoch)) end to end; a global batch
    is world_size local batches packed one after another from the stream (first-fit, see _pack), and
    rank r takes the r-th: ranks see disjoint pairs, every rank packs the same way from the lengths
    alone, and the state is one stream position. A batch may straddle two epochs.
    """

    def __init__(self, pairs, batch_size, seq_len, *, seed=0, rank=0, world_size=1, pad_id=0):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.pairs, self.B, self.T, self.pad_id = pairs, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lens = _positions(pairs)
        _check_fits(self.lens, batch_size, seq_len)
        self.pos = 0  # stream position where the next global batch starts
        self.n_real = self.n_seen = 0
        self._perms = {}

    @property
    def efficiency(self):
        """Fraction of the positions so far that held real tokens (not padding)."""
        return self.n_real / self.n_seen if self.n_seen else 1.0

    @property
    def epoch(self):
        return self.pos // len(self.pairs)

    def _pair_at(self, i):
        epoch, k = divmod(i, len(self.pairs))
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return int(self._perms[epoch][k])

    def next_batch(self):
        for r in range(self.world_size):
            placed, self.pos = _pack(self.lens, self._pair_at, self.pos, self.B, self.T)
            if r == self.rank:
                mine = placed
        batch, real = _materialise(self.pairs, mine, self.B, self.T, self.pad_id)
        self.n_real += real
        self.n_seen += self.B * self.T
        return batch

    def state_dict(self):
        return {"pos": self.pos, "seed": self.seed, "n_real": self.n_real, "n_seen": self.n_seen}

    def load_state_dict(self, sd):
        missing = {"pos", "seed"} - set(sd)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}; it was not made by "
                             "PairLoader.state_dict()")
        self.pos, self.seed = int(sd["pos"]), int(sd["seed"])
        self.n_real, self.n_seen = int(sd.get("n_real", 0)), int(sd.get("n_seen", 0))
        self._perms = {}


def _pass_batches(pairs, batch_size, seq_len, rank, world_size, max_batches=None):
    """One ordered pass over pairs: rank r packs pairs r, r + world_size, ... into batches. Every rank
    gets the same number of batches (the most any rank needs; an empty all-padding batch where it has
    run out), because a DDP/FSDP forward is a collective that all ranks must call."""
    lens = _positions(pairs)
    _check_fits(lens, batch_size, seq_len)
    packs = []
    for r in range(world_size):
        share = list(range(r, len(pairs), world_size))
        at = lambda i: share[i] if i < len(share) else None  # noqa: E731
        mine, i = [], 0
        while i < len(share) and (max_batches is None or len(mine) < max_batches):
            placed, i = _pack(lens, at, i, batch_size, seq_len)
            mine.append(placed)
        packs.append(mine)
    n = max(len(p) for p in packs)
    for placed in packs[rank] + [[]] * (n - len(packs[rank])):
        yield _materialise(pairs, placed, batch_size, seq_len, 0)[0]


# -----------------------------------------------------------------------------
# Log-probs and the loss

def sequence_logps(model, batch):
    """(P, 2) float64: the summed log-probs of each pair's chosen and rejected response tokens."""
    _, nll = model(batch.x, batch.y, cu_seqlens=batch.cu_seqlens, reduction="none")  # (B, T), 0 at -100
    P = batch.n_pairs
    # positions of no sequence go to an extra bin (2P) that is dropped: no boolean indexing, no sync
    idx = torch.where(batch.seq >= 0, batch.seq, 2 * P)
    sums = torch.zeros(2 * P + 1, dtype=torch.float64, device=nll.device)
    sums = sums.index_add(0, idx, -nll.reshape(-1).double())
    return sums[:-1].view(P, 2)


def dpo_loss(policy, reference, beta):
    """(loss per pair (P,), stats) from (P, 2) log-prob tables (chosen, rejected). stats = [P, pairs whose
    reward margin is > 0, sum of margins] float64 on the device: the train loop sums them and reads once."""
    ref = reference.detach()
    margin = beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))  # implicit reward margin
    loss = -F.logsigmoid(margin)
    m = margin.detach().double()
    stats = torch.stack([torch.ones_like(m).sum(), (m > 0).double().sum(), m.sum()])
    return loss, stats


def _reference_of(model, batch, reference):
    """The reference (P, 2) log-probs of a batch: rows of a table, or the model under a context."""
    if torch.is_tensor(reference):
        return reference[batch.pair_ids]
    # eval mode: a training-mode forward would add its MoE routing loads to the bias update
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference():
            return sequence_logps(model, batch)
    finally:
        model.train(was_training)


def pair_loss(model, batch, beta, reference):
    """(mean DPO loss over the batch's pairs, stats). reference: a device tensor (N, 2) of reference
    log-probs indexed by batch.pair_ids, or a callable returning a context under which model is the
    reference (e.g. lambda: lora_disabled(raw_model): no second copy of the weights)."""
    ref = _reference_of(model, batch, reference)  # first: its activations are gone before the policy's
    loss, stats = dpo_loss(sequence_logps(model, batch), ref, beta)
    return loss.mean().float(), stats


def _all_reduce(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def reference_logps(model, pairs, batch_size, seq_len, *, rank=0, world_size=1, autocast=nullcontext):
    """(len(pairs), 2) float64 on the model's device: every pair's reference log-probs, computed once (eval
    mode). Each rank fills its share; the sum over ranks completes the table."""
    device = _device(model)
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in _pass_batches(pairs, batch_size, seq_len, rank, world_size):
            batch = batch.to(device)
            with autocast():
                table[batch.pair_ids] = sequence_logps(model, batch)
    finally:
        model.train(was_training)
    return _all_reduce(table)


@torch.no_grad()
def evaluate(model, pairs, batch_size, seq_len, beta, reference, *, rank=0, world_size=1, max_batches=None,
             autocast=nullcontext):
    """{"val_loss", "val_dpo_accuracy", "val_dpo_margin"} over the pairs (all, or the first max_batches
    batches of each rank), summed over ranks. A table `reference` is the table of these pairs."""
    device = _device(model)
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, pairs, correct, margin sum
    was_training = model.training
    model.eval()
    try:
        for batch in _pass_batches(pairs, batch_size, seq_len, rank, world_size, max_batches):
            batch = batch.to(device)
            with autocast():
                ref = _reference_of(model, batch, reference)
                loss, stats = dpo_loss(sequence_logps(model, batch), ref, beta)
            total += torch.cat([loss.double().sum()[None], stats])
    finally:
        model.train(was_training)
    loss_sum, n, correct, margin = _all_reduce(total).tolist()  # the one host read
    return {"val_loss": loss_sum / n, "val_dpo_accuracy": correct / n, "val_dpo_margin": margin / n}


def dpo_metrics(stats, prefix=""):
    """{"dpo_accuracy", "dpo_margin"} (names with prefix) from host floats [pairs, correct, margin sum]."""
    n, correct, margin = (float(s) for s in stats)
    if n <= 0:
        raise ValueError(f"dpo_metrics needs stats of at least one pair, got {list(stats)}")
    return {prefix + "dpo_accuracy": correct / n, prefix + "dpo_margin": margin / n}
