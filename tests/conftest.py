import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from tyingrun.config import (  # noqa: E402
    Config,
    DatasetConfig,
    HardwareConfig,
    LogConfig,
    ModelConfig,
    PolicyConfig,
    TrainConfig,
)
from tyingrun.data.lm import MaskedLM  # noqa: E402
from tyingrun.models.bert import BERT  # noqa: E402
from tyingrun.models.gpt2 import GPT2  # noqa: E402
from tyingrun.models.vit import ViT  # noqa: E402
from tyingrun.run import run  # noqa: E402


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


TYINGRUN = ("-m", "tyingrun.cli")
# The model and batch of a CLI run that takes seconds; each test module adds its own schedule.
TINY_RUN = ["model.n_layer=4", "model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "log.progress=lines"]


class CLI:
    """The `tyingrun` command as a user runs it: a fresh interpreter, offline, wandb off, the session's data cache.

    ``cli(*overrides)`` runs ``python -m tyingrun.cli *overrides`` and returns the CompletedProcess (text output
    captured). ``entry`` replaces ``-m tyingrun.cli`` (``("-m", "tyingrun.data_cli")``, a launcher in front, or
    ``("-c", code)``); ``env`` is added to that environment (a value of None removes the variable); ``expect``
    asserts the exit status.
    """

    def __init__(self, cache):
        self.cache = cache

    def command(self, *args, entry=TYINGRUN):
        return [sys.executable, *entry, *args]

    def env(self, extra=None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TYINGRUN_CACHE": str(self.cache)}
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def __call__(self, *args, entry=TYINGRUN, cwd=None, env=None, expect=None, timeout=300):
        result = subprocess.run(self.command(*args, entry=entry), cwd=cwd, env=self.env(env), capture_output=True,
                                text=True, timeout=timeout)
        if expect is not None:
            assert result.returncode == expect, result.stderr[-3000:]
        return result

    def popen(self, *args, entry=TYINGRUN, env=None, **kwargs):
        """Start the command without waiting; ``kwargs`` go to subprocess.Popen (text mode)."""
        return subprocess.Popen(self.command(*args, entry=entry), env=self.env(env), text=True, **kwargs)


@pytest.fixture(scope="session")
def cli(data_cache):
    """Runs the `tyingrun` command in a subprocess (see CLI); session-scoped, so module fixtures can use it too."""
    return CLI(data_cache)


def tiny_gpt2(n_layer=4, grad_mode="shared", vocab=64, d_model=32, seed=0, dropout=0.0, tie=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=n_layer, n_head=2, d_model=d_model, dropout=dropout, max_positions=32,
                      tie_embeddings=tie)
    return GPT2(cfg, vocab, grad_mode)


def lm_batch(vocab=64, batch=4, length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def counted_flops_per_token(model, vocab=64, batch=2, length=32):
    """FLOPs of one training step of ``model`` on a random batch, as torch's FlopCounterMode counts them, per token."""
    batch = lm_batch(vocab=vocab, batch=batch, length=length)
    # The math backend runs attention as matrix products, which the counter sees (fused kernels it may not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(batch).loss.backward()
    return counter.get_total_flops() / batch["input_ids"].numel()


def tiny_bert(n_layer=4, grad_mode="shared", vocab=64, d_model=32, seed=0, causal=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="bert", n_layer=n_layer, n_head=2, d_model=d_model, max_positions=32, causal=causal)
    return BERT(cfg, vocab, grad_mode)


def mlm_batch(vocab=64, batch=4, length=16, seed=1):
    """An lm_batch masked as BERT's data masks it ([MASK] is id 0; no other special tokens)."""
    masking = MaskedLM(mask_id=0, vocab_size=vocab, special_ids=torch.tensor([0]))
    return masking(lm_batch(vocab, batch, length, seed), torch.Generator().manual_seed(seed))


def tiny_vit(n_layer=4, grad_mode="shared", d_model=32, seed=0, image_size=8, channels=1, n_classes=10):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="vit", n_layer=n_layer, n_head=2, d_model=d_model, patch_size=2)
    return ViT(cfg, image_size, channels, n_classes, grad_mode)


def image_batch(batch=4, image_size=8, channels=1, n_classes=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(batch, channels, image_size, image_size, generator=generator),
        "labels": torch.randint(0, n_classes, (batch,), generator=generator),
    }


# Each model with the batches it trains on, for tests that must hold for every architecture.
TINY_MODELS = {"gpt2": (tiny_gpt2, lm_batch), "bert": (tiny_bert, mlm_batch), "vit": (tiny_vit, image_batch)}


def small_lm_config(policy="cyclic", max_steps=6, model_keys=None, train_keys=None, policy_keys=None):
    """A GPT-2 run on pydoc that takes seconds on a CPU."""
    return Config(
        model=ModelConfig(n_layer=4, d_model=64, n_head=4, **(model_keys or {})),
        dataset=DatasetConfig(block_size=64),
        policy=PolicyConfig(name=policy, **{"n_sets": 2, **(policy_keys or {})}),
        hardware=HardwareConfig(name="cpu", device="cpu", precision="fp32"),
        train=TrainConfig(**{"max_steps": max_steps, "batch_size": 8, "warmup_steps": 2, "eval_interval": max_steps,
                             "eval_batches": 2, "log_interval": max_steps, **(train_keys or {})}),
        log=LogConfig(progress="lines"),
    )


def run_folder(cfg, folder):
    """Run ``cfg`` in-process into ``folder``, leaving the .hydra/config.yaml that the CLI's Hydra would write."""
    summary = run(cfg, folder)
    (folder / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), folder / ".hydra" / "config.yaml")
    return summary


@pytest.fixture(scope="session")
def cyclic_gpt2_run(tmp_path_factory, data_cache):
    """A finished GPT-2 run (tied embeddings, cyclic map over 2 layer sets) with its checkpoint."""
    folder = tmp_path_factory.mktemp("cyclic-gpt2-run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        run_folder(small_lm_config(), folder)
    return folder
