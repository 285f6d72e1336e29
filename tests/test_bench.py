"""Every benchmark's --smoke mode runs on a CPU (tiny shapes; it checks the script, measures nothing, and
writes no results file). bench/train.py and bench/attention.py are smoke-tested beside their own tests;
gpu_check.py --smoke runs every one of its sections (interpreted kernels, tiny models) in under 2 minutes."""
import os

import pytest

from common import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["loss", "moe", "decode", "tokenizer", "optim", "gpu_check"])
def test_bench_smoke(name, tmp_path):
    results = os.path.join(ROOT, "bench", "results")
    before = set(os.listdir(results)) if os.path.isdir(results) else set()
    env = dict(os.environ, NANO_CACHE=str(tmp_path))
    r = run_script(os.path.join(ROOT, "bench", f"{name}.py"), ["--smoke"], env)  # pre-imported: tests/common.py
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2500:]
    assert r.stdout.strip()  # it printed its table
    after = set(os.listdir(results)) if os.path.isdir(results) else set()
    assert after == before
