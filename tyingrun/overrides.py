"""How a value is written as a Hydra override on the command line (``key=value``), so that Hydra reads it back
as exactly that string: the one quoting rule of the CLI's resume hints and the ablation driver's commands."""

from __future__ import annotations

import functools
import re

from hydra.core.override_parser.overrides_parser import OverridesParser

# Left unquoted only when Hydra reads them back as the same string (not a number, a bool, null or a sweep).
PLAIN = re.compile(r"[A-Za-z0-9_./+:@%~-]+")


@functools.lru_cache(maxsize=1)
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _reads_back(text: str) -> bool:
    try:
        return _parser().parse_override(f"key={text}").value() == text
    except Exception:  # noqa: BLE001 - any parse error means the text must be quoted
        return False


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is where Hydra reads it so, else single-quoted."""
    if PLAIN.fullmatch(text) and _reads_back(text):
        return text
    # Hydra reads a backslash as an escape only before a quote or at the end of the value: double those.
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{escaped}'"
