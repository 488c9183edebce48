"""The training step never waits for the device: the loss stays there and is read once per log interval (and at
checkpoints), and a non-finite loss still stops the run naming its step, with no checkpoint after it."""

import math

import pytest
import torch

from tyingrun.models.gpt2 import GPT2
from tyingrun.run import run
from tyingrun.train.trainer import NonFiniteLoss

from .helpers import count_host_reads, small_lm_config

STEPS, LOG_INTERVAL = 40, 10


def test_the_loop_reads_the_loss_once_per_log_interval(tmp_path, monkeypatch):
    cfg = small_lm_config("none", STEPS, train_keys={"log_interval": LOG_INTERVAL, "checkpoint_interval": 0})
    reads = count_host_reads(monkeypatch)
    summary = run(cfg, tmp_path)
    assert reads["training"] <= STEPS // LOG_INTERVAL
    assert reads["evaluation"] > 0 and math.isfinite(summary["val_loss"])
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
    assert len(rows) == STEPS // LOG_INTERVAL


def poison_step(monkeypatch, bad_step):
    """The training loss (and so every gradient) becomes NaN at optimizer step ``bad_step`` (counted from 0)."""
    loss = GPT2.loss
    steps = []

    def poisoned(self, batch):
        result = loss(self, batch)
        if not (self.training and torch.is_grad_enabled()):
            return result
        steps.append(len(steps))
        return result._replace(loss=result.loss * math.nan) if steps[-1] >= bad_step else result

    monkeypatch.setattr(GPT2, "loss", poisoned)


# Checkpoints every 10 steps: the one at 10 is written; every 15: the one at 15, after the NaN, is not.
@pytest.mark.parametrize("checkpoint_interval, written", [(LOG_INTERVAL, [LOG_INTERVAL]), (15, [])])
def test_a_nan_between_log_points_stops_the_run_naming_its_step_and_checkpoints_nothing_after(
        tmp_path, monkeypatch, checkpoint_interval, written):
    poison_step(monkeypatch, 13)
    cfg = small_lm_config("none", STEPS, train_keys={"log_interval": LOG_INTERVAL,
                                                     "checkpoint_interval": checkpoint_interval})
    with pytest.raises(NonFiniteLoss, match="nan at step 13$"):
        run(cfg, tmp_path)
    saved = sorted(int(path.name.split("_")[1]) for path in (tmp_path / "checkpoints").glob("step_*"))
    assert saved == written
