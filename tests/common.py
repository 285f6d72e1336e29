"""Small helpers shared by the tests that run train.py as a user would."""
import json
import os
import random
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_documents(path, n=600, seed=0):
    """A .jsonl of many short documents (stdlib lines): many document ends in every row, so micro-batches
    hold different numbers of targets and their weighting matters."""
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            i = rng.randrange(len(lines) - 4)
            f.write(json.dumps({"text": " ".join(lines[i:i + rng.randint(1, 4)])}) + "\n")
    return str(path)


def stdlib_corpus(folder, n=15):
    """The first n standard-library files as text documents in folder."""
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(x for x in os.listdir(stdlib) if x.endswith(".py"))[:n]:
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            (folder / (name + ".txt")).write_text(f.read())
    return str(folder)


def script_env(cache):
    """The environment of a train.py run: its own data cache, the PyTorch CPU path (no Triton interpreter),
    one thread, and no torchrun variables left over."""
    env = dict(os.environ, NANO_CACHE=str(cache), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
