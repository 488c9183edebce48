"""Issue 26, findings 4 and 5: under tyingrun-launch, two gloo ranks keep the one-line promise and the exit status;
and a stop signal during start-up stops the run even when it lands in a finalizer."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = ("-m", "tyingrun.launch", "--nproc-per-node=2")
SMALL = ["hardware=ddp", "model.n_layer=2", "model.d_model=32", "dataset.block_size=32", "train.batch_size=4",
         "train.eval_batches=2", "log.progress=lines"]
# Trains until stopped; a row per step, so a test knows training is under way.
ENDLESS = [*SMALL, "train.max_steps=100000", "train.log_interval=1", "train.eval_interval=100000"]


def only_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def start(cli, run_dir, *overrides):
    return cli.popen(*ENDLESS, *overrides, f"hydra.run.dir={run_dir}", entry=LAUNCH, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)


def wait_for_steps(process, run_dir, steps, seconds=180):
    deadline = time.monotonic() + seconds
    while sum("train_loss" in row for row in rows(run_dir / "metrics.jsonl")) < steps:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def rank_pid(launcher, rank):
    """The pid of the rank that ``launcher`` started as ``rank`` (Linux /proc)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} under {launcher.pid}")


def stopped_line(run_dir):
    status = json.loads((run_dir / "status.json").read_text())
    resume = f"tyingrun-launch --nproc-per-node=2 train.resume={run_dir}"
    assert status["status"] == "stopped" and status["exit_code"] == 143 and status["resume"] == resume
    return resume


@pytest.mark.slow
def test_bad_input_under_two_ranks_is_one_line_and_exit_2(cli, tmp_path):
    result = cli(*SMALL, "train.batch_size=3", f"hydra.run.dir={tmp_path}", entry=LAUNCH)
    assert result.returncode == 2, result.stderr[-3000:]
    assert only_line(result.stderr) == ("tyingrun: error: train.batch_size=3 does not split evenly over 2 "
                                        "data-parallel ranks; make it a multiple of 2")


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_143_resumably(cli, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(cli, run_dir)
    wait_for_steps(launcher, run_dir, 3)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143
    line = only_line(stderr)
    resume = stopped_line(run_dir)
    assert line.startswith("tyingrun: stopped by SIGTERM after step ") and line.endswith(f"resume with: {resume}")
    step = int(line.split("after step ")[1].split(";")[0])
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    # The checkpoint resumes (here in one process: a checkpoint does not depend on the launch).
    cli(f"train.resume={run_dir}", "hardware=cpu", f"train.max_steps={step + 2}", expect=0)
    assert max(row["step"] for row in rows(run_dir / "metrics.jsonl")) == step + 2


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_the_same_way(cli, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(cli, run_dir)
    wait_for_steps(launcher, run_dir, 3)
    subprocess.run(["kill", "-TERM", str(rank_pid(launcher, 1))], check=True)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143
    assert only_line(stderr).endswith(f"checkpoint saved, resume with: {stopped_line(run_dir)}")


@pytest.mark.slow
def test_a_killed_rank_is_named_with_the_resume_command(cli, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(cli, run_dir, "train.checkpoint_interval=2")
    wait_for_steps(launcher, run_dir, 3)
    subprocess.run(["kill", "-KILL", str(rank_pid(launcher, 1))], check=True)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    line = only_line(stderr)
    assert line.startswith("tyingrun-launch: error: rank 1 died (killed by SIGKILL)"), line
    assert line.endswith(f"resume with: tyingrun-launch --nproc-per-node=2 train.resume={run_dir}"), line
    assert json.loads((run_dir / "status.json").read_text())["error"] in line


FINALIZER = """
import os, signal, sys, time
from tyingrun import cli
signal.signal(signal.SIGTERM, cli.stop_at_once)
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
Finalized()
time.sleep(1)
sys.exit(0)
"""


@pytest.mark.slow
def test_a_stop_signal_that_lands_in_a_finalizer_still_stops_the_run(cli):
    """The race behind test_sigterm_during_start_up_is_one_line_and_143's returncode 0: the signal's handler ran
    inside some object's ``__del__``, where a raised exception is printed and dropped, and the run went on."""
    result = cli(entry=("-c", FINALIZER))
    assert result.returncode == 143
    assert only_line(result.stderr) == "tyingrun: stopped by SIGTERM during start-up; nothing was saved yet"
