"""``train.init_from``: start a run from earlier weights instead of a random init.

The source is a tyingrun run folder (its newest checkpoint), a checkpoint folder, or a local Hugging Face GPT-2
folder. A checkpoint's saved tying map is applied first, so its ties come back as shared storage; the run's
policy then decides as usual. A head that the source ties to the embedding but the model keeps apart starts as
a copy of the tied matrix; the reverse (two trained matrices into one) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.errors import BadInput
from tyingrun.files import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE
from tyingrun.models.embeddings import LM_HEAD_WEIGHT
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.hf_gpt2 import HF_CONFIG, architecture, read_hf_config, read_hf_weights
from tyingrun.train.checkpoint import latest_checkpoint, read_state
from tyingrun.tying.weights import copy_weights, read_tensors

# The architecture keys a Hugging Face GPT-2 fixes.
HF_ARCHITECTURE = ("n_layer", "n_head", "d_model", "max_positions", "vocab_size", "bias")


def init_source(path: str) -> Path:
    """The checkpoint folder or Hugging Face folder that ``train.init_from=path`` names."""
    folder = Path(path).expanduser()
    if (folder / STATE_FILE).is_file() or (folder / HF_CONFIG).is_file():
        return folder
    if (folder / CONFIG_FILE).is_file():
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            raise BadInput(f"train.init_from={path} is a run folder without checkpoints; pick a finished run")
        return checkpoint
    raise BadInput(f"train.init_from={path} is neither a tyingrun run or checkpoint folder nor a Hugging Face "
                   f"GPT-2 folder (config.json + model.safetensors)")


def init_from(model: nn.Module, source: Path) -> None:
    """Load the weights (and, from a checkpoint, the tying map) of ``source`` (see init_source) into ``model``."""
    label = f"train.init_from={source}"
    if (source / HF_CONFIG).is_file():
        hf_cfg = _matching_hf_config(model, source)
        _copy_keeping_head_apart(model, read_hf_weights(source, hf_cfg.tie_embeddings), label)
        return
    _, state = read_state(source)
    # The checkpoint's ties come back under what they shared when it was saved (older checkpoints: whole
    # blocks); the model then returns to its own choice, each slot keeping what it computed with.
    own = model.stack.sharing
    model.stack.set_sharing(**state.get("sharing", {"share": "block", "share_norms": False}))
    model.stack.apply_map(state["map"], state["trainable"])
    _copy_keeping_head_apart(model, read_tensors(source / WEIGHTS_FILE), label)
    model.stack.set_sharing(**own)


def _matching_hf_config(model: nn.Module, source: Path) -> ModelConfig:
    if not isinstance(model, GPT2):
        raise BadInput(f"train.init_from={source} is a Hugging Face GPT-2; it starts model=gpt2 only")
    hf_cfg, eps = read_hf_config(source)
    ours = architecture(model)
    differ = [key for key in HF_ARCHITECTURE if getattr(hf_cfg, key) != getattr(ours, key)]
    if differ:
        needed = " ".join(f"model.{key}={str(getattr(hf_cfg, key)).lower()}" for key in differ)
        raise BadInput(f"train.init_from={source} is a GPT-2 of another shape; set {needed} "
                       f"(and dataset.tokenizer=gpt2 for GPT-2's own vocabulary)")
    if eps != model.ln_f.eps:
        raise BadInput(f"train.init_from={source} has layer_norm_epsilon={eps}; tyingrun's GPT-2 trains with "
                       f"{model.ln_f.eps}")
    return hf_cfg


def _copy_keeping_head_apart(model: nn.Module, stored: Dict[str, torch.Tensor], label: str) -> None:
    """copy_weights; when the source ties the head but the model does not, the head starts as a copy."""
    tokens = getattr(model, "tokens", None)
    if tokens is None or tokens.tied or LM_HEAD_WEIGHT in stored:
        copy_weights(model, stored, label)
        return
    tokens.tie()
    copy_weights(model, stored, label)
    tokens.untie()
