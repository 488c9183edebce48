import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from tyingrun.config import ModelConfig  # noqa: E402
from tyingrun.models.gpt2 import GPT2  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer and token cache for the whole session, as a user's ~/.cache/tyingrun would be."""
    return tmp_path_factory.mktemp("tyingrun-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, data_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TYINGRUN_CACHE", str(data_cache))


def tiny_gpt2(n_layer=4, grad_mode="shared", vocab=64, d_model=32, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=n_layer, n_head=2, d_model=d_model, dropout=dropout, max_positions=32)
    return GPT2(cfg, vocab, grad_mode)


def lm_batch(vocab=64, batch=4, length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
