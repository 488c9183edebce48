"""Issue 26, findings 1 and 2: train.overwrite=true clears only a run folder that no source lives in, and only
once the new run has read its sources and built; anything else is refused with one line and every byte left."""

import shutil

import pytest

from tyingrun.files import CONFIG_FILE, LOCK_FILE, RUN_FOLDER_NAMES
from tyingrun.run_folder import is_run_name, lives_in

SMALL = ["model=gpt2", "dataset=pydoc", "hardware=cpu", "model.n_layer=2", "model.d_model=32",
         "dataset.block_size=32", "train.batch_size=4", "train.max_steps=5", "train.eval_batches=2",
         "log.progress=lines"]


def every_byte(folder):
    """Every file and folder under ``folder`` with its bytes (the lock's pid aside: it is the holder's)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))
            if p.name != LOCK_FILE}


def one_error_line(result, *words):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tyingrun: error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("runs") / "ref"
    cli(*SMALL, f"hydra.run.dir={run_dir}", expect=0)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("source", ["train.init_from={folder}", "policy=from_file policy.path={folder}/summary.json"])
def test_overwrite_never_clears_the_folder_a_source_lives_in(cli, tmp_path, finished, source):
    folder = tmp_path / "X"
    shutil.copytree(finished, folder)
    before = every_byte(folder)
    overrides = source.format(folder=folder).split()
    result = cli(*SMALL, "train.overwrite=true", *overrides, f"hydra.run.dir={folder}")
    one_error_line(result, "train.overwrite=true", overrides[-1].split("=")[0], "lives")
    assert every_byte(folder) == before


@pytest.mark.slow
def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(cli, tmp_path):
    folder = tmp_path / "V"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("x\n")
    (folder / "sub" / "notes.txt").write_text("y\n")
    before = every_byte(folder)
    one_error_line(cli(*SMALL, "train.overwrite=true", f"hydra.run.dir={folder}"), "sub, thesis.tex", "no tyingrun")
    assert every_byte(folder) == before and not (folder / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_folder_of_run_names_without_a_config_is_not_a_run_folder(cli, tmp_path):
    folder = tmp_path / "R"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "mine.pt").write_bytes(b"\0\1")
    before = every_byte(folder)
    one_error_line(cli(*SMALL, "train.overwrite=true", f"hydra.run.dir={folder}"), CONFIG_FILE)
    assert every_byte(folder) == before


@pytest.mark.slow
def test_an_overwrite_that_fails_before_training_puts_the_earlier_run_back(cli, tmp_path, finished):
    """model.vocab_size below the tokenizer's is found only once the data is built, after the claim."""
    folder = tmp_path / "W"
    shutil.copytree(finished, folder)
    before = every_byte(folder)
    one_error_line(cli(*SMALL, "train.overwrite=true", "model.vocab_size=3", f"hydra.run.dir={folder}"),
                   "model.vocab_size=3")
    assert every_byte(folder) == before


def test_run_names_are_what_a_run_writes():
    assert all(is_run_name(name) for name in RUN_FOLDER_NAMES)
    assert is_run_name(".summary.json.k2j3h4.tmp") and is_run_name(".hydra")
    assert not any(is_run_name(name) for name in ("thesis.tex", "sub", ".tmp", ".thesis.tex.x.tmp", "hydra"))


def test_a_source_lives_in_its_folder_and_below_it(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    assert lives_in(tmp_path / "run", tmp_path / "run")
    assert lives_in(tmp_path / "link" / "checkpoints", tmp_path / "run")
    assert not lives_in(tmp_path, tmp_path / "run") and not lives_in(tmp_path / "runs", tmp_path / "run")
