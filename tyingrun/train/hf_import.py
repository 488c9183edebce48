"""``train.init_from`` of a Hugging Face Llama or Qwen3 folder (or ``hf:<repo id>``) into model=llama.

The architecture is read from the folder's ``config.json`` (tyingrun.models.hf_llama refuses what the block cannot
compute); the run's model config must build the same network, and when it does not, one line names every key to
set (or the preset to pick). The head follows init_from's rule: a tied source may start an untied model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from torch import nn

from tyingrun.errors import BadInput
from tyingrun.files import read_json
from tyingrun.models.hf_llama import ARCHITECTURES, HF_CONFIG, architecture, read_hf_config, read_hf_weights
from tyingrun.models.llama import Llama

# The keys of the model config that fix the network a Hugging Face Llama folder holds.
LLAMA_ARCHITECTURE = ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "rope_theta", "norm_eps",
                      "qk_norm", "attention_bias", "mlp_bias", "vocab_size")
PRESETS = {(30, 576): "llama_smollm2_135m", (28, 1024): "qwen3_0_6b", (22, 2048): "tinyllama_1_1b"}


def is_llama_folder(folder: Path) -> bool:
    """Whether ``folder``'s config.json is a Llama-family one (whatever of it tyingrun can build)."""
    try:
        kind = read_json(Path(folder) / HF_CONFIG).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return kind in ARCHITECTURES or kind in ("qwen3_moe", "mistral", "mixtral", "qwen2", "olmo", "olmo2")


def _override(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def llama_weights(model: nn.Module, source: Path) -> Dict[str, torch.Tensor]:
    """The folder's weights under tyingrun's names, once its config.json is the network ``model`` is."""
    if not isinstance(model, Llama):
        raise BadInput(f"train.init_from={source} is a Hugging Face Llama-family model; it starts model=llama only")
    theirs, ours = read_hf_config(source), architecture(model)
    differ = [key for key in LLAMA_ARCHITECTURE if getattr(theirs, key) != getattr(ours, key)]
    if differ:
        needed = " ".join(f"model.{key}={_override(getattr(theirs, key))}" for key in differ)
        preset = PRESETS.get((theirs.n_layer, theirs.d_model))
        hint = f" (or model={preset})" if preset else ""
        if "vocab_size" in differ:
            hint += ", and dataset.tokenizer=from_model for the model's own vocabulary"
        raise BadInput(f"train.init_from={source} is a Llama of another shape; set {needed}{hint}")
    return read_hf_weights(source, theirs.tie_embeddings)
