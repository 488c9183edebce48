"""Exact resume after SIGKILL, clean stops on SIGTERM, and one clear line for every bad checkpoint."""

import json
import signal
import subprocess

import pytest

from .helpers import TIMING_KEYS, TINY_RUN, bad_input_line, compose_and_run, read_jsonl, start_and_wait_for_checkpoint

TINY = [*TINY_RUN, "train.eval_batches=2", "train.max_steps=120", "train.checkpoint_interval=20",
        "train.log_interval=5", "train.eval_interval=20"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", [["policy=none"], ["policy=dynamic_q"],
                                    ["policy=dynamic_q", "policy.grad=shared", "train.tied_lr=linear"]],
                         ids=["none", "dynamic_q", "dynamic_q-tied_lr"])
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, cli, policy):
    # 60 steps: killed soon after the checkpoint at 20 (40 steps to spare), resumed from it to the end. Under
    # train.tied_lr the optimizer's groups follow the changing map, and the resume must find them as saved.
    schedule = [*policy, "train.max_steps=60"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    compose_and_run([*TINY, *schedule], whole)  # in-process: the CLI's config, one run without a stop

    process = start_and_wait_for_checkpoint(cli, killed, *TINY, *schedule)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists()

    resumed = cli(f"train.resume={killed}")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("metrics.jsonl", "maps.jsonl"):
        assert read_jsonl(killed / name, drop=TIMING_KEYS) == read_jsonl(whole / name, drop=TIMING_KEYS)
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (whole, killed)]
    for summary in summaries:
        for key in ("wall_time_s", "peak_memory_bytes", *TIMING_KEYS):
            summary.pop(key, None)
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143_then_resumes_to_completion(tmp_path, cli):
    run_dir = tmp_path / "run"
    process = start_and_wait_for_checkpoint(cli, run_dir, *TINY, "policy=cyclic")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1].endswith(f"resume with: tyingrun train.resume={run_dir}")
    assert not (run_dir / "summary.json").exists()
    stopped_at = max(int(path.name.removeprefix("step_")) for path in (run_dir / "checkpoints").glob("step_*"))
    assert 20 <= stopped_at < 120

    resumed = cli(f"train.resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["final_map"] == [0, 1, 0, 1]
    evaluated = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in row]
    assert evaluated == list(range(0, 121, 20))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("finished")
    result = cli(*TINY, "train.max_steps=20", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def damage(run_dir, how):
    (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
    weights = checkpoint / "model.safetensors"
    if how == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "corrupt":
        weights.write_bytes(b"\x00garbage" * 100)
    elif how == "delete":
        weights.unlink()
    elif how == "corrupt state":
        (checkpoint / "state.json").write_text("{not json")


@pytest.mark.parametrize("how, expected", [
    ("truncate", "is truncated or corrupt"),
    ("corrupt", "is truncated or corrupt"),
    ("delete", "is missing"),
    ("corrupt state", "state.json is corrupt"),
])
@pytest.mark.slow
def test_damaged_checkpoint_is_one_clear_line(tmp_path, cli, finished_run, how, expected):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    damage(run_dir, how)
    result = cli(f"train.resume={run_dir}", "train.max_steps=30")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    # A failed resume leaves the folder as it was: the completed run keeps its summary (issue 14, finding 4).
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_checkpoint_of_another_model_shape(tmp_path, cli, finished_run):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    result = cli(f"train.resume={run_dir}", "model.d_model=32", "train.max_steps=30")
    assert result.returncode == 2
    # A resume cannot change the model: refused before the checkpoint is read, naming the key and the run's value.
    assert "model.d_model cannot change (the run has model.d_model=64)" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    assert "is not a tyingrun run folder" in bad_input_line([f"train.resume={tmp_path}"], tmp_path)


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_status_failed(tmp_path, cli):
    result = cli(*TINY, "train.lr=1e30", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "at step" in lines[0] and "nan" in lines[0], result.stderr
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "summary.json").exists()
