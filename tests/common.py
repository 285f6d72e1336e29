"""Small helpers shared by the tests that run train.py as a user would."""
import json
import os
import random
import select
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading

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


# -----------------------------------------------------------------------------
# Scripts run from a forked, pre-imported interpreter. A train.py / sample.py run spends ~2-3 s of a 1-step
# test importing torch; the suite runs ~80 of them. A server process imports torch once and forks a child
# per run; the child is a fresh process (its own pid, exit code, stdout/stderr files, environment, cwd) that
# runs the script as __main__, the way `python script.py` does. Only torch modules are loaded before the
# fork: nano, kernels and triton (which read the environment at import) are imported by the script itself.

_SERVER = r"""
import atexit, io, json, os, runpy, sys, threading, traceback
import torch  # noqa: F401  (the point: imported once, before every fork)
try:
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (train.py's next largest import)
except ImportError:
    pass

def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=bool(req["env"].get("PYTHONUNBUFFERED")))
    sys.path[:0] = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True, errors="backslashreplace")
    code = 0
    try:
        if req["module"]:
            sys.argv = [req["module"], *req["args"]]
            sys.path.insert(0, req["cwd"])
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [req["script"], *req["args"]]
            sys.path.insert(0, os.path.dirname(os.path.abspath(req["script"])))
            runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as e:  # what the interpreter does with it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # then, as at interpreter exit: non-daemon threads joined, atexit handlers run
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""
_server, _server_lock = None, threading.Lock()


def run_script(script, args, env, cwd=ROOT, timeout=300, module=None):
    """subprocess.run([python, script, *args], capture_output=True, text=True, env=env, cwd=cwd), or
    `python -m module` when module is given, from the pre-imported server: a CompletedProcess. Without
    os.fork (Windows), or with NANO_TEST_SUBPROCESS=1 in the environment, it is that subprocess.run."""
    global _server
    if not hasattr(os, "fork") or os.environ.get("NANO_TEST_SUBPROCESS") == "1":
        cmd = [sys.executable, *(["-m", module] if module else [script]), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    with _server_lock, tempfile.TemporaryDirectory() as tmp:
        if _server is None or _server.poll() is not None:
            base = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
            _server = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=base, cwd=ROOT)
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        open(out, "w").close()
        open(err, "w").close()
        _server.stdin.write(json.dumps({"script": script, "module": module, "args": list(args), "env": dict(env),
                                        "cwd": str(cwd), "stdout": out, "stderr": err}) + "\n")
        _server.stdin.flush()
        pid = json.loads(_server.stdout.readline())["pid"]
        ready, _, _ = select.select([_server.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            _server.stdout.readline()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        rc = json.loads(_server.stdout.readline())["rc"]
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            return subprocess.CompletedProcess([script or module, *args], rc, f.read(), g.read())
