"""The `tyingrun` command: a full run's files (a real process), and one clear line for every bad input (in-process
through the CLI's own composition and checks; a real process for each stage's exit status and stderr)."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from .helpers import SUMMARY_KEYS, assert_one_line, bad_input_line, compose_and_run, read_jsonl

SMALL = ["model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "train.eval_batches=4"]


@pytest.fixture(scope="module")
def cyclic_and_none(tmp_path_factory, cli):
    """A cyclic run by the real command, and the policy=none run it is compared with (in-process, same config)."""
    schedule = ["model=gpt2", "dataset=pydoc", "model.n_layer=4", "train.max_steps=12", "train.eval_interval=6",
                "train.log_interval=3", *SMALL]
    runs = {policy: tmp_path_factory.mktemp(policy) for policy in ("cyclic", "none")}
    cli(*schedule, "policy=cyclic", "policy.n_sets=2", f"hydra.run.dir={runs['cyclic']}", expect=0)
    compose_and_run([*schedule, "policy=none"], runs["none"])
    return runs


@pytest.mark.slow
def test_cyclic_run_leaves_every_file_and_summary_key(cyclic_and_none):
    run_dir = cyclic_and_none["cyclic"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "completed" and summary["policy"] == "cyclic"
    assert summary["final_map"] == [0, 1, 0, 1]
    assert summary["independent_layers"] == 2 and summary["independent_layers_mean"] == 2
    assert summary["trainable_params"] == summary["optimizer_params"] == summary["trainable_params_mean"]
    assert summary["peak_memory_kind"] == "cpu_rss" and summary["peak_memory_bytes"] > 0
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["step"] for row in metrics if "val_loss" in row] == [0, 6, 12]
    assert [row["step"] for row in metrics if "train_loss" in row] == [3, 6, 9, 12]
    assert metrics[-1]["val_loss"] == summary["val_loss"]
    maps_rows = read_jsonl(run_dir / "maps.jsonl")
    assert maps_rows == [{**maps_rows[0], "step": 0, "map": [0, 1, 0, 1], "trainable": [True, True, False, False]}]


@pytest.mark.slow
def test_cyclic_trains_two_blocks_fewer_than_none(cyclic_and_none):
    cyclic = json.loads((cyclic_and_none["cyclic"] / "summary.json").read_text())
    none = json.loads((cyclic_and_none["none"] / "summary.json").read_text())
    d_model = 64
    block = 12 * d_model * d_model + 13 * d_model  # attention + MLP weights and biases, two LayerNorms
    assert cyclic["trainable_params"] == none["trainable_params"] - 2 * block
    assert none["trainable_params"] == none["optimizer_params"] == none["total_params"] == cyclic["total_params"]
    assert cyclic["train_state_bytes"] < none["train_state_bytes"]


BAD_INPUTS = {
    "misspelt key": (["train.max_stepz=3"], "unknown config key train.max_stepz; did you mean train.max_steps?"),
    "added key": (["+model.n_layerz=3"], "unknown config key model.n_layerz"),
    "wrong type": (["train.max_steps=many"], "bad value for train.max_steps"),
    "unknown group option": (
        ["dataset=nonexistent"],
        "unknown option dataset=nonexistent; choose one of: 1b, addition, cifar10, digits, parity, phop, pydoc"
    ),
    "n_sets not dividing": (
        ["policy=sequential", "policy.n_sets=3", "model.n_layer=4"], "policy.n_sets=3 does not fit model.n_layer=4"
    ),
    "key the policy does not use": (["policy=none", "policy.n_sets=3"], "policy=none does not use policy.n_sets"),
    # The missing file would fail the data; the policy key is refused first: checks run before any data is loaded.
    "checked before data": (
        ["policy=cyclic", "policy.path=x.json", "dataset=text_files", "dataset.files=[/no/such.txt]"],
        "policy=cyclic does not use policy.path; it uses only policy.n_sets, policy.grad",
    ),
    "eval batches": (["train.eval_batches=0"], "train.eval_batches=0 must be a number of batches"),
    "wiki2 offline": (["dataset=wiki2"], "dataset=wiki2"),
    "n_head not dividing": (["model.n_head=3"], "model.n_head=3 does not divide model.d_model=128"),
    "block too long": (["dataset.block_size=512"], "exceeds the model's 256 positions"),
    "bad choice": (["policy.grad=both"], "policy.grad='both' is not an option"),
    "from_file without path": (["policy=from_file"], "policy=from_file needs policy.path"),
    "missing text file": (["dataset=text_files", "dataset.files=[/no/such.txt]"], "no such file"),
    "cifar10 offline": (["model=vit", "dataset=cifar10"], "dataset=cifar10: the Hugging Face dataset 'cifar10' is"),
    "vit on text": (["model=vit", "dataset=pydoc"], "model=vit trains on one of: cifar10, digits"),
    "gpt2 on images": (["model=gpt2", "dataset=digits"], "model=gpt2 trains on one of: pydoc, wiki2, 1b, text_files"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, name):
    overrides, expected = BAD_INPUTS[name]
    assert expected in bad_input_line(overrides, tmp_path / "run")


# The real command on one error of each stage (composition, preflight, data): exit 2, one line, no traceback.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["misspelt key", "n_sets not dividing", "missing text file"])
def test_bad_input_exits_2_with_one_line(tmp_path, cli, name):
    overrides, expected = BAD_INPUTS[name]
    result = cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(result, 2, expected)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_from_file_rejects_a_map_of_the_wrong_length(tmp_path):
    saved = tmp_path / "summary.json"
    saved.write_text(json.dumps({"final_map": [0, 0, 2]}))
    line = bad_input_line(["policy=from_file", f"policy.path={saved}"], tmp_path / "run")
    assert "has 3 entries but the model has 4 layers" in line


@pytest.mark.slow
def test_from_file_retrains_a_saved_map(tmp_path, cyclic_and_none):
    saved = cyclic_and_none["cyclic"] / "maps.jsonl"
    compose_and_run(["policy=from_file", f"policy.path={saved}", "model.n_layer=4", "train.max_steps=2", *SMALL],
                    tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["final_map"] == [0, 1, 0, 1]


@pytest.mark.slow
@pytest.mark.cli
def test_wheel_ships_the_config_tree(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    (wheel,) = tmp_path.glob("tyingrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("config.yaml", "model/gpt2.yaml", "dataset/pydoc.yaml", "policy/cyclic.yaml", "hardware/cpu.yaml"):
        assert f"tyingrun/conf/{config}" in names


def _write(path, text):
    path.write_text(text)
    return path


FILE_INPUTS = {
    "empty text file": (lambda d: ["dataset=text_files", f"dataset.files=[{_write(d / 'empty.txt', '')}]"],
                        "dataset.files"),
    "corpus smaller than one block": (
        lambda d: ["dataset=text_files", "dataset.vocab_size=300",
                   f"dataset.files=[{_write(d / 'tiny.txt', 'a few words.' + chr(10) * 2 + 'and a few more.')}]"],
        "fewer than one block",
    ),
    "illegal from_file map": (
        lambda d: ["policy=from_file", f"policy.path={_write(d / 's.json', json.dumps({'final_map': [0, 2, 1, 3]}))}"],
        "entry 1 is 2; each entry must be an integer in [0, 1]",
    ),
}


@pytest.mark.parametrize("name", FILE_INPUTS)
def test_bad_files_are_one_line_before_anything_is_written(tmp_path, name):
    make_overrides, expected = FILE_INPUTS[name]
    assert expected in bad_input_line(make_overrides(tmp_path), tmp_path / "run")


@pytest.mark.slow
def test_a_corpus_smaller_than_one_block_exits_2_with_one_line(tmp_path, cli):
    make_overrides, expected = FILE_INPUTS["corpus smaller than one block"]
    result = cli(*make_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line(result, 2, expected)
    assert not (tmp_path / "run" / "summary.json").exists()
