"""Data parallelism on CPU: two gloo ranks under torchrun, against one process with the same global batch."""

import json

import pytest

from .helpers import LAUNCHER, bad_input_line, parallel_run, read_jsonl

# dynamic_q deciding after every step: the ranks must agree on every map, and their losses on one process's.
DECIDING = ["policy=dynamic_q", "policy.steps_per_decision=1"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cli):
    return parallel_run(cli, tmp_path_factory.mktemp("ddp"), *DECIDING, ranks=2)


@pytest.mark.slow
def test_every_rank_holds_rank_zeros_map_after_every_decision(ddp_run):
    rank0 = [(row["step"], row["map"], row["trainable"]) for row in read_jsonl(ddp_run / "maps.jsonl")]
    rank1 = [(row["step"], row["map"], row["trainable"]) for row in read_jsonl(ddp_run / "ranks" / "rank1_maps.jsonl")]
    assert len(rank0) == 12 and rank1 == rank0  # the start, then a decision after each step but the last
    assert json.loads((ddp_run / "summary.json").read_text())["final_map"] == rank0[-1][1]


@pytest.mark.slow
def test_data_parallel_losses_match_one_process_with_the_same_global_batch(tmp_path, cli, ddp_run):
    single = read_jsonl(parallel_run(cli, tmp_path / "single", *DECIDING) / "metrics.jsonl")
    parallel = read_jsonl(ddp_run / "metrics.jsonl")
    assert [row["step"] for row in parallel] == [row["step"] for row in single]
    for key in ("train_loss", "val_loss"):
        ours = [row[key] for row in parallel if key in row]
        theirs = [row[key] for row in single if key in row]
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, abs=1e-5)
    ours, theirs = ([(row["step"], row["map"]) for row in read_jsonl(run / "maps.jsonl")]
                    for run in (ddp_run, tmp_path / "single"))
    assert ours == theirs


@pytest.mark.slow
def test_llama_data_parallel_losses_match_one_process(tmp_path, cli):
    single = read_jsonl(parallel_run(cli, tmp_path / "single", "model=llama") / "metrics.jsonl")
    parallel = read_jsonl(parallel_run(cli, tmp_path / "ddp", "model=llama", ranks=2) / "metrics.jsonl")
    for key in ("train_loss", "val_loss"):
        ours = [row[key] for row in parallel if key in row]
        theirs = [row[key] for row in single if key in row]
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, abs=1e-5)


def test_ddp_without_torchrun_is_one_clear_line(tmp_path):
    assert bad_input_line(["hardware=ddp"], tmp_path / "run") == (
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
