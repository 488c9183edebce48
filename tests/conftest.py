import fcntl
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from .helpers import run_folder, small_lm_config  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A test that starts the `tyingrun` command (the ``cli`` fixture, directly or through a fixture of its own)
    is marked ``cli``: `make test-fast` is the in-process rest (the marker is added before -m selects)."""
    for item in items:
        if "cli" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cli)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory, worker_id):
    """One corpus, tokenizer and token cache for the whole test run, as a user's ~/.cache/tyingrun would be: the
    xdist workers of one run share it (the cache's writes are atomic), so each corpus is built once per run."""
    if worker_id == "master":
        return tmp_path_factory.mktemp("tyingrun-cache")
    shared = tmp_path_factory.getbasetemp().parent / "tyingrun-cache"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def pydoc_corpus_file(data_cache):
    """The pydoc corpus in the shared data cache, built by the first worker that asks while the others wait."""
    from tyingrun.data.text import pydoc_documents

    with open(data_cache / ".pydoc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pydoc_documents(data_cache)
    (path,) = (data_cache / "corpora").glob("pydoc-*.json")
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch, data_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TYINGRUN_CACHE", str(data_cache))


TYINGRUN = ("-m", "tyingrun.cli")


class CLI:
    """The `tyingrun` command as a user runs it: a fresh interpreter, offline, wandb off, the session's data cache.

    ``cli(*overrides)`` runs ``python -m tyingrun.cli *overrides`` and returns the CompletedProcess (text output
    captured). ``entry`` replaces ``-m tyingrun.cli`` (``("-m", "tyingrun.data_cli")``, a launcher in front, or
    ``("-c", code)``); ``env`` is added to that environment (a value of None removes the variable); ``expect``
    asserts the exit status.
    """

    def __init__(self, cache):
        self.cache = cache

    def command(self, *args, entry=TYINGRUN):
        return [sys.executable, *entry, *args]

    def env(self, extra=None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TYINGRUN_CACHE": str(self.cache)}
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def __call__(self, *args, entry=TYINGRUN, cwd=None, env=None, expect=None, timeout=300):
        result = subprocess.run(self.command(*args, entry=entry), cwd=cwd, env=self.env(env), capture_output=True,
                                text=True, timeout=timeout)
        if expect is not None:
            assert result.returncode == expect, result.stderr[-3000:]
        return result

    def popen(self, *args, entry=TYINGRUN, env=None, **kwargs):
        """Start the command without waiting; ``kwargs`` go to subprocess.Popen (text mode)."""
        return subprocess.Popen(self.command(*args, entry=entry), env=self.env(env), text=True, **kwargs)


@pytest.fixture(scope="session")
def cli(data_cache):
    """Runs the `tyingrun` command in a subprocess (see CLI); session-scoped, so module fixtures can use it too."""
    return CLI(data_cache)


@pytest.fixture(scope="session")
def cyclic_gpt2_run(tmp_path_factory, data_cache):
    """A finished GPT-2 run (tied embeddings, cyclic map over 2 layer sets) with its checkpoint."""
    folder = tmp_path_factory.mktemp("cyclic-gpt2-run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        run_folder(small_lm_config(), folder)
    return folder
