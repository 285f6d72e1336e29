"""Checkpoints: written atomically, loaded with weights_only=True, checked before use.

A checkpoint is one torch file holding only tensors and plain Python values: model weights, both
configs (as dicts), optimizer, GradScaler, loader and RNG states, the step and the tokenizer.
Loading never runs code from the file (weights_only=True refuses pickled objects).
"""
import os
import pickle
import tempfile

import torch

from nano.config import ModelConfig

FORMAT = "nano-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


def ckpt_path(path):
    """A run directory or a checkpoint file -> the checkpoint file."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def save_checkpoint(path, state):
    """torch.save to a temp file beside `path`, fsync, then rename over it: a crash mid-write leaves
    the previous checkpoint intact, never a half-written one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path` (a file or a run directory), or a CheckpointError that says
    what is wrong: missing, truncated/corrupt, carrying code, or not written by nano."""
    path = ckpt_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory (with ckpt.pt) or a .pt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects that a nano checkpoint never has; refusing to "
                              f"load it (weights_only): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); "
                              "use an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nano checkpoint (no '{FORMAT}' marker); for Hugging Face "
                              "models use --hf DIR")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this nano reads {VERSION}")
    return state


def model_from_checkpoint(state, device="cpu"):
    """Transformer with the checkpoint's config and weights."""
    from nano.model import Transformer
    model = Transformer(ModelConfig(**state["model_config"]))
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its config: {str(e).splitlines()[0]}") from None
    return model.to(device)
