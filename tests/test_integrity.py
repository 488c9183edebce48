"""Issue 14: a run folder is never mislabelled, mixed, poisoned or lost; every failure is one line, no traceback."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tyingrun import export
from tyingrun.cli import report_main
from tyingrun.files import lock_folder

from .helpers import TINY_RUN, assert_one_line, bad_input_line, call_main, compose_and_run

TINY = [*TINY_RUN, "train.eval_batches=2", "train.log_interval=5", "train.eval_interval=10",
        "train.checkpoint_interval=10", "hardware=cpu"]


def one_line(result, code, *words, program="tyingrun"):
    """One error line (warnings aside) naming every one of ``words``, exit ``code``, no traceback."""
    return assert_one_line(result, code, *words, program=program, ignore_warnings=True)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".tyingrun.lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cli):
    """A finished policy=none run of 20 steps, lr 0.002, checkpoints at 10 and 20, in a folder with a space."""
    run_dir = tmp_path_factory.mktemp("runs") / "sp ace"
    cli(*TINY, "train.max_steps=20", "train.lr=0.002", "policy=none", f"hydra.run.dir={run_dir}", expect=0)
    return run_dir


@pytest.fixture
def run_copy(tmp_path, finished):
    target = tmp_path / "sp ace"
    shutil.copytree(finished, target)
    return target


# 1, 4: a resume that would change what the run is, is refused, and the folder stays exactly as it was.
@pytest.mark.slow
def test_resume_refuses_a_policy_change_and_leaves_the_folder_untouched(cli, run_copy):
    before = snapshot(run_copy)
    one_line(cli(f"train.resume={run_copy}", "policy=cyclic", "policy.n_sets=2"), 2, "policy", "policy=none")
    assert snapshot(run_copy) == before
    one_line(cli(f"train.resume='{run_copy}'", "train.seed=3"), 2, "train.seed", "train.seed=0")
    assert snapshot(run_copy) == before


# 2: a quoted path is the same run as an unquoted one: its own overrides are kept.
@pytest.mark.slow
def test_quoted_resume_path_keeps_the_runs_own_overrides(cli, run_copy):
    cli(f"train.resume='{run_copy}'", "train.max_steps=30", expect=0)
    config = (run_copy / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.002" in config and "max_steps: 30" in config
    summary = json.loads((run_copy / "summary.json").read_text())
    assert summary["policy"] == "none" and summary["steps"] == 30 and summary["final_map"] == [0, 1, 2, 3]
    assert [p.name for p in run_copy.parent.iterdir()] == ["sp ace"]


# 3: a new run refuses a folder holding another run; train.overwrite=true clears it first.
@pytest.mark.slow
def test_new_run_in_a_finished_runs_folder_is_refused_unless_overwrite(cli, run_copy):
    before = snapshot(run_copy)
    one_line(cli(*TINY, "train.max_steps=10", f"hydra.run.dir={run_copy}"), 2, "already holds", "train.overwrite=true")
    assert snapshot(run_copy) == before
    one_line(cli(*TINY, "train.max_steps=10", "train.lr=nan", f"hydra.run.dir={run_copy}"), 2, "train.lr")
    assert snapshot(run_copy) == before
    cli(*TINY, "train.max_steps=10", "train.overwrite=true", f"hydra.run.dir={run_copy}", expect=0)
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step_00000010"]
    assert max(json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").open()) == 10


# 4: a failed resume of a completed run keeps its summary and its saved overrides.
@pytest.mark.slow
def test_failed_resume_keeps_summary_and_overrides(cli, run_copy):
    before = snapshot(run_copy)
    (run_copy / "maps.jsonl").write_text("{\"step\": 0}\nnot json\n")
    before = snapshot(run_copy)
    one_line(cli(f"train.resume={run_copy}", "train.max_steps=30"), 2, "maps.jsonl")
    assert snapshot(run_copy) == before


# 5: checkpoints are chosen by the step they record; strays are left alone and named.
@pytest.mark.slow
def test_stray_checkpoint_folders_are_ignored_and_kept(cli, run_copy):
    checkpoints = run_copy / "checkpoints"
    shutil.copytree(checkpoints / "step_00000010", checkpoints / "step_99")
    shutil.copytree(checkpoints / "step_00000020", checkpoints / "step_00000020.bak")
    result = cli(f"train.resume={run_copy}", "train.max_steps=30", expect=0)
    assert "step_99" in result.stderr and "step_00000020.bak" in result.stderr and "Traceback" not in result.stderr
    assert (checkpoints / "step_99").is_dir() and (checkpoints / "step_00000020.bak").is_dir()
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_000000")) == [
        "step_00000020", "step_00000020.bak", "step_00000030"]
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").open()]
    assert steps == sorted(steps) and steps[-1] == 30


# 6: a folder in use by a running process is refused, naming the holder.
@pytest.mark.slow
def test_a_second_process_on_a_held_folder_exits_2_naming_the_holder(cli, run_copy):
    fd = lock_folder(run_copy)
    try:
        before = snapshot(run_copy)
        one_line(cli(f"train.resume={run_copy}", "train.max_steps=30"), 2, f"pid {os.getpid()}")
        assert snapshot(run_copy) == before
    finally:
        os.close(fd)


# 7: no checkpoint is ever written from non-finite weights.
@pytest.mark.slow
def test_no_checkpoint_holds_non_finite_weights(cli, tmp_path):
    import torch
    from safetensors.torch import load_file

    result = cli(*TINY, "train.max_steps=200", "train.lr=1e6", "train.checkpoint_interval=1", "train.warmup_steps=0",
                 f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for checkpoint in (tmp_path / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


# 8: every number is checked before work starts, naming its legal range.
@pytest.mark.parametrize("override", [
    "train.min_lr_ratio=-3", "train.weight_decay=-1", "dataset.max_documents=-1", "train.lr=-1", "train.lr=nan",
    "train.beta1=1.5", "train.seed=-1", "train.seed=9223372036854775808", "train.keep_checkpoints=0",
    "train.eval_batches=0", "model.dropout=1.5", "train.grad_clip=inf",
])
def test_nonsense_numbers_are_refused_with_their_range(tmp_path, override):
    key = override.split("=")[0]
    assert key in bad_input_line([*TINY, override], tmp_path / "run")


def test_nan_reward_weight_is_refused(tmp_path):
    line = bad_input_line([*TINY, "policy=dynamic_q", "policy.reward=param_penalty", "policy.param_penalty_weight=nan"],
                          tmp_path / "run")
    assert "policy.param_penalty_weight" in line


# 9: a FIFO among dataset.files never hangs the run.
@pytest.mark.slow
def test_fifo_in_a_files_folder_is_skipped(cli, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"doc{i}.txt").write_text(f"word{i} other words here.\n\n" * 300)
    os.mkfifo(texts / "a.txt")
    result = cli(*TINY, "dataset=text_files", f"dataset.files=[{texts}]", "dataset.vocab_size=300",
                 "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert "a.txt" in result.stderr and "Traceback" not in result.stderr
    one_line(cli(*TINY, "dataset=text_files", f"dataset.files=[{texts / 'a.txt'}]", f"hydra.run.dir={tmp_path / 'r2'}",
                 timeout=120), 2, "not a regular file")


# Tracebacks: signals.
def wait_for(predicate, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_during_start_up_is_one_line_and_143(cli, tmp_path):
    process = cli.popen(*TINY, "train.max_steps=50", f"hydra.run.dir={tmp_path}", stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    wait_for(lambda: (tmp_path / ".hydra" / "config.yaml").exists(), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("tyingrun: stopped by SIGTERM")


@pytest.mark.slow
def test_second_sigterm_exits_143_without_traceback(cli, tmp_path):
    process = cli.popen(*TINY, "train.max_steps=100000", "train.checkpoint_interval=5", f"hydra.run.dir={tmp_path}",
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_sigterm_in_a_sweep_names_the_jobs_it_leaves_unstarted(cli, tmp_path):
    sweep = tmp_path / "sweep"
    process = cli.popen("-m", *TINY, "train.max_steps=100000", "train.checkpoint_interval=5", "train.seed=0,1,2",
                        f"hydra.sweep.dir={sweep}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (sweep / "0" / "metrics.jsonl").exists(), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    assert lines[-2].startswith("tyingrun: stopped by SIGTERM") and "train.resume=" in lines[-2]
    assert lines[-1].startswith(f"tyingrun: the sweep into {sweep} stopped in job 1 of 3; jobs 2 to 3 were not "
                                "started"), lines[-1]
    assert not (sweep / "1").exists()


# Tracebacks: run folders that cannot be one.
@pytest.mark.slow
def test_read_only_run_dir_is_one_line(cli, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes through file modes; sysfs refuses new folders to root too.
    target = read_only / "run" if os.geteuid() != 0 else "/sys/tyingrun-run"
    one_line(cli(*TINY, f"hydra.run.dir={target}"), 2, "hydra.run.dir", "writable")


def test_self_referencing_interpolation_is_one_line_naming_the_key(tmp_path):
    assert "train.lr" in bad_input_line([*TINY, "train.lr=${train.lr}"], tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_run_dir_that_is_a_file_or_too_long_is_one_line(cli, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    one_line(cli(*TINY, f"hydra.run.dir={afile}"), 2, "hydra.run.dir")
    one_line(cli(*TINY, f"hydra.run.dir={tmp_path / ('x' * 300)}"), 2, "hydra.run.dir")
    one_line(cli(f"train.resume={tmp_path / ('y' * 300)}"), 2, "train.resume")


def test_missing_env_interpolation_names_the_key(tmp_path):
    assert "train.lr" in bad_input_line([*TINY, "train.lr=${oc.env:TYINGRUN_NO_SUCH_VARIABLE}"], tmp_path / "run")


# Tracebacks: report and export.
@pytest.mark.slow
def test_report_lists_a_damaged_run_and_goes_on(capsys, tmp_path, finished):
    good, bad = tmp_path / "runs" / "good", tmp_path / "runs" / "bad"
    shutil.copytree(finished, good)
    shutil.copytree(finished, bad)
    (bad / "summary.json").write_text('{"val_loss": 1e308, "policy": "none"}')
    result = call_main(report_main, [str(tmp_path / "runs")], capsys)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "damaged" in result.stdout and (tmp_path / "runs" / "report.md").is_file()
    out = tmp_path / "afile"
    out.write_text("x")
    one_line(call_main(report_main, [str(tmp_path / "runs"), "--out", str(out)], capsys), 2, "tyingrun-report",
             program="tyingrun-report")


@pytest.mark.slow
def test_export_to_a_file_or_from_a_damaged_state_is_one_line(capsys, tmp_path, finished):
    out = tmp_path / "afile"
    out.write_text("x")
    one_line(call_main(export.main, [str(finished), str(out)], capsys), 2, "tyingrun-export", program="tyingrun-export")
    damaged = tmp_path / "damaged"
    shutil.copytree(finished, damaged)
    for state in (damaged / "checkpoints").glob("step_*/state.json"):
        state.write_text('{"format": 1, "step": "x"}')
    one_line(call_main(export.main, [str(damaged), str(tmp_path / "out")], capsys), 2, "tyingrun-export",
             program="tyingrun-export")


# A damaged data cache is detected by its content hash and rebuilt.
@pytest.mark.slow
def test_damaged_caches_are_rebuilt_to_the_same_run(cli, tmp_path, data_cache, capsys, monkeypatch):
    """A cut-short corpus, and token ids with one flipped byte (which load without error and would train on other
    tokens): the content hashes catch both, both are built again, and the run is the one an intact cache gives."""
    def damage_warnings(stderr):
        return [line for line in stderr.splitlines() if "damaged (its content hash differs)" in line]

    cache = tmp_path / "cache"
    # The run's shared cache, without the temporary files of writes still under way in other test processes.
    shutil.copytree(data_cache, cache, ignore=shutil.ignore_patterns("*.tmp", "*.lock"))
    monkeypatch.setenv("TYINGRUN_CACHE", str(cache))
    capsys.readouterr()
    compose_and_run([*TINY, "train.max_steps=2"], tmp_path / "intact")  # in-process; caches the corpus and ids
    stderr = capsys.readouterr().err
    assert damage_warnings(stderr) == [], stderr[-2000:]
    for corpus in (cache / "corpora").glob("pydoc-*.json"):
        corpus.write_text("[[\"a\"")
    # Every train split's ids (the shared cache also holds those of other tokenizers): the run reads one.
    for tokens in (cache / "tokens").glob("pydoc-train-*.npy"):
        data = bytearray(tokens.read_bytes())
        data[-5] ^= 0x01
        tokens.write_bytes(bytes(data))
    result = cli(*TINY, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'damaged'}",
                 env={"TYINGRUN_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(damage_warnings(result.stderr)) == 2, result.stderr[-2000:]
    runs = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("intact", "damaged")}
    assert runs["damaged"]["test_loss"] == runs["intact"]["test_loss"]
