"""What needs no model imports no torch: the report, the sweep callback, the ablation driver, and the CLI until a
run starts (``tyingrun --help`` among them). Checked in one fresh interpreter, since this process has torch."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "safetensors.torch")

PROBE = f"""
import atexit, sys
heavy = lambda: sorted(name for name in {HEAVY!r} if name in sys.modules)
import tyingrun.ablations, tyingrun.cli, tyingrun.files, tyingrun.report, tyingrun.run_status, tyingrun.sweep
print("imported:", heavy())
atexit.register(lambda: print("after --help:", heavy()))
sys.argv = ["tyingrun", "--help"]
tyingrun.cli.main()
"""


@pytest.mark.cli
def test_the_report_the_sweep_and_cli_help_import_no_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "imported: []" in lines
    assert "tyingrun is powered by Hydra." in lines  # --help printed the app's help
    assert lines[-1] == "after --help: []"
