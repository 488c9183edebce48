"""Issue 26: a source is checked by identity, a crash leaves a run that resumes, checkpoints carry hashes, and the
tools refuse what they cannot do with one line (findings 3, 6-14)."""

import json
import re
import shutil

import pytest
from omegaconf import OmegaConf

from tyingrun.cli import report_main
from tyingrun.config import DatasetConfig
from tyingrun.data_cli import main as data_main
from tyingrun.errors import BadInput
from tyingrun.metrics.sinks import decided_before, logged_by, resumed_lines
from tyingrun.train.checkpoint import save_checkpoint
from tyingrun.train.init_from import check_source_data

from .helpers import read_jsonl

SMALL = ["model=gpt2", "dataset=pydoc", "hardware=cpu", "model.n_layer=2", "model.d_model=32",
         "dataset.block_size=32", "dataset.vocab_size=512", "train.batch_size=4", "train.max_steps=10",
         "train.checkpoint_interval=5", "train.eval_interval=5", "train.log_interval=5", "train.eval_batches=2",
         "log.progress=lines"]
TIMING_KEYS = ("tokens_per_s", "wall_time_s", "peak_memory_bytes")
INSPECT = ("-m", "tyingrun.inspect_run")


def errors(result):
    return [line for line in result.stderr.strip().splitlines() if not line.startswith("tyingrun: warning:")]


def warnings(result):
    return [line for line in result.stderr.splitlines() if line.startswith("tyingrun: warning:")]


def one_line(result, code, *words):
    assert result.returncode == code, result.stderr[-2000:]
    lines = errors(result)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def main_exits(capsys, main, argv, code, *words):
    """Run an entry point's ``main(argv)`` in this process; it exits ``code`` with one stderr line holding ``words``."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == code
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "warning:" not in line]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]


def summary_of(folder):
    summary = json.loads((folder / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cli):
    """A finished 10-step run with checkpoints at steps 5 and 10."""
    folder = tmp_path_factory.mktemp("whole")
    cli(*SMALL, f"hydra.run.dir={folder}", expect=0)
    return folder


def crashed_copy(whole, folder):
    """``whole`` as a crash after the step-5 checkpoint leaves it: no step-10 checkpoint, no summary."""
    shutil.copytree(whole, folder)
    shutil.rmtree(folder / "checkpoints" / "step_00000010")
    (folder / "summary.json").unlink()
    return folder


# ---- 3: a source is checked by identity; 9: another depth names the key and the fix ----

@pytest.mark.slow
def test_init_from_a_source_of_another_tokenizer_of_the_same_size_is_refused(tmp_path, cli, whole):
    other = ["dataset.tokenizer=wordpiece", f"train.init_from={whole}"]
    line = one_line(cli(*SMALL, *other, f"hydra.run.dir={tmp_path / 'refused'}"), 2,
                    "another tokenizer", "train.allow_other_tokenizer=true")
    assert line.startswith("tyingrun: error: train.init_from=")
    assert not (tmp_path / "refused" / "checkpoints").exists()
    cli(*SMALL, *other, "train.allow_other_tokenizer=true", f"hydra.run.dir={tmp_path / 'meant'}", expect=0)


@pytest.mark.slow
def test_recursive_refuses_a_source_of_another_tokenizer(tmp_path, cli, whole):
    result = cli(*SMALL, "dataset.tokenizer=wordpiece", "policy=recursive", "policy.n_sets=1",
                 f"train.init_from={whole}", f"hydra.run.dir={tmp_path / 'refused'}")
    one_line(result, 2, "policy=recursive: train.init_from=", "another tokenizer")


def test_a_checkpoint_without_a_recorded_tokenizer_is_taken_with_a_warning(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path, 5, {}, {"map": [0, 1], "trainable": [True, True]}, keep=1)
    check_source_data(checkpoint, "0" * 64, "pydoc", allow_other=False)
    assert "records no tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_a_run_of_another_depth_names_the_key_and_the_fix(tmp_path, cli, whole):
    result = cli(*SMALL, "model.n_layer=4", f"train.init_from={whole}", f"hydra.run.dir={tmp_path / 'deeper'}")
    one_line(result, 2, "train.init_from=", "has 2 layers but model.n_layer=4; set model.n_layer=2")


# ---- 6: a torn last row ----

@pytest.mark.slow
def test_a_torn_last_row_resumes_bit_identically_to_the_uninterrupted_run(tmp_path, cli, whole):
    crashed = crashed_copy(whole, tmp_path / "crashed")
    with (crashed / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 10, "train_loss": 3.1')  # the crash tore the row it was writing
    with (crashed / "maps.jsonl").open("a") as handle:
        handle.write('{"step": 9, "ma')
    result = cli(f"train.resume={crashed}", expect=0)
    dropped = [line for line in warnings(result) if "dropping its torn last row" in line]
    assert len(dropped) == 2 and "after the checkpoint at step 5" in dropped[0], result.stderr
    for name in ("metrics.jsonl", "maps.jsonl"):
        assert read_jsonl(crashed / name, drop=TIMING_KEYS) == read_jsonl(whole / name, drop=TIMING_KEYS)
    assert summary_of(crashed) == summary_of(whole)


def test_other_damage_to_a_log_is_worded_as_what_it_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 5, "val_l\n{"step": 10}\n')
    with pytest.raises(BadInput, match="line 2 is not a JSON row .*delete that one line"):
        resumed_lines(path, 5)
    path.write_text('{"step": 0}\nnot json\n')  # whole (it ends in a newline): not what a crash leaves
    with pytest.raises(BadInput, match="line 2 is not a JSON row"):
        resumed_lines(path, 5)
    path.write_text('{"step": 0}\n["no", "step"]\n')
    with pytest.raises(BadInput, match="line 2 is a JSON value without an integer step"):
        resumed_lines(path, 5)
    # Torn, yet written before the checkpoint (which came after it): damage, not a crash.
    path.write_text('{"step": 0}\n{"step": 5, "val_l')
    with pytest.raises(BadInput, match="torn, but the checkpoint at step 5 was written after it"):
        resumed_lines(path, 5, logged_by)
    # A learned decision's row is written at its reward step, which a tear can hide: after the checkpoint.
    maps = tmp_path / "maps.jsonl"
    maps.write_text('{"step": 0}\n{"step": 4, "map": [0, 0], "reward": 1.5, "rew')
    assert resumed_lines(maps, 8, decided_before, warn_dropped=False) == ['{"step": 0}']


# ---- 10 + 11: hashed checkpoints, one fallback rule for resume and inspect ----

def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for offset in (-5, -9):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped weights", "flipped state tensors", "corrupt state.json",
                                    "edited state.json"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, cli, whole, damage):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    (run / "summary.json").unlink()
    newest = run / "checkpoints" / "step_00000010"
    if damage == "flipped weights":
        flip_bytes(newest / "model.safetensors")
    elif damage == "flipped state tensors":
        flip_bytes(newest / "state.safetensors")
    elif damage == "corrupt state.json":
        (newest / "state.json").write_text("{not json")
    else:  # still valid JSON, one number changed
        state = newest / "state.json"
        edited, count = re.subn(r'"elapsed_s", [0-9.e-]+', '"elapsed_s", 12345.5', state.read_text())
        assert count == 1
        state.write_text(edited)
    inspected = cli(str(run), entry=INSPECT, expect=0)
    assert "checkpoint step_00000005" in inspected.stdout
    result = cli(f"train.resume={run}", expect=0)
    fallback = [line for line in warnings(result) if "the newest intact checkpoint" in line]
    assert len(fallback) == 1 and str(newest) in fallback[0] and "step_00000005" in fallback[0], result.stderr
    assert fallback == [line for line in warnings(inspected) if "the newest intact checkpoint" in line]
    assert read_jsonl(run / "metrics.jsonl", drop=TIMING_KEYS) == read_jsonl(whole / "metrics.jsonl", drop=TIMING_KEYS)
    assert summary_of(run) == summary_of(whole)


@pytest.mark.slow
def test_with_no_intact_checkpoint_resume_says_so_in_one_line(tmp_path, cli, whole):
    run = crashed_copy(whole, tmp_path / "run")
    flip_bytes(run / "checkpoints" / "step_00000005" / "model.safetensors")
    one_line(cli(f"train.resume={run}"), 2, "SHA-256 differs", "it is the only checkpoint")


# ---- 7 + 8: tyingrun-report ----

def fake_run(folder, policy, max_steps, seed=0, ppl=100.0):
    config = {"model": {"name": "gpt2", "n_layer": 4}, "dataset": {"name": "pydoc"}, "policy": {"name": policy},
              "train": {"seed": seed, "max_steps": max_steps}}
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"steps": max_steps, "seed": seed, "val_ppl": ppl,
                                                     "val_loss": 4.6, "trainable_params": 1000,
                                                     "trainable_params_mean": 1000}))


def test_report_refuses_to_pair_groups_of_another_budget_unless_asked(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "none", "none", 20)
    fake_run(tmp_path / "runs" / "cyclic", "cyclic", 10, ppl=120.0)
    argv = [str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    main_exits(capsys, report_main, argv, 2, "tyingrun-report: error: group 'cyclic'",
               "train.max_steps=10 against 20", "--pair-other-budgets")
    assert not (tmp_path / "out").exists()
    report_main([*argv, "--pair-other-budgets"])
    table = {row.split("|")[3].split()[0]: row for row in (tmp_path / "out" / "report.md").read_text().splitlines()
             if row.startswith("| gpt2")}
    assert "train.max_steps=10" in table["cyclic"] and "train.max_steps" not in table["none"]


@pytest.mark.parametrize("arms", [
    {"arms": [{"arm": 1, "folder": 2, "overrides": "x"}]},
    {"arms": [{"arm": "a", "folder": "01_a", "overrides": ["policy=none", 3], "note": ""}]},
    {"arms": "none"},
    {"arms": [["a"]]},
])
def test_an_arms_file_of_wrong_types_is_one_line(tmp_path, capsys, arms):
    fake_run(tmp_path / "study" / "01_a" / "0", "none", 10)
    (tmp_path / "study" / "ablation_arms.json").write_text(json.dumps(arms))
    main_exits(capsys, report_main, [str(tmp_path / "study")], 2, "tyingrun-report: error:", "ablation_arms.json")


# ---- 12: tyingrun-data --dump ----

def test_dump_refuses_an_empty_name_and_a_users_own_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main_exits(capsys, data_main, ["dataset=pydoc", "--dump", ""], 2, "tyingrun-data: error: --dump needs a folder")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "train.txt").write_text("my own words\n")
    main_exits(capsys, data_main, ["dataset=pydoc", "--dump", str(tmp_path / "thesis")], 2,
               "train.txt is not a file an earlier --dump wrote")
    assert (tmp_path / "thesis" / "train.txt").read_text() == "my own words\n"


@pytest.mark.slow
def test_a_dump_replaces_what_a_dump_wrote(tmp_path):
    for _ in range(2):
        data_main(["dataset=pydoc", "dataset.vocab_size=512", "--dump", str(tmp_path / "dump")])
    assert (tmp_path / "dump" / "train.txt").stat().st_size > 0


# ---- 13: make ablations checks everything before any job ----

@pytest.mark.parametrize("args, words", [
    (["--seeds", "0,0"], ["--seeds 0,0 gives seed 0 twice"]),
    (["--seeds", "0,x"], ["'x' is not a seed"]),
    (["train.max_stepz=2"], ["arm none:", "train.max_stepz"]),
    (["train.batch_size=0"], ["arm none:", "train.batch_size"]),
])
def test_ablations_check_seeds_and_every_arm_before_any_job(tmp_path, capsys, monkeypatch, args, words):
    from tyingrun import ablations

    started = []
    monkeypatch.setattr(ablations, "run_job", lambda job, *_: started.append(job) or 0)
    main_exits(capsys, ablations.main, ["--out", str(tmp_path / "study"), *args], 2, "ablations: error:", *words)
    assert started == [] and not (tmp_path / "study").exists()


# ---- 14: One Billion Word from the hub's parquet files ----

def test_1b_loads_the_parquet_branch_and_a_script_dataset_is_one_line(monkeypatch):
    import datasets

    from tyingrun.data.text import load_corpus

    calls = []

    def script_based(name, config=None, revision=None, **kwargs):
        calls.append((name, revision))
        raise RuntimeError(f"Dataset scripts are no longer supported, but found {name.split('/')[-1]}.py")

    monkeypatch.setattr(datasets, "load_dataset", script_based)
    with pytest.raises(BadInput) as refused:
        load_corpus(DatasetConfig(name="1b", hf_name="someone/lm1b-script", max_documents=10))
    message = str(refused.value)
    assert "is a loading script" in message and "dataset.hf_name" in message and "dataset.path" in message
    assert "\n" not in message
    with pytest.raises(BadInput):
        load_corpus(DatasetConfig(name="1b", max_documents=10))
    assert calls == [("someone/lm1b-script", None), ("lm1b", "refs/convert/parquet")]

