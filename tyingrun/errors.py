"""The one exception type for bad input, and the one-line error every entry point ends with (exit 2 or 1)."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn, Set

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user-fixable problem (config, data, checkpoint). The message says what is wrong and how to fix it."""


def fail(message: str, exit_code: int = EXIT_BAD_INPUT, program: str = "tyingrun") -> NoReturn:
    """Print ``<program>: error: <message>`` as one line on stderr and exit with ``exit_code``."""
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.exit(exit_code)


_WARNED: Set[str] = set()


def warn(message: str, program: str = "tyingrun") -> None:
    """``<program>: warning: <message>`` as one line on stderr, and in run.log inside the Hydra app; once per
    process (the run folder's checks and the run itself read the same files)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    logger = logging.getLogger("tyingrun")
    if logger.hasHandlers():
        logger.warning("%s", message)
    sys.stderr.write(f"{program}: warning: {message}\n")
