"""Config dataclasses, presets, and the CLI's one-line errors."""
import subprocess
import sys

import pytest

from nano.config import PRESETS, ModelConfig, TrainConfig, parse_args, preset
from nano.model import Transformer


def test_defaults_and_derived_fields():
    c = ModelConfig(n_layer=2)
    assert c.head_dim == c.n_embd // c.n_head and c.n_kv_head == c.n_head
    assert ModelConfig(n_embd=96, n_head=3).head_dim == 32


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    import torch
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() > 0


def test_preset_sizes():
    import torch

    def count(name):
        with torch.device("meta"):
            return Transformer(preset(name)).num_params()
    assert 100e6 < count("gpt2-small") < 150e6
    assert 280e6 < count("350m") < 420e6
    assert 1.1e9 < count("llama3.2-1b") < 1.35e9  # Llama-3.2-1B has 1.24B parameters


def test_parse_args_precedence():
    m, t = parse_args(["--preset", "tiny", "--n-layer", "3", "--max-steps", "20", "--grad-ckpt", "full",
                       "--compile", "false", "--rope-scaling", '{"factor": 8, "low_freq_factor": 1, '
                       '"high_freq_factor": 4, "original_max_position_embeddings": 64}'])
    assert m.n_layer == 3 and m.n_embd == PRESETS["tiny"]["n_embd"]
    assert t.max_steps == 20 and t.grad_ckpt == "full" and t.compile is False
    assert t.batch_size == PRESETS["tiny"]["train"]["batch_size"]
    assert m.rope_scaling["factor"] == 8


@pytest.mark.parametrize("argv,message", [
    (["--n-embd", "100", "--n-head", "3"], "n_embd (100) must be divisible by n_head (3)"),
    (["--n-head", "6", "--n-kv-head", "4"], "n_head (6) must be divisible by n_kv_head (4)"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--n-layer", "two"], "expected int, got 'two'"),
    (["--dtype", "fp8"], "dtype must be auto|bf16|fp16|fp32"),
])
def test_cli_errors_are_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "nano.config", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_every_field():
    r = subprocess.run([sys.executable, "-m", "nano.config", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    from dataclasses import fields
    for cls in (ModelConfig, TrainConfig):
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in r.stdout
