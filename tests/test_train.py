"""Training for real on pydoc: the loss falls, and the trainer's files agree with each other."""

import json
import math

import pytest

from tyingrun.config import Config, DatasetConfig, HardwareConfig, LogConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.run import run
from tyingrun.train.trainer import learning_rate


def small_config(policy="none", max_steps=60, **policy_keys):
    return Config(
        model=ModelConfig(n_layer=4, d_model=64, n_head=4),
        dataset=DatasetConfig(block_size=64),
        policy=PolicyConfig(name=policy, **policy_keys),
        hardware=HardwareConfig(name="cpu", device="cpu", precision="fp32"),
        train=TrainConfig(max_steps=max_steps, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=30,
                          eval_batches=8, log_interval=10),
        log=LogConfig(progress="lines"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "cycle_rev"])
def test_short_run_lowers_validation_loss(tmp_path, policy):
    summary = run(small_config(policy, n_sets=2), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [row["val_loss"] for row in rows if "val_loss" in row]
    assert val[0] > math.log(4096) - 0.5  # untrained: close to uniform over the vocabulary
    assert val[-1] < val[0] - 1.5
    assert summary["val_loss"] == val[-1]
    assert summary["val_ppl"] == pytest.approx(math.exp(val[-1]))
    train = [row["train_loss"] for row in rows if "train_loss" in row]
    assert train[-1] < train[0]


@pytest.mark.slow
def test_same_seed_same_losses(tmp_path):
    first = run(small_config(max_steps=6), tmp_path / "a")
    second = run(small_config(max_steps=6), tmp_path / "b")
    assert first["val_loss"] == second["val_loss"]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = small_config(max_steps=100)
    rates = [learning_rate(step, cfg) for step in range(100)]
    assert rates[0] == pytest.approx(3e-3 / 5)
    assert rates[4] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert learning_rate(100, cfg) == pytest.approx(3e-4)
