"""Turn SIGTERM and SIGINT into a request to stop cleanly after the current step."""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """Raised once the run has checkpointed after a stop signal; the exit status is 128 + the signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(KeyboardInterrupt):
    """A stop signal that ends the process at once (a second one, or one outside the training loop)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While active, the first stop signal is recorded in ``received``; a second one interrupts at once (through
    the handler that was in place before, when there was one)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            return
        previous = self._previous.get(signum)
        if callable(previous):  # the program's own way to stop at once (tyingrun.cli.stop_at_once)
            previous(signum, frame)
        raise StopNow(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
