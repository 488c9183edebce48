"""Data parallelism on CPU: two gloo ranks under torchrun, against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "model.n_layer=4", "model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "train.eval_batches=4",
    "train.max_steps=12", "train.log_interval=1", "train.eval_interval=6", "log.progress=lines",
]


def run(run_dir, *overrides, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    prefix = [sys.executable, *launcher] if ranks > 1 else [sys.executable]
    hardware = "hardware=ddp" if ranks > 1 else "hardware=cpu"
    command = [*prefix, "-m", "tyingrun.cli", *TINY, hardware, *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_rank_holds_rank_zeros_map_after_every_decision(tmp_path):
    run_dir = run(tmp_path / "ddp", "policy=dynamic_q", "policy.steps_per_decision=1", ranks=2)
    rank0 = [(row["step"], row["map"], row["trainable"]) for row in rows(run_dir / "maps.jsonl")]
    rank1 = [(row["step"], row["map"], row["trainable"]) for row in rows(run_dir / "ranks" / "rank1_maps.jsonl")]
    assert len(rank0) == 13 and rank1 == rank0
    assert json.loads((run_dir / "summary.json").read_text())["final_map"] == rank0[-1][1]


@pytest.mark.slow
def test_data_parallel_losses_match_one_process_with_the_same_global_batch(tmp_path):
    single = rows(run(tmp_path / "single") / "metrics.jsonl")
    parallel = rows(run(tmp_path / "ddp", ranks=2) / "metrics.jsonl")
    assert [row["step"] for row in parallel] == [row["step"] for row in single]
    for key in ("train_loss", "val_loss"):
        ours = [row[key] for row in parallel if key in row]
        theirs = [row[key] for row in single if key in row]
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, abs=1e-5)


def test_ddp_without_torchrun_is_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "tyingrun.cli", "hardware=ddp", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tyingrun: error: hardware=ddp needs several processes: torchrun --nproc_per_node=N -m tyingrun.cli "
        "hardware=ddp ... (or use hardware=auto for one process)"
    )
