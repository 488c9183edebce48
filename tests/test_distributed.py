"""Data parallelism on CPU: two gloo ranks under torchrun, against one process with the same global batch."""

import json

import pytest

TINY = [
    "model.n_layer=4", "model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "train.eval_batches=4",
    "train.max_steps=12", "train.log_interval=1", "train.eval_interval=6", "log.progress=lines",
]


LAUNCHER = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node")


def run(cli, run_dir, *overrides, ranks=1, parallel="ddp"):
    """A TINY run on the CPU: one process, or ``ranks`` gloo ranks under hardware=``parallel`` (ddp or fsdp). Each
    process computes on one thread, as torchrun sets it for its ranks: a run's time does not depend on what else
    keeps the cores busy (a spinning second thread of one process is slow on a busy machine)."""
    launcher = (*LAUNCHER, str(ranks)) if ranks > 1 else ()
    hardware = f"hardware={parallel}" if ranks > 1 else "hardware=cpu"
    cli(*TINY, hardware, *overrides, f"hydra.run.dir={run_dir}", entry=(*launcher, "-m", "tyingrun.cli"), expect=0,
        env={"OMP_NUM_THREADS": "1"})
    return run_dir


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_rank_holds_rank_zeros_map_after_every_decision(tmp_path, cli):
    run_dir = run(cli, tmp_path / "ddp", "policy=dynamic_q", "policy.steps_per_decision=1", ranks=2)
    rank0 = [(row["step"], row["map"], row["trainable"]) for row in rows(run_dir / "maps.jsonl")]
    rank1 = [(row["step"], row["map"], row["trainable"]) for row in rows(run_dir / "ranks" / "rank1_maps.jsonl")]
    assert len(rank0) == 12 and rank1 == rank0  # the start, then a decision after each step but the last
    assert json.loads((run_dir / "summary.json").read_text())["final_map"] == rank0[-1][1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_data_parallel_losses_match_one_process_with_the_same_global_batch(tmp_path, cli, model):
    single = rows(run(cli, tmp_path / "single", f"model={model}") / "metrics.jsonl")
    parallel = rows(run(cli, tmp_path / "ddp", f"model={model}", ranks=2) / "metrics.jsonl")
    assert [row["step"] for row in parallel] == [row["step"] for row in single]
    for key in ("train_loss", "val_loss"):
        ours = [row[key] for row in parallel if key in row]
        theirs = [row[key] for row in single if key in row]
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, abs=1e-5)


@pytest.mark.slow
def test_ddp_without_torchrun_is_one_clear_line(tmp_path, cli):
    result = cli("hardware=ddp", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tyingrun: error: hardware=ddp needs several processes: torchrun --nproc_per_node=N -m tyingrun.cli "
        "hardware=ddp ... (or use hardware=auto for one process)"
    )


@pytest.mark.slow
def test_batch_that_does_not_split_over_the_ranks_is_refused_before_any_data(tmp_path, cli):
    launcher = (*LAUNCHER, "2", "-m", "tyingrun.cli")
    result = cli("hardware=ddp", "train.batch_size=7", "dataset=text_files", "dataset.files=[/no/such.txt]",
                 f"hydra.run.dir={tmp_path}", entry=launcher)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("tyingrun: error: ")]
    assert lines and all(line == lines[0] for line in lines)
    assert "train.batch_size=7 does not split evenly over 2 data-parallel ranks" in lines[0]
