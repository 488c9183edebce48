"""What torchrun tells a process through its environment, readable before torch is imported (the CLI asks
before it knows whether it will train)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
