"""Checkpoints: safetensors for tensors (each weight storage once), JSON for everything else. Nothing is pickled.

A checkpoint is a folder ``checkpoints/step_<N>/`` holding

* ``model.safetensors``: one entry per unique weight storage, named by the first parameter that uses it, so
  tied layer slots and a tied LM head are not stored again;
* ``state.safetensors`` + ``state.json``: the rest of the training state (optimizer, policy, RNGs, data
  position, tying map, step), nested structures in JSON with every tensor moved to the safetensors file.

It is written into a temporary folder and renamed into place, so a folder named ``step_<N>`` is complete.
Loading applies the saved map first, so tied slots alias their roots again, then copies the stored weights
into the model in place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from tyingrun.errors import BadInput
from tyingrun.files import CHECKPOINTS_DIR, STATE_FILE, STATE_TENSORS_FILE, WEIGHTS_FILE, read_json
from tyingrun.tying.weights import copy_weights, read_tensors, save_weights

FORMAT_VERSION = 1
TENSOR_REF = "__tensor__"
FLOAT_REF = "__float__"  # a non-finite float in the state, kept exactly while state.json stays strict JSON
CANONICAL = re.compile(r"step_(\d{8})")

log = logging.getLogger("tyingrun")


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


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy stored weights into ``model`` in place; its ties must already be in place (apply the map first)."""
    copy_weights(model, read_tensors(path), f"checkpoint {path}")


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
    (tmp / STATE_FILE).write_text(json.dumps(document, allow_nan=False))
    # The whole folder is renamed into place (files.atomic_path renames single files).
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir, warn=False)[:-max(keep, 1)]:
        shutil.rmtree(old)
    return final


def recorded_step(checkpoint: Path) -> int:
    """The step that ``checkpoint/state.json`` records; BadInput when it does not read back."""
    try:
        document = read_json(checkpoint / STATE_FILE)
    except FileNotFoundError:
        raise BadInput(f"checkpoint {checkpoint} has no state.json; it is incomplete - pick another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt; pick another checkpoint") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        found = document.get("format") if isinstance(document, dict) else None
        raise BadInput(f"checkpoint {checkpoint} has format {found}, this tyingrun reads {FORMAT_VERSION}")
    step = document.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(document.get("state"), dict):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt (no step or state); pick another checkpoint")
    return step


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


def list_checkpoints(run_dir: Path, warn: bool = True) -> List[Path]:
    """The run's checkpoints, oldest first by the step each records; anything else is left alone (and named in
    a warning unless ``warn`` is false)."""
    good, other = scan_checkpoints(run_dir)
    if warn:
        for path, why in other:
            if log.hasHandlers():  # inside the Hydra app: run.log too
                log.warning("ignoring %s: %s", path, why)
            sys.stderr.write(f"tyingrun: warning: ignoring {path}: {why}\n")
    return [path for _, path in good]


def checkpoint_step(checkpoint: Path) -> int:
    return recorded_step(checkpoint)


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Optional[Path]:
    found = list_checkpoints(run_dir, warn)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> Tuple[int, Dict[str, Any]]:
    """The step and the training state of a checkpoint folder (the weights are loaded by load_weights)."""
    try:
        document = read_json(checkpoint / STATE_FILE)
    except FileNotFoundError:
        raise BadInput(f"checkpoint {checkpoint} has no state.json; it is incomplete - pick another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt; pick another checkpoint") from None
    if document.get("format") != FORMAT_VERSION:
        raise BadInput(f"checkpoint {checkpoint} has format {document.get('format')}, this tyingrun reads "
                       f"{FORMAT_VERSION}")
    tensors = read_tensors(checkpoint / STATE_TENSORS_FILE)
    return document["step"], join_tensors(document["state"], tensors)
