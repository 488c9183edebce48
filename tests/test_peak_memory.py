"""peak_tensor_bytes in summary.json: tying lowers it, its split adds up, a map is measured once, resume keeps it."""

import csv
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from tyingrun.config import PolicyConfig
from tyingrun.metrics import memory as memory_module
from tyingrun.metrics.tensor_memory import TensorMemoryTracker
from tyingrun.report import write_report
from tyingrun.run import run
from tyingrun.train.checkpoint import latest_checkpoint, list_checkpoints, read_state

from .helpers import make_run, run_folder, small_lm_config
from .helpers import summary as report_summary

MIB = 2**20

PEAK_KEYS = ("peak_tensor_bytes", "peak_state_bytes", "peak_other_bytes")
# What differs between two runs of the same steps: time, and the process's RSS on CPU.
UNREPEATABLE_KEYS = ("wall_time_s", "tokens_per_s", "peak_memory_bytes")


@pytest.fixture
def measurements(monkeypatch):
    """The number of steps the trainer measures, counted as they happen."""
    counted = {"steps": 0}

    class CountingTracker(TensorMemoryTracker):
        def __enter__(self):
            counted["steps"] += 1
            return super().__enter__()

    monkeypatch.setattr(memory_module, "TensorMemoryTracker", CountingTracker)
    return counted


def lm_config(policy, max_steps, policy_keys=None, **train_keys):
    """GPT-2 4x64 on pydoc under ``policy`` with only the policy keys given here."""
    cfg = small_lm_config(max_steps=max_steps, train_keys=train_keys)
    return replace(cfg, policy=PolicyConfig(name=policy, **(policy_keys or {})))


DYNAMIC_Q_EVERY_STEP = {"steps_per_decision": 1}


def measured_maps(run_dir):
    _, state = read_state(latest_checkpoint(run_dir))
    return state["measured_maps"]


def tying_per_step(run_dir, steps):
    """The (map, effective trainable flags) each optimizer step 1..steps trained under, from maps.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "maps.jsonl").read_text().splitlines()]
    # A row of step s applies from optimizer step s + 1 on.
    return [next([row["map"], row["trainable"]] for row in reversed(rows) if row["step"] < step)
            for step in range(1, steps + 1)]


def expected_measurements(tyings):
    """Steps measured and maps measured completely: a step is measured until its map has a complete measurement;
    one is complete unless a slot became trainable since the previous step (its optimizer state is made then)."""
    complete, measured_steps, previous = [], 0, None
    for tying in tyings:
        trainable = tying[1]
        became_trainable = previous and any(now > before for now, before in zip(trainable, previous, strict=True))
        made_state = previous is None or became_trainable
        previous = trainable
        if tying in complete:
            continue
        measured_steps += 1
        if not made_state:
            complete.append(tying)
    return measured_steps, sorted(complete)


@pytest.mark.slow
def test_tying_lowers_the_peak_and_the_split_adds_up(tmp_path):
    summaries = {
        policy: run_folder(lm_config(policy, 2, keys), tmp_path / policy)
        for policy, keys in (("none", None), ("cyclic", {"n_sets": 1}))
    }
    assert summaries["cyclic"]["peak_tensor_bytes"] < summaries["none"]["peak_tensor_bytes"]
    for summary in summaries.values():
        assert summary["peak_tensor_bytes"] >= summary["train_state_bytes"]
        assert summary["peak_state_bytes"] + summary["peak_other_bytes"] == summary["peak_tensor_bytes"]
        assert summary["peak_state_bytes"] > 0 and summary["peak_other_bytes"] > 0
    # Tying removes weights, gradients and optimizer state only: the activations of every slot remain.
    assert summaries["cyclic"]["peak_other_bytes"] == summaries["none"]["peak_other_bytes"]


@pytest.mark.slow
def test_gradients_count_as_state_though_zero_grad_frees_them_inside_the_step(tmp_path):
    # Wide layers and one sequence per batch put the peak in AdamW's step, where weights, gradients and both
    # moments are all live: the state at the peak is the whole train state.
    cfg = lm_config("none", 2, batch_size=1)
    summary = run_folder(replace(cfg, model=replace(cfg.model, d_model=128)), tmp_path)
    assert summary["peak_state_bytes"] == summary["train_state_bytes"]
    assert summary["peak_other_bytes"] > 0


@pytest.mark.compile
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_run_still_compiles_and_measures_what_an_eager_run_does(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_cfg = lm_config("none", 3)
    compiled_cfg = replace(eager_cfg, hardware=replace(eager_cfg.hardware, compile=True))
    compiled = run_folder(compiled_cfg, tmp_path / "compiled")
    # The measured steps run eagerly; torch.compile, entered first under the tracker, would never compile at all.
    assert compiled["compile_graphs"] == {"block:PreLNBlock": 1, "loss": 3}
    assert counters["stats"]["unique_graphs"] == 4
    eager = run_folder(eager_cfg, tmp_path / "eager")
    assert {key: compiled[key] for key in PEAK_KEYS} == {key: eager[key] for key in PEAK_KEYS}


@pytest.mark.slow
def test_a_new_map_is_measured_and_a_revisited_one_is_not(tmp_path, measurements):
    steps = 12
    run_folder(lm_config("dynamic_q", steps, DYNAMIC_Q_EVERY_STEP), tmp_path)
    tyings = tying_per_step(tmp_path, steps)
    expected_steps, complete = expected_measurements(tyings)
    assert len(complete) > 1  # measured again after a change to a new map
    assert expected_steps < steps  # some map was revisited after its complete measurement
    assert measurements["steps"] == expected_steps
    assert measured_maps(tmp_path) == complete


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "dynamic_q"])
def test_resume_keeps_the_peak_and_the_measured_maps(tmp_path, policy):
    keys = DYNAMIC_Q_EVERY_STEP if policy == "dynamic_q" else None
    cfg = lm_config(policy, 12, keys, checkpoint_interval=4, keep_checkpoints=3)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = run_folder(cfg, whole)
    shutil.copytree(whole, killed)
    for checkpoint in list_checkpoints(killed)[1:]:  # as if killed after the step-4 checkpoint
        shutil.rmtree(checkpoint)
    resumed = run(replace(cfg, train=replace(cfg.train, resume=str(killed))), killed)
    for summary in (uninterrupted, resumed):
        for key in UNREPEATABLE_KEYS:
            summary.pop(key)
    assert all(uninterrupted[key] > 0 for key in PEAK_KEYS)
    assert resumed == uninterrupted
    assert measured_maps(killed) == measured_maps(whole)


def test_report_averages_the_peak_and_still_reports_runs_without_it(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, peak in ((0, 40 * MIB), (1, 42 * MIB)):
        peaks = {"peak_tensor_bytes": peak, "peak_state_bytes": 6 * MIB, "peak_other_bytes": peak - 6 * MIB}
        make_run(runs / "measured" / str(seed), seed, {**report_summary(100.0, 1000), **peaks})
    make_run(runs / "older" / "0", 0, report_summary(95.0, 3000), steps_per_decision=10)
    out.mkdir()
    write_report([runs], out, Console(file=open(os.devnull, "w")))
    older, measured = sorted(csv.DictReader((out / "report.csv").open()), key=lambda row: row["seeds"])
    assert float(measured["peak_tensor_bytes"]) == 41 * MIB
    assert (float(measured["peak_state_bytes"]), float(measured["peak_other_bytes"])) == (6 * MIB, 35 * MIB)
    assert older["peak_tensor_bytes"] == "" and older["train_state_bytes"] != ""
    assert "| 41 MiB (6 MiB + 35 MiB) |" in (out / "report.md").read_text()
    assert (out / "memory.png").stat().st_size > 0
