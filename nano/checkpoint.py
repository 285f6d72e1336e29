"""Checkpoints: written atomically with the previous one kept, loaded with weights_only=True, verified.

A checkpoint is one torch file (torch.save's zip format) holding only tensors and plain Python values:
model weights, both configs (as dicts), optimizer, GradScaler, loader and RNG states, the step and the
tokenizer, plus a CRC-32 of each of them computed while saving. Loading never runs code from the file
(weights_only=True refuses pickled objects) and trusts nothing it has not checked:
- the file is a complete zip (torch.save writes the zip directory last: a cut-off copy has none);
- the pickle (data.pkl) matches its zip CRC-32, so the unpickler never parses damaged bytes;
- every tensor and value matches the checksum saved with it. torch.load does not check the zip CRCs of
  tensor data, so without this a flipped bit in the weights would load silently.
Each kind of damage raises its own CheckpointError subclass, with a one-line message naming the file.
"""
import os
import pickle
import re
import zipfile
import zlib

import torch

from nano.config import ModelConfig

FORMAT = "nano-checkpoint"
VERSION = 2  # 2: checksums of every tensor and value


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; the message names the file and says why."""


class CheckpointNotFound(CheckpointError):
    pass


class CheckpointTruncated(CheckpointError):  # empty, or cut off before the end
    pass


class CheckpointCorrupt(CheckpointError):  # bytes changed after writing: a zip CRC, a checksum
    pass


class CheckpointUnsafe(CheckpointError):  # pickled Python objects: refused, never run
    pass


class CheckpointForeign(CheckpointError):  # intact, but not a checkpoint this nano writes
    pass


class CheckpointWriteError(CheckpointError):  # saving failed (disk full, ...); the previous file is intact
    pass


class RunDirLocked(CheckpointError):  # another live run owns the directory and its checkpoints
    pass


def ckpt_path(path):
    """A run directory or a checkpoint file -> the checkpoint file."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def previous_path(path):
    """Where save_checkpoint keeps the checkpoint that `path` replaced: ckpt.pt -> ckpt.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


# -----------------------------------------------------------------------------
# checksums: a CRC-32 per tensor (~3 GB/s, against ~0.3 GB/s for the write itself) and per plain value

def _leaves(obj, prefix=""):
    """(name, value) of every tensor and plain value in a nested state, e.g. ("model/norm.weight", t).
    Dicts are walked, and lists or tuples that hold tensors or dicts; other values are leaves."""
    if isinstance(obj, dict) or (isinstance(obj, (list, tuple))
                                 and any(isinstance(v, (dict, torch.Tensor)) for v in obj)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, obj


def _crc(value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        head = zlib.crc32(f"{t.dtype} {tuple(t.shape)}".encode())  # a changed dtype or shape is damage too
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), head)
    return zlib.crc32(repr(value).encode())  # plain values load back as the same types: same repr


def checksums(state):
    return {name: _crc(v) for name, v in _leaves(state)}


# -----------------------------------------------------------------------------
# save

def save_checkpoint(path, state):
    """Write `state` so that a kill or a full disk at any moment leaves a loadable checkpoint: torch.save
    to `path`.tmp and fsync it; then the current checkpoint becomes ckpt.prev.pt and the temp file takes
    its place (a kill between the two renames leaves only ckpt.prev.pt, which resume_checkpoint finds).
    A failed write raises CheckpointWriteError and leaves the existing files as they were. One writer at
    a time per directory: see lock_run_dir."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    state["checksums"] = checksums(state)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # make the renames themselves durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save wraps a failed write's OSError
        if not isinstance(cause, OSError):
            raise
        raise CheckpointWriteError(f"could not write the checkpoint {path} ({cause.strerror or cause}); the "
                                   "previous checkpoint is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# load

def _check_zip(path):
    """Structure and pickle CRC before the unpickler reads a byte: random bytes, a cut-off copy or a
    flipped bit in data.pkl end here with a named cause, not with whatever the unpickler trips on."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointTruncated(f"{path} is empty (an interrupted write or copy); use an earlier "
                                  "checkpoint")
    try:
        if not zipfile.is_zipfile(path):  # no zip directory at the end
            if head == b"PK\x03\x04":
                raise CheckpointTruncated(f"{path} is truncated or corrupt: it ends before the zip "
                                          "directory that torch.save writes last (an interrupted write or "
                                          "copy); use an earlier checkpoint")
            raise CheckpointForeign(f"{path} is not a nano checkpoint (not the zip format of torch.save); "
                                    "refusing to load it")
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
            if sum(r.filename.endswith("/data.pkl") for r in records) != 1:
                raise CheckpointForeign(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
            for r in records:
                if "/data/" not in r.filename:  # all but tensor data (checked by its checksum): small
                    z.read(r)  # checks the CRC-32
    # what zipfile raises on a damaged directory or header (bad offsets, sizes, flags, methods, names)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, ValueError) as e:
        raise CheckpointCorrupt(f"{path} is corrupt: {e}; use an earlier checkpoint") from None


def _refusal(path, e):
    # torch's message goes on to explain how to load the file anyway: never repeat that for a file that
    # may have been made to run code. Name the refused object only.
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f"a pickled Python object ({found.group(1)})" if found else "pickled data weights_only refuses"
    return CheckpointUnsafe(f"{path} holds {what}, which a nano checkpoint never has; refusing to load it "
                            "(nothing in it was run)")


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path` (a file or a run directory), verified; or a CheckpointError."""
    path = ckpt_path(path)
    if not os.path.isfile(path):
        raise CheckpointNotFound(f"no checkpoint at {path}: pass a run directory (with ckpt.pt) or a .pt "
                                 "file")
    _check_zip(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except (RuntimeError, UnicodeDecodeError) as e:  # torch's zip reader on a damaged zip zipfile let pass
        raise CheckpointCorrupt(f"{path} is corrupt ({str(e).splitlines()[0]}); use an earlier "
                                "checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointForeign(f"{path} is not a nano checkpoint (no '{FORMAT}' marker); for Hugging Face "
                                "models use --hf DIR")
    if state.get("version") != VERSION:
        raise CheckpointForeign(f"{path} has checkpoint version {state.get('version')!r}, this nano reads "
                                f"{VERSION}")
    saved = state.pop("checksums", None)
    if not isinstance(saved, dict):
        raise CheckpointCorrupt(f"{path} lacks its checksums; use an earlier checkpoint")
    actual = checksums(state)
    for name, crc in saved.items():  # in the order they were saved: the first damaged tensor is named
        if actual.get(name) != crc:
            what = "is missing" if name not in actual else "does not match its checksum"
            raise CheckpointCorrupt(f"{path} is damaged: {name} {what} (the file changed after it was "
                                    "written: a disk, memory or copy error); use an earlier checkpoint")
    if actual.keys() - saved.keys():
        raise CheckpointCorrupt(f"{path} is damaged: {min(actual.keys() - saved.keys())} was not in it when "
                                "it was written; use an earlier checkpoint")
    for key in ("model", "model_config", "tokenizer", "step"):
        if key not in state:
            raise CheckpointForeign(f"{path} lacks '{key}': not written by train.py")
    return state


def resume_checkpoint(out_dir, say=print):
    """(state, path) of the newest usable checkpoint of a run: ckpt.pt, else ckpt.prev.pt, saying why."""
    newest = os.path.join(out_dir, "ckpt.pt")
    prev = previous_path(newest)
    if not os.path.isfile(prev):
        if not os.path.isfile(newest):
            raise CheckpointNotFound(f"no checkpoint at {newest} (nor {prev}) to resume from; start "
                                     "without --resume")
        return load_checkpoint(newest), newest
    if not os.path.isfile(newest):
        say(f"{newest} is missing (a run was killed while replacing it); resuming from {prev}")
        return load_checkpoint(prev), prev
    try:
        return load_checkpoint(newest), newest
    except CheckpointError as e:
        say(f"{e}; resuming from the previous checkpoint {prev} instead")
    return load_checkpoint(prev), prev


def model_from_checkpoint(state, device="cpu"):
    """Transformer with the checkpoint's config and weights."""
    from nano.model import Transformer
    if "lora" in state:  # adapters only: nano.finetune.load_model puts them on their base
        raise CheckpointForeign("a LoRA run's checkpoint holds adapters, not a whole model: load it with "
                                "nano.finetune.load_model (sample.py, export and --init-from do)")
    try:
        config = ModelConfig(**state["model_config"])
    except (TypeError, ValueError) as e:  # unknown fields (a newer nano), or values this one refuses
        raise CheckpointForeign(f"the checkpoint's model config is not one this nano builds: {e}") from None
    model = Transformer(config)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointForeign(f"checkpoint weights do not match its config: {str(e).splitlines()[0]}") \
            from None
    return model.to(device)


def lock_run_dir(out_dir):
    """Hold an advisory lock on OUT_DIR/lock, with this process's pid in it, until the process ends. The
    kernel drops a flock when its holder exits or dies (kill -9 included), so a lock file left behind
    blocks nothing. Returns the open descriptor: closing it would release the lock."""
    import fcntl  # POSIX; imported here so that sample.py still runs where there is none
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirLocked(f"{out_dir} is in use by another run (pid {holder}, which holds {path}); wait for "
                           "it to end or choose another --out-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
