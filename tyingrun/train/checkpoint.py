"""Checkpoints: safetensors for tensors (each weight storage once), JSON for everything else. Nothing is pickled.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding

* ``model.safetensors``: one entry per unique weight storage, named by the first parameter that uses it, so
  tied layer slots and a tied LM head are not stored again;
* ``state.safetensors`` + ``state.json``: the rest of the training state (optimizer, policy, RNGs, data
  position, tying map, step), nested structures in JSON with every tensor moved to the safetensors file.

It is written into a temporary folder and renamed into place, so a folder named ``step_<N>`` is complete.
``state.json`` records the SHA-256 of both safetensors files and of its own document (``sha256``), so a flipped
byte anywhere is found before a checkpoint is used: newest_intact_checkpoint, the one rule by which resume,
``train.init_from`` (a run folder), ``tyingrun-inspect`` and ``tyingrun-export`` pick a run's checkpoint, skips a
damaged one with a warning and takes the newest intact one. Checkpoints written before hashes are checked by
reading their files back.
Loading applies the saved map first, so tied slots alias their roots again, then copies the stored weights
into the model in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import torch
from safetensors.torch import save_file
from torch import nn

from tyingrun.errors import BadInput, warn
from tyingrun.files import CHECKPOINTS_DIR, STATE_FILE, STATE_TENSORS_FILE, WEIGHTS_FILE, file_sha256, read_json
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import copy_weights, read_tensors, save_weights

FORMAT_VERSION = 1
HASHES = "sha256"  # in state.json: file name -> SHA-256 of each safetensors file, and STATE_FILE -> of the rest
HASHED_FILES = (WEIGHTS_FILE, STATE_TENSORS_FILE)
TENSOR_REF = "__tensor__"
FLOAT_REF = "__float__"  # a non-finite float in the state, kept exactly while state.json stays strict JSON
CANONICAL = re.compile(r"step_(\d{8})")


class NonFiniteWeights(RuntimeError):
    """The weights hold NaN or inf: no checkpoint is written from them."""


def split_tensors(obj: Any, tensors: Dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of ``obj`` in which every tensor is replaced by a reference into ``tensors``."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(obj, float) and not math.isfinite(obj):
        return {FLOAT_REF: repr(obj)}
    if isinstance(obj, dict):
        return {"__dict__": [[split_tensors(k, tensors, f"{path}/k{i}"), split_tensors(v, tensors, f"{path}/{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def join_tensors(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Undo split_tensors."""
    if isinstance(obj, dict):
        if TENSOR_REF in obj:
            return tensors[obj[TENSOR_REF]]
        if FLOAT_REF in obj:
            return float(obj[FLOAT_REF])
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# What a tie shared in checkpoints written before the choice existed: whole blocks.
WHOLE_BLOCKS = {"share": "block", "share_norms": False}
CopyWeights = Callable[[nn.Module, Dict[str, torch.Tensor], str], None]


def restore_model(model: nn.Module, checkpoint: Path, state: Dict[str, Any], label: Optional[str] = None,
                  copy: CopyWeights = copy_weights) -> None:
    """Load ``checkpoint`` (``state``: its read_state) into ``model``: what a tie shared and the map with its
    trainable flags first, so tied slots alias their roots again, then the stored weights, copied in place by
    ``copy`` (``label`` names the source in its errors). The one way a checkpoint becomes a model: resume,
    train.init_from and the tools that read finished runs all load through it."""
    stack = cast(TiedStack, model.stack)  # every tyingrun model's slots are one TiedStack
    stack.set_sharing(**state.get("sharing", WHOLE_BLOCKS))
    stack.apply_map(state["map"], state["trainable"])
    weights = checkpoint / WEIGHTS_FILE
    copy(model, read_tensors(weights), label or f"checkpoint {weights}")


def save_checkpoint(run_dir: Path, step: int, weights: Dict[str, torch.Tensor], state: Dict[str, Any],
                    keep: int) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and keep only the newest ``keep`` checkpoints (by the step
    each records; folders that are not checkpoints of this format are left alone). ``weights`` are the model's
    unique_weights as whole tensors (gathered from the shards under hardware=fsdp). Weights holding NaN or inf
    raise NonFiniteWeights and write nothing: the last good checkpoint stays the newest."""
    bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteWeights(f"weights became non-finite (nan or inf) at step {step} ({len(bad)} tensors, e.g. "
                               f"{bad[0]}); no checkpoint written, the last good one is kept")
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(weights, tmp / WEIGHTS_FILE)
    tensors: Dict[str, torch.Tensor] = {}
    document = {"format": FORMAT_VERSION, "step": step, "state": split_tensors(state, tensors)}
    save_file(tensors, str(tmp / STATE_TENSORS_FILE))
    hashes = {name: file_sha256(tmp / name) for name in HASHED_FILES}
    document[HASHES] = {**hashes, STATE_FILE: document_sha256(document)}
    (tmp / STATE_FILE).write_text(json.dumps(document, allow_nan=False))
    # The whole folder is renamed into place (files.atomic_path renames single files).
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir, warn_others=False)[:-max(keep, 1)]:
        shutil.rmtree(old)
    return final


def document_sha256(document: Dict[str, Any]) -> str:
    """The SHA-256 of a state.json document without its ``sha256`` entry, as save_checkpoint serialises it."""
    rest = {key: value for key, value in document.items() if key != HASHES}
    return hashlib.sha256(json.dumps(rest, allow_nan=False).encode()).hexdigest()


def read_document(checkpoint: Path) -> Dict[str, Any]:
    """``checkpoint/state.json``, checked: its format, a step and a state, and (when it records them) its own hash;
    BadInput when it does not read back. The one reader of state.json."""
    try:
        document = read_json(checkpoint / STATE_FILE)
    except FileNotFoundError:
        raise BadInput(f"checkpoint {checkpoint} has no state.json; it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        found = document.get("format") if isinstance(document, dict) else None
        raise BadInput(f"checkpoint {checkpoint} has format {found}, this tyingrun reads {FORMAT_VERSION}")
    step = document.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(document.get("state"), dict):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt (no step or state)")
    hashes = document.get(HASHES)
    if hashes is not None and (not isinstance(hashes, dict) or hashes.get(STATE_FILE) != document_sha256(document)):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt (its SHA-256 differs from the one it records)")
    return document


def recorded_step(checkpoint: Path) -> int:
    """The step that ``checkpoint/state.json`` records; BadInput when it does not read back."""
    return read_document(checkpoint)["step"]


def damage(checkpoint: Path) -> Optional[str]:
    """Why ``checkpoint`` cannot be used (state.json, a missing file, a file whose bytes differ from the SHA-256
    recorded, or, without recorded hashes, a file that does not load), or None when it is intact."""
    try:
        hashes = read_document(checkpoint).get(HASHES)
        for name in HASHED_FILES:
            path = checkpoint / name
            if hashes is None:
                read_tensors(path)
            elif not path.is_file():
                raise BadInput(f"checkpoint file {path} is missing")
            elif file_sha256(path) != hashes.get(name):
                raise BadInput(f"checkpoint file {path} is truncated or corrupt (its SHA-256 differs from the one "
                               f"state.json records)")
    except BadInput as err:
        return str(err)
    return None


def scan_checkpoints(run_dir: Path) -> Tuple[List[Tuple[int, Path]], List[Tuple[Path, str]]]:
    """(step, folder) of every checkpoint that reads back, by step; and (path, why) of everything else there."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    good: List[Tuple[int, Path]] = []
    other: List[Tuple[Path, str]] = []
    if not root.is_dir():
        return good, other
    for path in sorted(root.iterdir()):
        if path.name.startswith(".tmp_step_"):
            continue  # a write in progress (or killed): save_checkpoint replaces it
        match = CANONICAL.fullmatch(path.name)
        if match is None or not path.is_dir():
            other.append((path, "not a step_<8 digits> checkpoint folder"))
            continue
        try:
            step = recorded_step(path)
        except BadInput as err:
            other.append((path, str(err)))
            continue
        if step != int(match.group(1)):
            other.append((path, f"its state.json records step {step}, not the {int(match.group(1))} of its name"))
            continue
        good.append((step, path))
    good.sort()
    return good, other


def list_checkpoints(run_dir: Path, warn_others: bool = True) -> List[Path]:
    """The run's checkpoints whose state.json reads back, oldest first by the step each records; anything else is
    left alone (and named in a warning unless ``warn_others`` is false). Their files are not verified: for a
    checkpoint to use, see newest_intact_checkpoint."""
    good, other = scan_checkpoints(run_dir)
    if warn_others:
        for path, why in other:
            warn(f"ignoring {path}: {why}")
    return [path for _, path in good]


def named_step(checkpoint: Path) -> int:
    """The step in a ``step_<8 digits>`` folder's name (-1 for another name)."""
    match = CANONICAL.fullmatch(checkpoint.name)
    return int(match[1]) if match else -1


def newest_intact_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint a tool uses from a run folder: the newest ``step_<N>`` whose files are intact (damage).

    Each newer one that is damaged is named in a warning (what a crash, a full disk or a flipped bit left), as is
    anything else in checkpoints/; with none intact, BadInput names the newest one's damage. None: no checkpoint.
    """
    good, other = scan_checkpoints(run_dir)
    damaged = {path: why for path, why in other if CANONICAL.fullmatch(path.name) and path.is_dir()}
    for path, why in other:
        if path not in damaged:
            warn(f"ignoring {path}: {why}")
    by_name = sorted([*(path for _, path in good), *damaged], key=named_step)
    skipped: List[str] = []
    for path in reversed(by_name):
        problem = damaged.get(path) or damage(path)
        if problem is None:
            for reason in skipped:
                warn(f"{reason}; using {path}, the newest intact checkpoint")
            return path
        skipped.append(problem)
    if skipped:
        older = "it is the only checkpoint" if len(skipped) == 1 else "no older checkpoint is intact either"
        raise BadInput(f"{skipped[0]}; {older} - start the run afresh (or restore the folder from a backup)")
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return recorded_step(checkpoint)


def latest_checkpoint(run_dir: Path, warn_others: bool = True) -> Optional[Path]:
    """The newest checkpoint whose state.json reads back (its files unverified; see newest_intact_checkpoint)."""
    found = list_checkpoints(run_dir, warn_others)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> Tuple[int, Dict[str, Any]]:
    """The step and the training state of a checkpoint folder (restore_model loads its weights)."""
    document = read_document(checkpoint)
    tensors = read_tensors(checkpoint / STATE_TENSORS_FILE)
    return document["step"], join_tensors(document["state"], tensors)
