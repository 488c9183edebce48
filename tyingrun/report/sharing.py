"""Where the sharing is in a finished run: for each slot and each of its tensors, which slot's storage it reads.

Read from files only: the final map (summary.json) and the names the newest checkpoint stores. A checkpoint holds
each storage once, under its first name (a root before its tied slots), so a slot's tensor that the checkpoint
does not name reads its root's storage.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from safetensors import safe_open

from tyingrun.files import CHECKPOINTS_DIR, WEIGHTS_FILE, write_json_atomic
from tyingrun.report.runs import Group, Run

SHARING_FILE = "sharing.json"
BLOCK_PREFIX = "stack.blocks."


def run_sharing(run: Run) -> Optional[Dict[str, Any]]:
    """The sharing of a finished run, or None when it has no map or no checkpoint to read it from."""
    final_map = (run.summary or {}).get("final_map")
    checkpoints = sorted((run.path / CHECKPOINTS_DIR).glob("step_*"))
    if not final_map or not checkpoints or not (checkpoints[-1] / WEIGHTS_FILE).is_file():
        return None
    with safe_open(str(checkpoints[-1] / WEIGHTS_FILE), "pt") as weights:
        stored = set(weights.keys())
    tensors = sorted(name.removeprefix(f"{BLOCK_PREFIX}0.") for name in stored if name.startswith(f"{BLOCK_PREFIX}0."))
    slots = []
    for slot, root in enumerate(final_map):
        reads = {tensor: slot if f"{BLOCK_PREFIX}{slot}.{tensor}" in stored else root for tensor in tensors}
        slots.append({"slot": slot, "root": root, "reads": reads})
    # run.config is flattened ("policy.share"); configs from before policy.share shared whole blocks.
    return {"final_map": list(final_map), "share": run.config.get("policy.share", "block"),
            "share_norms": run.config.get("policy.share_norms", False), "slots": slots}


def shared_parts(slot: Dict[str, Any]) -> str:
    """What a slot reads from another slot, by sublayer: "-" (nothing), "all", or e.g. "attn, ln_1"."""
    shared = [tensor for tensor, source in slot["reads"].items() if source != slot["slot"]]
    if not shared:
        return "-"
    if len(shared) == len(slot["reads"]):
        return "all"
    return ", ".join(sorted({tensor.split(".")[0] for tensor in shared}))


def write_sharing(groups: List[Group]) -> List[str]:
    """Write sharing.json into every finished run folder; return report.md's sharing section (one row per group)."""
    lines = []
    for group in groups:
        found = None
        for run in group.runs:
            sharing = run_sharing(run)
            if sharing is not None:
                write_json_atomic(run.path / SHARING_FILE, sharing)
                found = found or sharing
        if found is None:
            continue
        cells = [f"{slot['slot']}←{slot['root']}: {shared_parts(slot)}" if slot["root"] != slot["slot"]
                 else f"{slot['slot']}: own" for slot in found["slots"]]
        lines.append(f"| {group.name} | {found['share']} | {' · '.join(cells)} |")
    if not lines:
        return []
    return ["## Where the sharing is", "",
            f"Per slot, what it reads from its root's storage (final map; per run in its `{SHARING_FILE}`).", "",
            "| group | share | slots |", "|---|---|---|", *lines, ""]
