"""A real sweep with one failing job: the others finish, the sweep names the failure, the report matches."""

import csv
import json
from pathlib import Path

import pytest

from tyingrun.cli import report_main

from .helpers import call_main

TINY = [
    "model.d_model=32", "dataset.block_size=32", "train.batch_size=4", "train.max_steps=4", "train.eval_batches=2",
    "train.log_interval=2", "log.progress=lines",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cli):
    """policy=cycle_rev needs 2 * n_sets layers, so of these four jobs only n_layer=2, n_sets=2 fails (bad input)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = cli("-m", "policy=cycle_rev", "model.n_layer=2,4", "policy.n_sets=1,2", *TINY,
                 f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, result


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_sweep(sweep):
    sweep_dir, result = sweep
    finished = sorted(path.parent.name for path in sweep_dir.glob("*/summary.json"))
    assert finished == ["0", "2", "3"], result.stdout + result.stderr
    status = json.loads((sweep_dir / "1" / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 2
    assert "policy.n_sets=2 does not fit model.n_layer=2: 2 sets need at least 4 layers" in status["error"]
    assert not (sweep_dir / "1" / "summary.json").exists()
    assert json.loads((sweep_dir / "0" / "status.json").read_text()) == {"status": "completed"}


@pytest.mark.slow
def test_the_sweep_exits_non_zero_with_one_line_per_failed_job(sweep):
    sweep_dir, result = sweep
    error = json.loads((sweep_dir / "1" / "status.json").read_text())["error"]
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"tyingrun: failed job {sweep_dir / '1'}: {error}"]


@pytest.mark.slow
def test_report_numbers_equal_the_summaries(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    result = call_main(report_main, [str(sweep_dir), "--out", str(tmp_path)], capsys)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 3
    for row in rows:
        (run_dir,) = row["runs"].split(";")
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        assert int(row["seeds"]) == 1 and row["policy"] == "cycle_rev"
        for key in ("val_ppl", "trainable_params", "trainable_params_mean", "independent_layers", "trainable_layers",
                    "train_state_bytes", "peak_memory_bytes", "wall_time_s", "tokens_per_s"):
            assert float(row[key]) == pytest.approx(summary[key], rel=1e-12), key
        assert float(row["val_ppl_std"]) == 0.0
    assert {row["label"] for row in rows} == {"model.n_layer=2", "", "policy.n_sets=2"}
    report = (tmp_path / "report.md").read_text()
    assert "## Runs that did not finish" in report and "need at least 4 layers" in report
    figures = sorted(tmp_path.glob("*.png"))
    assert {"quality_vs_params.png", "memory.png"} <= {path.name for path in figures}
    assert len([path for path in figures if path.name.startswith("map_")]) == 3
    for path in figures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def test_report_of_nothing_is_one_line(tmp_path, capsys):
    result = call_main(report_main, [str(tmp_path)], capsys)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"tyingrun-report: error: no run folders (with .hydra/config.yaml) under {tmp_path}"]
