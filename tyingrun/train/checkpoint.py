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
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tyingrun.errors import BadInput
from tyingrun.tying.counts import storage_key

FORMAT_VERSION = 1
TENSOR_REF = "__tensor__"


def split_tensors(obj: Any, tensors: Dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of ``obj`` in which every tensor is replaced by a reference into ``tensors``."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_REF: path}
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
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def unique_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Each weight storage once, under the first name that uses it (a root before its tied slots)."""
    seen, weights = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            weights[name] = tensor.detach()
    return weights


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({name: t.cpu().contiguous() for name, t in unique_weights(model).items()}, str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy stored weights into ``model`` in place; its ties must already be in place (apply the map first)."""
    copy_weights(model, read_tensors(path), f"checkpoint {path}")


def copy_weights(model: nn.Module, stored: Dict[str, torch.Tensor], source: str) -> None:
    """Copy ``stored`` (one tensor per storage, named as unique_weights names them) into ``model`` in place."""
    expected = unique_weights(model)
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise BadInput(f"{source} lacks {missing[0]} (and {len(missing) - 1} more); it is not of this model "
                       f"(or was saved with other model.* settings, e.g. model.tie_embeddings)")
    targets = model.state_dict(keep_vars=True)
    for name, value in stored.items():
        if name in targets and name not in expected:
            partner = next(n for n, t in expected.items() if storage_key(t) == storage_key(targets[name]))
            raise BadInput(
                f"{source} stores {name} apart from {partner} but this model ties the two into one tensor; "
                f"two trained matrices cannot be merged - untie them (model.tie_embeddings=false)"
            )
        if name not in targets or targets[name].shape != value.shape:
            shape = tuple(targets[name].shape) if name in targets else "absent"
            raise BadInput(
                f"{source} holds {name} of shape {tuple(value.shape)} but the model's is {shape}; "
                f"it was saved from a different model shape - use the same model.* settings"
            )
    with torch.no_grad():
        for name, value in stored.items():
            targets[name].copy_(value)


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadInput(f"checkpoint file {path} is missing; pick another checkpoint or start afresh")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInput(f"checkpoint file {path} is truncated or corrupt ({err}); pick another checkpoint") from None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, state: Dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and keep only the newest ``keep`` checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    tensors: Dict[str, torch.Tensor] = {}
    document = {"format": FORMAT_VERSION, "step": step, "state": split_tensors(state, tensors)}
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(document))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> List[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> Tuple[int, Dict[str, Any]]:
    """The step and the training state of a checkpoint folder (the weights are loaded by load_weights)."""
    try:
        document = json.loads((checkpoint / "state.json").read_text())
    except FileNotFoundError:
        raise BadInput(f"checkpoint {checkpoint} has no state.json; it is incomplete - pick another one") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"checkpoint {checkpoint}/state.json is corrupt; pick another checkpoint") from None
    if document.get("format") != FORMAT_VERSION:
        raise BadInput(f"checkpoint {checkpoint} has format {document.get('format')}, this tyingrun reads "
                       f"{FORMAT_VERSION}")
    tensors = read_tensors(checkpoint / "state.safetensors")
    return document["step"], join_tensors(document["state"], tensors)
