"""A user module for `--model py:user_model:build` tests."""

from costmodel.spec import gpt_spec
from planner.zoo.model import Transformer


def build():
    return Transformer(gpt_spec("user-gpt", layers=6, hidden=256, heads=8, vocab=1000, seq_len=128))


def not_a_transformer():
    import torch

    return torch.nn.Linear(4, 4)
