"""wandb stays out of runs that do not ask for it, works offline, and refuses online mode without a login."""

import os

import pytest

TINY = [
    "policy=dynamic_q", "model.n_layer=2", "model.d_model=32", "dataset.block_size=32", "train.batch_size=4",
    "train.max_steps=4", "train.eval_batches=2", "log.progress=lines",
]


@pytest.mark.slow
def test_a_run_without_wandb_never_imports_it(tmp_path, cli):
    code = (
        "import sys\n"
        f"sys.argv = ['tyingrun', *{TINY!r}, 'hydra.run.dir={tmp_path}']\n"
        "from tyingrun.cli import main\n"
        "main()\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    result = cli(entry=("-c", code))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "summary.json").is_file()


@pytest.mark.slow
def test_offline_wandb_records_the_run(tmp_path, cli):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir")}
    (tmp_path / "wandb-dir").mkdir()
    result = cli(*TINY, "log.wandb=true", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
    (offline_run,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))
    assert list(offline_run.glob("files/media/table/tying/maps_*.table.json"))


@pytest.mark.slow
def test_online_without_a_login_stops_at_once_with_one_line(tmp_path, cli):
    env = {k: None for k in os.environ if k.startswith("WANDB_")}
    # No credentials anywhere wandb looks: environment, ~/.netrc, wandb's settings files.
    env.update(WANDB_MODE="online", HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"),
               WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_DIR=str(tmp_path))
    result = cli("log.wandb=true", f"hydra.run.dir={tmp_path / 'run'}", env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tyingrun: error: log.wandb=true"), result.stderr
    assert "WANDB_MODE=offline" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
