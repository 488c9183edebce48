"""Training on the reasoning tasks: a tiny run learns p-hop clearly above chance; resume is bit-identical; every
policy, sweeps, DDP and FSDP run on them."""

import json
import signal
from collections import Counter

import pytest

from tyingrun.config import DatasetConfig
from tyingrun.data.reasoning import build_reasoning_data

from .helpers import TIMING_KEYS, TINY_RUN, parallel_run, read_jsonl, start_and_wait_for_checkpoint

PHOP = ["dataset=phop", "dataset.alphabet=4", "dataset.length=8", "dataset.hops=2", "dataset.val_size=400",
        "dataset.test_size=400"]


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_tiny_phop_run_is_clearly_above_chance(tmp_path, cli):
    run_dir = tmp_path / "run"
    result = cli(*PHOP, "model.n_layer=2", "model.d_model=64", "train.batch_size=32", "train.max_steps=300",
                 "train.eval_interval=1000", "train.checkpoint_interval=0", "log.progress=lines",
                 f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    summary = summary_of(run_dir)
    data = build_reasoning_data(DatasetConfig(name="phop", alphabet=4, length=8, hops=2, val_size=400, test_size=400),
                                seed=0)
    answers = Counter(data.rows(data.test.prompts, data.test.answers)[i][1] for i in range(len(data.test)))
    chance = max(answers.values()) / len(data.test)  # always answering the most frequent answer
    assert chance < 0.4
    assert summary["test_acc"] > chance + 0.2
    assert summary["test_samples"] == 400 and summary["test_acc_by_difficulty"] == {"2": summary["test_acc"]}
    assert 0 < summary["test_token_acc"] == summary["test_acc"]  # one answer token: the two agree


@pytest.mark.slow
def test_resume_on_phop_reproduces_the_uninterrupted_run(tmp_path, cli):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    schedule = [*TINY_RUN, *PHOP[:2], "dataset.val_size=200", "dataset.test_size=200", "train.max_steps=120",
                "train.checkpoint_interval=20", "train.log_interval=5", "train.eval_interval=20",
                "train.eval_batches=2"]
    assert cli(*schedule, f"hydra.run.dir={whole}").returncode == 0
    process = start_and_wait_for_checkpoint(cli, killed, *schedule)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = cli(f"train.resume={killed}")
    assert resumed.returncode == 0, resumed.stderr
    assert (read_jsonl(killed / "metrics.jsonl", drop=TIMING_KEYS)
            == read_jsonl(whole / "metrics.jsonl", drop=TIMING_KEYS))
    summaries = [summary_of(folder) for folder in (whole, killed)]
    for summary in summaries:
        for key in ("wall_time_s", "peak_memory_bytes", "samples_per_s"):
            summary.pop(key)
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_every_tying_policy_runs_on_a_reasoning_task_in_one_sweep(tmp_path, cli):
    result = cli("-m", "dataset=phop", "dataset.val_size=64", "dataset.test_size=64", "model.n_layer=4",
                 "model.d_model=32", "train.batch_size=8", "train.max_steps=6", "train.eval_interval=1000",
                 "log.progress=lines", "policy=none,sequential,cyclic,cycle_rev,middle_cycle,dynamic_q,random,bandit",
                 f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    summaries = [summary_of(tmp_path / str(job)) for job in range(8)]
    assert [s["policy"] for s in summaries] == ["none", "sequential", "cyclic", "cycle_rev", "middle_cycle",
                                                "dynamic_q", "random", "bandit"]
    assert all(0 <= s["test_acc"] <= 1 and s["test_samples"] == 64 for s in summaries)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_reasoning_scores_match_one_process(tmp_path, cli, parallel):
    task = [*PHOP[:2], "dataset.val_size=100", "dataset.test_size=101", "dataset.test_hops=[2,3]", "policy=cyclic"]
    single = parallel_run(cli, tmp_path / "single", *task)
    sharded = parallel_run(cli, tmp_path / parallel, *task, ranks=2, parallel=parallel)
    ours, theirs = summary_of(sharded), summary_of(single)
    # Each rank draws the same global batch and trains on its half; the evaluation counts each instance once.
    assert ours["test_samples"] == theirs["test_samples"] == 101
    for key in ("val_loss", "test_loss", "test_acc", "test_token_acc"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4)
    assert ours["test_acc_by_difficulty"] == pytest.approx(theirs["test_acc_by_difficulty"], abs=1e-4)
