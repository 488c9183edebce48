"""make lint's type check: mypy over the package (configured in pyproject.toml), held to two rules.

* The strict parts (STRICT) have no error at all.
* Everywhere else, every error is one that tools/mypy-baseline.txt lists, and the baseline lists no error that is
  gone: fixing one means deleting its line (``--update`` does that, and refuses to add any).

An error is compared as ``path: error: message  [code]``, without its line and column, so that edits above an
error do not count as a new one; the baseline holds one such line per error (repeats included), sorted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tools" / "mypy-baseline.txt"
STRICT = ("tyingrun/tying/", "tyingrun/models/", "tyingrun/policies/", "tyingrun/metrics/", "tyingrun/contracts.py")
ERROR = re.compile(r"^(?P<path>[^:\s]+\.py):\d+(?::\d+)?: error: (?P<message>.*)$")
SUMMARY = re.compile(r"^(Success: no issues found|Found \d+ errors? in \d+ files?)")


def stable(path: str, message: str) -> str:
    """One error without its position (``defined on line 45`` in a message loses its number too)."""
    message = re.sub(r"on line \d+", "on line N", message)
    return f"{path}: error: {message}"


def mypy_errors() -> Counter:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    if done.returncode not in (0, 1) or not any(SUMMARY.match(line) for line in lines):
        sys.exit(f"mypy did not finish its check (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    found = (ERROR.match(line) for line in lines)
    return Counter(stable(m["path"], m["message"]) for m in found if m)


def listed(errors: Counter) -> List[str]:
    return sorted(errors.elements())


def problems(errors: Counter, baseline: Counter, updating: bool = False) -> List[str]:
    """What fails the check, as lines to print: errors in the strict parts, errors the baseline does not list, and
    (unless ``updating``, which drops them) baseline lines whose error is gone."""
    strict = Counter({error: n for error, n in errors.items() if error.startswith(STRICT)})
    new = errors - baseline - strict
    stale = baseline - errors
    found = []
    if strict:
        found.append(f"{sum(strict.values())} mypy errors in {', '.join(STRICT)}, which must have none:")
        found += listed(strict)
    if new:
        found.append(f"{sum(new.values())} new mypy errors (fix them; the baseline only shrinks):")
        found += listed(new)
    if stale and not updating:
        found.append(f"{sum(stale.values())} errors of the baseline are fixed: run `python tools/typecheck.py "
                     f"--update` to drop their lines from {BASELINE.relative_to(ROOT)}:")
        found += listed(stale)
    return found


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true",
                        help=f"drop the lines of fixed errors from {BASELINE.relative_to(ROOT)} (never adds one)")
    args = parser.parse_args(argv)
    errors = mypy_errors()
    baseline = Counter(BASELINE.read_text(encoding="utf-8").splitlines())
    found = problems(errors, baseline, updating=args.update)
    if args.update and not found:
        BASELINE.write_text("".join(f"{line}\n" for line in listed(errors)), encoding="utf-8")
    print("\n".join(found) if found else f"mypy: {sum(errors.values())} errors, all in the baseline; none in the "
          f"strict parts")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
