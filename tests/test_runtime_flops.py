"""MFU's FLOPs count attention over the document lengths of a packed batch (issue 14, point 8)."""
import numpy as np
import torch

from nano.config import ModelConfig
from nano.model import Transformer
from nano.runtime import flops_per_token


def test_attention_flops_follow_document_lengths():
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64))
    T = 64
    per_key = 3 * 2 * model.config.n_layer * model.config.n_head * 2 * model.config.head_dim  # fwd + bwd, QK + PV
    one_doc = flops_per_token(model, T, torch.tensor([0, T], dtype=torch.int32))
    assert one_doc == flops_per_token(model, T)  # one document per row: the causal (T + 1) / 2 keys per query
    # two rows of documents 10 + 54 and 64: mean keys per query sum L (L + 1) / 2 / sum L
    cu = np.array([0, 10, 64, 128], dtype=np.int32)
    ctx = (10 * 11 / 2 + 54 * 55 / 2 + 64 * 65 / 2) / 128
    assert abs(one_doc - flops_per_token(model, T, cu) - per_key * ((T + 1) / 2 - ctx)) < 1e-6 * one_doc
