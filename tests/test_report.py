"""tyingrun.report on hand-made run folders: grouping by config minus seed, labels, means, stds and intervals."""

import csv
import os
import statistics

import pytest
from rich.console import Console

from tyingrun.report import write_report
from tyingrun.report.runs import find_runs, group_runs, labels
from tyingrun.sweep import failed_jobs

from .helpers import make_run, summary


@pytest.fixture()
def runs_dir(tmp_path):
    for seed, ppl in ((0, 100.0), (1, 110.0), (2, 120.0)):
        make_run(tmp_path / "paper" / str(seed), seed, summary(ppl, 1000 + seed))
    make_run(tmp_path / "neg_loss" / "0", 0, summary(90.0, 2000), reward="neg_loss")
    make_run(tmp_path / "k10" / "0", 0, summary(95.0, 3000), steps_per_decision=10)
    make_run(tmp_path / "broken" / "0", status={"status": "failed", "error": "bad thing", "exit_code": 2})
    make_run(tmp_path / "killed" / "0")
    return tmp_path


def test_runs_differing_only_in_seed_form_one_group(runs_dir):
    groups = group_runs(find_runs([runs_dir]))
    assert [len(group.runs) for group in groups] == [1, 1, 3]  # folders in order: k10, neg_loss, paper
    assert [group.label for group in groups] == ["policy.steps_per_decision=10", "policy.reward=neg_loss", ""]


def test_a_run_from_before_a_key_existed_groups_with_runs_at_its_default(tmp_path):
    # Seed 2 was written by a tyingrun that has policy.q_lr_decay_updates (default 0), seeds 0 and 1 before it.
    for seed in (0, 1):
        make_run(tmp_path / str(seed), seed, summary(100.0, 1000))
    make_run(tmp_path / "2", 2, summary(100.0, 1000), q_lr_decay_updates=0)
    make_run(tmp_path / "3", 3, summary(100.0, 1000), q_lr_decay_updates=20)
    groups = group_runs(find_runs([tmp_path]))
    assert [sorted(run.seed for run in group.runs) for group in groups] == [[0, 1, 2], [3]]
    assert [group.label for group in groups] == ["policy.q_lr_decay_updates=0", "policy.q_lr_decay_updates=20"]


def test_labels_name_every_value_on_a_tie():
    family = {"model.name": "gpt2", "dataset.name": "pydoc", "policy.name": "none"}
    assert labels([{**family, "model.n_layer": 8}, {**family, "model.n_layer": 3}]) == ["model.n_layer=8",
                                                                                       "model.n_layer=3"]
    assert labels([family, {**family, "policy.name": "cyclic"}]) == ["", ""]


def test_report_writes_means_and_stds_and_lists_unfinished_runs(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    write_report([runs_dir], out, Console(file=open(os.devnull, "w")))
    rows = {row["label"]: row for row in csv.DictReader((out / "report.csv").open())}
    paper = rows[""]
    assert int(paper["seeds"]) == 3
    assert float(paper["val_ppl"]) == pytest.approx(110.0)
    assert float(paper["val_ppl_std"]) == pytest.approx(statistics.stdev([100.0, 110.0, 120.0]))
    assert float(paper["trainable_params"]) == pytest.approx(1001.0)
    assert float(paper["trainable_params_mean"]) == pytest.approx(1501.5)
    assert float(rows["policy.reward=neg_loss"]["val_ppl"]) == 90.0
    report = (out / "report.md").read_text()
    # mean ± half-width of the 95% t-interval: t(0.975, 2) * 10 / sqrt(3) = 24.84 (the CSV keeps the std, 10).
    assert "110.00 ± 24.84" in report
    assert f"`{runs_dir / 'broken' / '0'}`: bad thing" in report
    assert f"`{runs_dir / 'killed' / '0'}`: no summary.json" in report
    assert len(list(out.glob("map_*.png"))) == 3


def test_failed_jobs_ignores_status_files_older_than_the_sweep(tmp_path):
    old = make_run(tmp_path / "7", status={"status": "failed", "error": "from an earlier sweep", "exit_code": 1})
    (tmp_path / "multirun.yaml").write_text("{}")
    make_run(tmp_path / "0", status={"status": "failed", "error": "now", "exit_code": 2})
    make_run(tmp_path / "1", status={"status": "completed"})
    stamp = (tmp_path / "multirun.yaml").stat().st_mtime
    os.utime(old / "status.json", (stamp - 60, stamp - 60))
    assert [(job.job_dir.name, job.error) for job in failed_jobs(tmp_path)] == [("0", "now")]
