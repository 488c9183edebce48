"""``train.init_from``: start a run from earlier weights instead of a random init.

The source is a tyingrun run folder (its newest checkpoint), a checkpoint folder, a local Hugging Face GPT-2,
Llama or Qwen3 folder (tyingrun.train.hf_import), or ``hf:<repo id>`` (tyingrun.hub).
A checkpoint's saved tying map is applied first, so its ties come back as shared storage; the run's
policy then decides as usual. A head that the source ties to the embedding but the model keeps apart starts as
a copy of the tied matrix; the reverse (two trained matrices into one) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, cast

import torch
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.contracts import TiedModule
from tyingrun.errors import BadInput, warn
from tyingrun.files import CONFIG_FILE, STATE_FILE
from tyingrun.hub import model_folder
from tyingrun.models.embeddings import LM_HEAD_WEIGHT, TokenEmbedding
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.hf_gpt2 import HF_CONFIG, architecture, read_hf_config, read_hf_weights
from tyingrun.models.hf_llama import read_hf_config as read_hf_llama_config
from tyingrun.train.checkpoint import newest_intact_checkpoint, read_state, restore_model
from tyingrun.train.hf_import import is_llama_folder, llama_weights
from tyingrun.tying.weights import copy_weights

# The architecture keys a Hugging Face GPT-2 fixes.
HF_ARCHITECTURE = ("n_layer", "n_head", "d_model", "max_positions", "vocab_size", "bias")


def init_source(path: str) -> Path:
    """The checkpoint folder or Hugging Face folder that ``train.init_from=path`` names."""
    folder = model_folder(path)
    if (folder / HF_CONFIG).is_file() and is_llama_folder(folder):
        read_hf_llama_config(folder)  # a config the block cannot compute is refused before any data is built
    if (folder / STATE_FILE).is_file() or (folder / HF_CONFIG).is_file():
        return folder
    if (folder / CONFIG_FILE).is_file():
        checkpoint = newest_intact_checkpoint(folder)
        if checkpoint is None:
            raise BadInput(f"train.init_from={path} is a run folder without checkpoints; pick a finished run")
        return checkpoint
    raise BadInput(f"train.init_from={path} is neither a tyingrun run or checkpoint folder nor a Hugging Face "
                   f"GPT-2, Llama or Qwen3 folder (config.json + model.safetensors) nor hf:<repo id>")


def check_source_data(source: Path, tokenizer_sha256: Optional[str], dataset: str, allow_other: bool,
                      label: str = "train.init_from") -> None:
    """A checkpoint source must have trained with this run's tokenizer: the same vocabulary size is not enough, an
    embedding row of another tokenizer stands for another token. ``label`` names the setting in the message.
    Checkpoints written before tyingrun recorded it are taken with a warning; Hugging Face folders are GPT-2's."""
    if (source / HF_CONFIG).is_file() or tokenizer_sha256 is None:
        return
    recorded: Dict[str, Any] = read_state(source)[1].get("data") or {}
    theirs = recorded.get("tokenizer_sha256")
    if theirs is None:
        warn(f"{label}={source} records no tokenizer (a checkpoint of an older tyingrun): its vocabulary size "
             f"matches, but that its token ids mean this run's tokens is not checked")
    elif theirs != tokenizer_sha256 and not allow_other:
        raise BadInput(
            f"{label}={source} trained with another tokenizer (dataset={recorded.get('dataset')}, tokenizer sha256 "
            f"{theirs[:12]}) than this run's (dataset={dataset}, {tokenizer_sha256[:12]}), so each embedding row "
            f"would stand for another token; use the source's dataset.* tokenizer settings, or set "
            f"train.allow_other_tokenizer=true if you mean it")


def check_depth(source: Path, source_layers: int, model_layers: int, label: str = "train.init_from") -> None:
    if source_layers != model_layers:
        raise BadInput(f"{label}={source} has {source_layers} layers but model.n_layer={model_layers}; "
                       f"set model.n_layer={source_layers}")


def init_from(model: nn.Module, source: Path) -> None:
    """Load the weights (and, from a checkpoint, the tying map) of ``source`` (see init_source) into ``model``."""
    label = f"train.init_from={source}"
    if (source / HF_CONFIG).is_file():
        weights = (llama_weights(model, source) if is_llama_folder(source)
                   else read_hf_weights(source, _matching_hf_config(model, source).tie_embeddings))
        tokens = cast(TokenEmbedding, model.tokens)  # model.pad_vocab_to's rows, which a Hugging Face folder lacks
        _copy_keeping_head_apart(model, {name: tokens.with_padding(name, t) for name, t in weights.items()}, label)
        return
    _, state = read_state(source)
    check_depth(source, len(state["map"]), len(cast(TiedModule, model).stack))
    # The checkpoint's ties come back under what they shared when it was saved; the model then returns to its
    # own choice, each slot keeping what it computed with.
    own = model.stack.sharing
    restore_model(model, source, state, label, copy=_copy_keeping_head_apart)
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
