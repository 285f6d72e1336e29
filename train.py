"""Train a nano model.

    python train.py                                   # default corpus; 124m preset on CUDA, tiny on CPU
    python train.py --preset tiny --max-steps 200     # any ModelConfig/TrainConfig field is a flag
    python train.py --out-dir out --resume            # continue exactly where the last checkpoint left off
    torchrun --nproc_per_node=8 train.py --parallel fsdp   # many GPUs (DDP by default)

Reads top to bottom: setup, data, model, optimizer, then the loop (eval/checkpoint -> micro-steps ->
clip -> step -> log). Every number logged to the terminal also goes to OUT_DIR/metrics.jsonl.
"""
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nano.chat import chat_token_ids, data_kind, prepare_chat, render, with_chat_tokens
from nano.checkpoint import (CheckpointError, lock_run_dir, previous_path, resume_checkpoint,
                            save_checkpoint)
from nano.config import ModelConfig, build_parser, parse_args, parse_train_args
from nano.data import PackedLoader, plan_epochs, prepare_data
from nano.finetune import load_base
from nano.generate import generate
from nano.dpo import PairLoader, dpo_metrics, pair_loss, prepare_dpo, reference_logps
from nano.dpo import evaluate as evaluate_pairs
from nano.lora import apply_lora, fingerprint, lora_disabled, lora_state_dict
from nano.model import Block, Transformer
from nano.optim import build_optimizers, lr_at, peak_lr
from nano.runtime import autocast, flops_per_token, peak_flops, pick_device
from nano.tokenizer import Tokenizer, load_tokenizer

POST_TRAINING = ("lora_rank", "lora_alpha", "lora_targets", "dpo_beta")  # a resumed run keeps the saved ones


def main(argv):
    # -------------------------------------------------------------------------
    # setup: processes (torchrun or one), device and dtype; the default preset depends on the device
    pre = parse_train_args(argv)  # --device and --dtype decide the default preset
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device, dtype, reason = pick_device(pre.device, pre.dtype)
    model_cfg, cfg = parse_args(argv, defaults={"preset": "124m" if device.type == "cuda" else "tiny"})
    if world > 1:
        _check_launcher(device, local_rank)
        if cfg.batch_size % world:
            raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch and must be divisible by the "
                             f"world size ({world}); change --batch-size or --nproc_per_node")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0  # logs, writes checkpoints and metrics
    say = print if master else (lambda *a, **k: None)
    say(f"device: {device}, dtype: {str(dtype).removeprefix('torch.')} ({reason})"
        + (f"; {world} processes, {cfg.parallel}" if world > 1 else ""))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    ckpt_file = os.path.join(cfg.out_dir, "ckpt.pt")
    if master:  # held until this process ends or dies: a second run on the same out_dir refuses
        lock_run_dir(cfg.out_dir)
    state = None
    if cfg.resume:
        state, path = resume_checkpoint(cfg.out_dir, say)  # ckpt.pt, or ckpt.prev.pt if that is damaged
        model_cfg = ModelConfig(**state["model_config"])  # the architecture is the checkpoint's
        saved = state["train_config"]
        cfg = replace(cfg, data=saved["data"], tokenizer=saved["tokenizer"], seed=saved["seed"],
                      data_max_bytes=saved.get("data_max_bytes", 0),  # older checkpoints lack these two
                      tokenizer_train_bytes=saved.get("tokenizer_train_bytes", 300_000_000))
        trained_with = saved.get("optimizer", "adamw")  # checkpoints from before Muon lack the field
        if trained_with != cfg.optimizer:
            raise ValueError(f"{path} was trained with --optimizer {trained_with}, not {cfg.optimizer}: "
                             "its optimizer state does not carry over; resume with the same --optimizer")
        init_from = saved.get("init_from", "")
        if cfg.init_from and os.path.abspath(cfg.init_from) != init_from:
            raise ValueError(f"{path} was started from --init-from {init_from or '(random weights)'}, not "
                             f"{cfg.init_from}: resume without --init-from, or start a new --out-dir")
        cfg = replace(cfg, init_from=init_from, **{k: saved[k] for k in POST_TRAINING if k in saved})
        say(f"resuming from {path} at step {state['step']}")
    elif os.path.exists(ckpt_file) or os.path.exists(previous_path(ckpt_file)):
        raise ValueError(f"{cfg.out_dir} holds a checkpoint: pass --resume to continue it, or choose another "
                         "--out-dir")

    # -------------------------------------------------------------------------
    # the starting model (--init-from: a nano run or a Hugging Face folder), and the tokenizer that comes
    # with it: the data is tokenized with the model's own (nano/finetune.py)
    kind = data_kind(cfg.data)  # "text" (pretraining), "chat" (SFT) or "dpo" (preference pairs)
    base = base_tok = None
    if cfg.init_from and (state is None or "lora" in state):  # a LoRA run resumes on its frozen base
        base, base_tok = load_base(cfg.init_from)
        say(f"init: {cfg.init_from}: {base.num_params() / 1e6:.2f}M parameters, tokenizer {base_tok.name}")
        if state is None:
            model_cfg = base.config  # the architecture is the base's
        if cfg.tokenizer and not same_tokenizer(load_tokenizer(cfg.tokenizer), base_tok):
            raise ValueError(f"--tokenizer {cfg.tokenizer} is not the tokenizer of --init-from {cfg.init_from}: "
                             "the data must be tokenized with the model's own; drop --tokenizer")
        if kind != "text":
            base_tok, _ = with_chat_tokens(base_tok)  # nano's BPE gains the chat template's special tokens
    if kind == "text" and base_tok is not None:
        cfg = replace(cfg, tokenizer=os.path.join(cfg.out_dir, "tokenizer.tiktoken"))
        if master and state is None:
            base_tok.save(cfg.tokenizer)  # prepare_data reads it (and so does a resumed run)
    cfg = replace(cfg, init_from=os.path.abspath(cfg.init_from) if cfg.init_from else "")

    # -------------------------------------------------------------------------
    # data: tokenizer + memory-mapped shards (cached), packed rows with document boundaries; chat and
    # preference data are rendered in the model's chat template (nano/chat.py, nano/dpo.py)
    if world > 1 and not master:
        dist.barrier()  # rank 0 trains the tokenizer and writes the cache; the others then read it
    if kind == "text":
        data = prepare_data(cfg.data, cfg.tokenizer, model_cfg.vocab_size, progress=master,
                            tokenizer_train_bytes=cfg.tokenizer_train_bytes, data_max_bytes=cfg.data_max_bytes)
        tok = data.tokenizer
    else:
        tok = Tokenizer.from_state(state["tokenizer"]) if state is not None else base_tok
        if tok is None and cfg.tokenizer:
            tok, _ = with_chat_tokens(load_tokenizer(cfg.tokenizer))
        if tok is None:
            raise ValueError(f"--data {cfg.data} is {kind} data: fine-tune a pretrained model with --init-from "
                             "PATH (or give --tokenizer to train one from scratch)")
        data = (prepare_chat if kind == "chat" else prepare_dpo)(cfg.data, tok, cfg.seq_len)
    if world > 1 and master:
        dist.barrier()
    say(describe_data(data, kind, tok))
    if state is not None and tok.state() != state["tokenizer"]:
        raise ValueError("the tokenizer prepared for this data differs from the checkpoint's; resume with "
                         "the same --data and --tokenizer as the original run")
    if state is None:  # (a Hugging Face model's vocabulary may be padded beyond its tokenizer's)
        model_cfg = replace(model_cfg, vocab_size=max(tok.vocab_size, base.config.vocab_size if base else 0))
    rows = cfg.batch_size // world  # this process's rows of each global micro-batch
    if cfg.tokens_per_step:
        micro = cfg.batch_size * cfg.seq_len
        if cfg.tokens_per_step % micro:
            raise ValueError(f"tokens_per_step ({cfg.tokens_per_step}) must be a multiple of batch_size * "
                             f"seq_len ({micro}); change --tokens-per-step or --batch-size")
        cfg = replace(cfg, grad_accum=cfg.tokens_per_step // micro)
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    # on a GPU the default run (124m, 1,000 steps of 262k tokens) would make ~33 epochs of the stdlib
    given = vars(build_parser().parse_args(argv))  # the flags on the command line, nothing else
    cut = device.type == "cuda" and not cfg.data and "max_steps" not in given
    n_train_tokens = (sum(len(c[0]) + len(r[0]) for c, r in data.train) if kind == "dpo"
                      else len(data.train))
    cfg, notes = plan_epochs(cfg, n_train_tokens, tokens_per_step, cut=cut)
    for note in notes:
        say(note)
    if kind == "dpo":  # preference pairs: both sequences of a pair in one batch (nano/dpo.py)
        loader = PairLoader(data.train, rows, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world,
                            pad_id=tok.pad_id)
        can_eval = len(data.val) > 0
    else:
        loader = PackedLoader(data.train, rows, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)
        can_eval = len(data.val) >= cfg.seq_len + 1
        if kind == "text":
            PackedLoader(data.val, rows, cfg.seq_len)  # fail now, not at the first eval, if val is too small
    if not can_eval:
        say("warning: the val split is too small for one batch: no validation metrics (give more data)")

    # -------------------------------------------------------------------------
    # model: built (or taken from --init-from) on the device, LoRA adapters put on, then wrapped for
    # DDP / FSDP2 and compiled
    lora = None
    if base is None:
        raw_model = Transformer(model_cfg)
    else:
        raw_model = base
        if cfg.lora_rank:  # which base the adapters belong to: checked when they are loaded again
            lora = {"base": cfg.init_from, "base_fingerprint": fingerprint(base.state_dict())}
            if state is not None and lora["base_fingerprint"] != state["lora"]["base_fingerprint"]:
                raise ValueError(f"the model at {cfg.init_from} changed since this LoRA run started from it: "
                                 "restore that base to resume")
        raw_model.grow_vocab(model_cfg.vocab_size)  # rows for the chat tokens a fine-tune adds
    if cfg.lora_rank:
        if base is None:
            raise ValueError("--lora-rank adapts a pretrained model: give it with --init-from PATH")
        if device.type == "cuda":  # the frozen base computes in the AMP dtype anyway: store it so (half memory)
            for p in raw_model.parameters():
                p.data = p.data.to(dtype)
        token_ids = chat_token_ids(tok) if kind != "text" else []
        targets = [t for t in cfg.lora_targets.split(",") if t] or None
        apply_lora(raw_model, cfg.lora_rank, cfg.lora_alpha, targets, token_ids)
        lora.update(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets, token_ids=token_ids)
        trainable = set(lora_state_dict(raw_model))
        say(f"LoRA: rank {cfg.lora_rank}, alpha {cfg.lora_alpha}: "
            f"{sum(p.numel() for p in raw_model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
            f"parameters ({len(token_ids)} token rows)")
    raw_model.to(device)
    raw_model.set_grad_ckpt(cfg.grad_ckpt)
    say(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {model_cfg.n_layer} layers, vocab "
        f"{model_cfg.vocab_size}; {cfg.grad_accum} x {cfg.batch_size} x {cfg.seq_len} = {tokens_per_step:,} "
        "tokens per step")
    ddp_model = None
    if world > 1 and cfg.parallel == "fsdp":
        # shard every block, then the rest (embedding, head); compute in the AMP dtype, reduce in fp32
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in [m for m in raw_model.modules() if isinstance(m, Block)]:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)
        model = raw_model
    elif world > 1:
        # no buffer broadcast: the MoE load counters are per rank (summed at each bias update), and the
        # other buffers (RoPE tables, expert biases) are equal on every rank by construction
        model = ddp_model = DDP(raw_model, device_ids=[local_rank] if device.type == "cuda" else None,
                                broadcast_buffers=False)
    else:
        model = raw_model
    compile_on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_on:
        model = torch.compile(model)

    def grad_sync(on):
        """Gradient all-reduce only on the last micro-step of an accumulation."""
        if ddp_model is not None:
            ddp_model.require_backward_grad_sync = on
        elif world > 1:
            raw_model.set_requires_gradient_sync(on)

    def all_sum(t):
        """Sum a device tensor over the processes; no host read."""
        if world > 1:
            dist.all_reduce(t)
        return t

    # -------------------------------------------------------------------------
    # optimizer: AdamW (no weight decay on norms, biases and embeddings), or with --optimizer muon, Muon for
    # the hidden matrices and AdamW for the rest (nano/optim.py); both on the schedule of lr_at
    optimizers = build_optimizers(raw_model, cfg, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # full (unsharded) state dicts: a checkpoint resumes on any number of processes, and sample.py
    # reads it without torch.distributed
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = 0
    if state is not None:
        # set_model_state_dict silently skips weights the checkpoint lacks: compare names and shapes first
        want, got = raw_model.state_dict(), state["model"]
        if lora:
            want = {k: v for k, v in want.items() if k in trainable}  # the base came from --init-from
        bad = sorted(k for k in want.keys() | got.keys() if k not in want or k not in got
                     or tuple(want[k].shape) != tuple(got[k].shape))
        if bad:
            raise ValueError(f"{path}: checkpoint weights do not match its config (first: {bad[0]})")
        set_model_state_dict(raw_model, state["model"], options=replace(full, strict=not lora))
        set_optimizer_state_dict(raw_model, list(optimizers.values()), state["optimizer"], options=full)
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        random.setstate(state["rng"]["python"])
        step = state["step"]
    # DPO's reference: with LoRA the same weights with the adapters off; otherwise the starting model's
    # log-probs of every pair, computed once here (and kept in the checkpoint for a resumed run)
    dpo_reference = reference = val_reference = None
    if kind == "dpo" and lora:
        reference = val_reference = lambda: lora_disabled(raw_model)
    elif kind == "dpo":
        dpo_reference = state.get("dpo_reference") if state is not None else None
        if dpo_reference is None:
            say("dpo: the reference log-probs of every pair (once)")
            dpo_reference = {split: reference_logps(model, pairs, rows, cfg.seq_len, rank=rank, world_size=world,
                                                    autocast=lambda: autocast(device, dtype)).cpu()
                             for split, pairs in (("train", data.train), ("val", data.val)) if pairs}
        reference, val_reference = (dpo_reference.get(k, torch.zeros(0, 2)).to(device) for k in ("train", "val"))
    del state

    def checkpoint():
        model_sd = get_model_state_dict(raw_model, options=full)  # collective under FSDP: every rank calls
        optim_sd = get_optimizer_state_dict(raw_model, list(optimizers.values()), options=full)
        extra = {}
        if lora:  # the adapters and token rows only (small), and where their base is
            model_sd, extra["lora"] = {k: v for k, v in model_sd.items() if k in trainable}, lora
        if dpo_reference is not None:
            extra["dpo_reference"] = dpo_reference  # the reference's log-probs, computed once
        if master:
            save_checkpoint(ckpt_file, {
                **extra, "model": model_sd, "model_config": asdict(model_cfg), "train_config": asdict(cfg),
                "optimizer": optim_sd, "scaler": scaler.state_dict(), "loader": loader.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "step": step, "tokenizer": tok.state(), "world_size": world})
        if world > 1:
            dist.barrier()

    # -------------------------------------------------------------------------
    # evaluation, sampling, logging
    metrics_file = os.path.join(cfg.out_dir, "metrics.jsonl")
    if master:
        _truncate_metrics(metrics_file, step)

    def log(record):
        if master:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def batch_to(batch):
        return [t.to(device, non_blocking=True) for t in batch]

    @torch.no_grad()
    def evaluate():
        """The validation metrics: val_loss (the next-token loss, or DPO's), and val_bpb for text,
        val_dpo_accuracy for preference pairs."""
        if not can_eval:
            return {}
        if kind == "dpo":
            return evaluate_pairs(model, data.val, rows, cfg.seq_len, cfg.dpo_beta, val_reference, rank=rank,
                                  world_size=world, max_batches=cfg.eval_steps, autocast=lambda: autocast(device, dtype))
        model.eval()
        val = PackedLoader(data.val, rows, cfg.seq_len, rank=rank, world_size=world)  # same batches each time
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * targets, targets)
        for _ in range(cfg.eval_steps):
            x, y, cu = batch_to(val.next_batch())
            n = (y != -100).sum()
            with autocast(device, dtype):
                model(x, y, cu_seqlens=cu)
            sums += torch.stack([raw_model.loss_terms["lm"] * n, n])  # next-token loss only, no MTP/balance
        model.train()
        loss_sum, count = all_sum(sums).tolist()  # the one host read of the evaluation
        loss = loss_sum / count
        if kind == "chat":
            return {"val_loss": loss}
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token}  # across tokenizers

    def show_eval(prefix):
        metrics = evaluate()
        if metrics:
            say(prefix + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))
            log({"step": step, **metrics})

    def show_sample(n=48):
        raw_model.eval()  # every rank runs it (FSDP needs all of them for a forward); rank 0 prints
        if kind == "text":
            ids = [tok.bos_id] + tok.encode("def ")
        else:  # a chat model answers a question
            ids, _ = render(tok, [{"role": "user", "content": "Hello! Who are you?"}], add_generation_prompt=True)
        prompt = torch.tensor([ids], device=device)
        with autocast(device, dtype):
            out = generate(raw_model, prompt, n, temperature=0.8, top_k=50, seed=cfg.seed, compile=False)
        raw_model.train()
        if master:
            tqdm.write("sample: " + repr(tok.decode(out[0, len(ids) - (kind == "text"):].tolist())))

    peak = peak_flops(device)
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # save and exit cleanly instead of dying mid-step
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # -------------------------------------------------------------------------
    # the loop
    model.train()
    start_step, skipped = step, 0
    pbar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not master)
    t_read = time.perf_counter()  # the last host read (see tok_s below)
    while step < cfg.max_steps:
        if step % cfg.eval_every == 0:
            show_eval(f"step {step}: ")
            t_read = time.perf_counter()  # the step's interval starts after the evaluation
        if cfg.sample_every and step % cfg.sample_every == 0 and step > start_step:
            show_sample()
            t_read = time.perf_counter()

        lr = lr_at(step, cfg)  # logged: AdamW's; Muon's follows the same schedule from its own peak
        for name, optimizer in optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, peak_lr(name, cfg))
        # Weight each micro-batch by its share of the step's (global) non-ignored targets, so the
        # gradient is that of the mean over all of them: independent of how rows are split into
        # micro-steps and processes (DDP/FSDP average over processes, hence the factor `world`).
        # Everything stays on the device: no host sync until the step's one read below.
        # The unit of the mean is a target token, or a preference pair for DPO (nano/dpo.py: pair_loss).
        batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
        cus = [b.cu_seqlens if kind == "dpo" else b[2] for b in batches]
        flops_token = sum(flops_per_token(raw_model, cfg.seq_len, cu) for cu in cus) / cfg.grad_accum
        if kind == "dpo":
            counts = torch.tensor([float(b.n_pairs) for b in batches], dtype=torch.float64, device=device)
            batches = [b.to(device) for b in batches]
        else:
            batches = [batch_to(b) for b in batches]  # the FLOPs above read the host copies of cu_seqlens
            counts = torch.stack([(y != -100).sum() for _, y, _ in batches]).double()
        total = all_sum(counts.sum()).clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # DPO: pairs, correct, margin sum
        for i, batch in enumerate(batches):
            grad_sync(i == cfg.grad_accum - 1)
            with autocast(device, dtype):
                if kind == "dpo":
                    loss, batch_stats = pair_loss(model, batch, cfg.dpo_beta, reference)
                    stats += batch_stats
                else:
                    _, loss = model(batch[0], batch[1], cu_seqlens=batch[2])
            scaler.scale(loss * (counts[i] * world / total).float()).backward()
            loss_sum += loss.detach() * counts[i]
        for optimizer in optimizers.values():
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        # the step's one host read: every logged scalar and the stop flag, in one vector
        stop_flag = torch.tensor(float(bool(stop_signal)), dtype=torch.float64, device=device)
        shared = all_sum(torch.cat([torch.stack([loss_sum, stop_flag]), stats]))  # one collective for all
        extra = {f"loss/{k}": v for k, v in raw_model.loss_terms.items()} if len(raw_model.loss_terms) > 1 else {}
        extra.update(raw_model.moe_stats())  # the loads that update_moe_bias is about to use
        values = torch.stack([shared[0] / total, grad_norm.double(), *shared[1:]]
                             + [v.double() for v in extra.values()]).tolist()
        loss_value, grad_norm, stop = values[0], values[1], values[2] > 0
        extra = dict(zip(extra, values[6:]))
        if kind == "dpo":
            extra.update(dpo_metrics(values[3:6]))
        if not math.isfinite(loss_value):
            last = f"the last good checkpoint is {ckpt_file}" if os.path.exists(ckpt_file) else "no checkpoint yet"
            raise FloatingPointError(f"loss is {loss_value} at step {step}: stopping ({last}); try a lower --lr, "
                                     "--dtype bf16/fp32, or a smaller --grad-clip")
        scale_before = scaler.get_scale()
        for optimizer in optimizers.values():
            scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale_before:
            skipped += 1  # fp16 overflow: GradScaler skipped this update and lowered the scale
        raw_model.zero_grad(set_to_none=True)
        raw_model.update_moe_bias()  # aux-loss-free MoE balancing; a no-op for dense models
        step += 1

        # throughput from one host read to the next: each interval holds one whole step of device work
        # once the queue is in its steady state (no torch.cuda.synchronize(), which would drain it)
        now = time.perf_counter()
        dt, t_read = now - t_read, now
        tok_s = tokens_per_step / dt
        mfu = flops_token * tok_s / (peak * world) if peak else None
        mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tok_per_s": tok_s,
                  "mfu": mfu, "mem_gib": mem, "packing": loader.efficiency}
        if scaler.is_enabled():
            record["skipped_steps"] = skipped
        record.update(extra)  # MTP / balance terms of the last micro-step, MoE expert loads
        log(record)
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}",
                         mfu="unknown" if mfu is None else f"{mfu:.1%}")
        if master and step % cfg.log_every == 0:
            tqdm.write(f"step {step}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                       f"{tok_s:,.0f} tok/s, MFU {'unknown' if mfu is None else f'{mfu:.1%}'}, "
                       f"mem {mem:.2f} GiB" + (f", skipped steps {skipped}" if scaler.is_enabled() else "")
                       + (f", expert load max/mean {record['moe/max_load']:.2f}" if "moe/max_load" in record
                          else ""))

        done = step == cfg.max_steps or (cfg.stop_after and step - start_step >= cfg.stop_after)
        if step % cfg.ckpt_every == 0 or done or stop:
            checkpoint()
            t_read = time.perf_counter()
        if stop:
            say(f"signal received: checkpoint saved to {ckpt_file} at step {step}; continue with --resume")
            break
        if done:
            break
    pbar.close()

    if step == cfg.max_steps:
        show_eval("final: ")
        say(f"checkpoint {ckpt_file}")
        show_sample()
    if world > 1:
        dist.destroy_process_group()


def same_tokenizer(a, b):
    """Same tokens, ids and rules (the name aside: one file may be known under two names)."""
    return {k: v for k, v in a.state().items() if k != "name"} == {k: v for k, v in b.state().items() if k != "name"}


def describe_data(data, kind, tok):
    """One line about the prepared data: its size, what was skipped (bad lines by number), where it is."""
    r = data.report
    bad = ""
    if kind != "text" and r["n_bad_lines"]:
        bad = f"; skipped {r['n_bad_lines']} bad lines" + "".join(f"; line {i}: {why}" for i, why in r["bad_lines"][:5])
    if kind == "chat":
        return (f"data: {r.get('source', '')}: {r['n_train']:,} train / {r['n_val']:,} val conversations "
                f"({r['template']} template), {r['n_tokens']:,} tokens of which {r['n_trained_tokens']:,} trained, "
                f"{r['n_longer_than_seq_len']:,} longer than seq_len (cut into rows), "
                f"{r['n_without_assistant']:,} without an assistant turn (skipped){bad}")
    if kind == "dpo":
        return (f"data: {r['n_train']:,} train / {r['n_val']:,} val preference pairs, {r['n_tokens']:,} tokens, "
                f"{r['n_longer_than_seq_len']:,} longer than seq_len (skipped){bad}")
    skipped = {k.removeprefix("skipped_"): v for k, v in r.items() if k.startswith("skipped_") and v
               and isinstance(v, int)}
    if r.get("bad_lines"):
        skipped["bad jsonl lines"] = r["bad_lines"]
    return (f"data: {r['source']}: {r['n_train_docs']:,} train / {r['n_val_docs']:,} val documents, "
            f"{r['n_train_tokens']:,} train tokens, vocab {tok.vocab_size}"
            + (f"; skipped: {', '.join(f'{v} {k}' for k, v in skipped.items())}" if skipped else "")
            + f" ({'prepared' if r.get('cached') is False else 'cached'} in {data.path})")


def _check_launcher(device, local_rank):
    """torchrun sets these; a hand-made environment that lacks them fails here, not in a hang."""
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE > 1 but {var} is not set: launch with torchrun (several nodes: "
                             "--nnodes N --node-rank R --master-addr HOST --master-port PORT)")
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                         "--nproc_per_node must not exceed the GPU count")


def _truncate_metrics(path, step):
    """On resume, drop the records that come after the checkpoint (the run that was cut off wrote them,
    the resumed run writes them again); a fresh run starts an empty file."""
    if not os.path.exists(path):
        return
    lines = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the partial record of a run killed mid-append
            r = json.loads(line)
            if r["step"] < step or (r["step"] == step and "loss" in r):
                lines.append(line)
    with open(path + ".tmp", "w") as f:  # a kill while rewriting must not lose the history
        f.writelines(lines)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as e:
        if os.environ.get("NANO_DEBUG"):
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)  # as for a bad flag: one line, exit code 2
