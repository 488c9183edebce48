"""tools/typecheck.py's rules on mypy's errors (no mypy run): none in the strict parts, none beyond the baseline,
and a baseline that names no fixed error."""

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from typecheck import ERROR, problems, stable  # noqa: E402

CLI = "tyingrun/cli.py: error: Missing return statement  [return]"
RUN = "tyingrun/run.py: error: Name \"x\" already defined on line N  [no-redef]"


def test_an_error_is_compared_without_its_position():
    line = 'tyingrun/run.py:88:5: error: Name "x" already defined on line 41  [no-redef]'
    found = ERROR.match(line)
    assert stable(found["path"], found["message"]) == RUN


def test_only_errors_the_baseline_lists_pass():
    assert problems(Counter([CLI, RUN]), Counter([CLI, RUN])) == []
    found = problems(Counter([CLI, CLI, RUN]), Counter([CLI, RUN]))
    assert found == ["1 new mypy errors (fix them; the baseline only shrinks):", CLI]


def test_a_fixed_error_must_leave_the_baseline():
    found = problems(Counter([CLI]), Counter([CLI, RUN]))
    assert found[0].startswith("1 errors of the baseline are fixed") and found[1:] == [RUN]
    assert problems(Counter([CLI]), Counter([CLI, RUN]), updating=True) == []


def test_the_strict_parts_have_no_error_even_one_the_baseline_lists():
    stack = "tyingrun/tying/stack.py: error: Value of type Module is not indexable  [index]"
    found = problems(Counter([stack]), Counter([stack]))
    assert found[0].startswith("1 mypy errors in tyingrun/tying/") and found[1:] == [stack]
