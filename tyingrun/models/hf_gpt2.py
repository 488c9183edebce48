"""Hugging Face GPT-2 folders (``config.json`` + ``model.safetensors``) to and from tyingrun's GPT-2.

Only safetensors and JSON are read (no pickle), and ``transformers`` is not needed: the two formats differ in
tensor names, in the feature-last layout of GPT-2's Conv1D weights, and in how a tied head is stored
(Hugging Face leaves ``lm_head.weight`` out when ``tie_word_embeddings`` is true).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple, cast

import torch
from safetensors.torch import save_file
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.errors import BadInput
from tyingrun.files import read_json
from tyingrun.models.blocks import PreLNBlock
from tyingrun.models.embeddings import LM_HEAD_WEIGHT
from tyingrun.models.gpt2 import GPT2
from tyingrun.tying.weights import copy_weights, read_tensors

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# (tyingrun prefix, Hugging Face prefix), tried in order in either direction; the last one catches the rest.
NAME_PREFIXES = (
    ("tokens.lm_head.", "lm_head."),
    ("tokens.wte.", "transformer.wte."),
    ("stack.blocks.", "transformer.h."),
    ("", "transformer."),
)
# GPT-2's Conv1D weights are stored [in, out]; nn.Linear keeps [out, in].
CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# Causal-mask buffers that older GPT-2 files carry; tyingrun's attention builds the mask itself.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def hf_name(name: str) -> str:
    ours, theirs = next((o, t) for o, t in NAME_PREFIXES if name.startswith(o))
    return theirs + name.removeprefix(ours)


def tyingrun_name(name: str) -> str:
    if not name.startswith(tuple(theirs for _, theirs in NAME_PREFIXES)):
        name = "transformer." + name  # files saved from GPT2Model (e.g. the hub's "gpt2") have no prefix
    ours, theirs = next((o, t) for o, t in NAME_PREFIXES if name.startswith(t))
    return ours + name.removeprefix(theirs)


def read_hf_config(folder: Path) -> Tuple[ModelConfig, float]:
    """The tyingrun model config of a Hugging Face GPT-2 folder, and its LayerNorm epsilon."""
    path = Path(folder) / HF_CONFIG
    try:
        hf = read_json(path)
    except FileNotFoundError:
        raise BadInput(f"{folder} is not a Hugging Face model folder (no {HF_CONFIG})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{path} is not valid JSON") from None
    n_embd = hf.get("n_embd", 768)
    for key, default, allowed in (
        ("model_type", "gpt2", ("gpt2",)),
        ("activation_function", "gelu_new", TANH_GELU),
        ("n_inner", None, (None, 4 * n_embd)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("add_cross_attention", False, (False,)),
    ):
        value = hf.get(key, default)
        if value not in allowed:
            raise BadInput(f"{path}: {key}={json.dumps(value)} is not a GPT-2 that tyingrun builds "
                           f"(it needs {' or '.join(json.dumps(a) for a in allowed)})")
    cfg = ModelConfig(
        name="gpt2", n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), d_model=n_embd,
        dropout=hf.get("resid_pdrop", 0.1), bias=True, max_positions=hf.get("n_positions", 1024),
        tie_embeddings=hf.get("tie_word_embeddings", True), vocab_size=hf.get("vocab_size", 50257),
    )
    return cfg, hf.get("layer_norm_epsilon", 1e-5)


def read_hf_weights(folder: Path, tied: bool) -> Dict[str, torch.Tensor]:
    """The weights of a Hugging Face GPT-2 folder under tyingrun's names and layout (as unique_weights names them)."""
    weights = {}
    for name, tensor in read_tensors(Path(folder) / HF_WEIGHTS).items():
        if name.endswith(MASK_BUFFERS) or (tied and name == "lm_head.weight"):
            continue
        weights[tyingrun_name(name)] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    return weights


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


def from_hf(folder: Path) -> GPT2:
    """tyingrun's GPT-2 with the weights of a local Hugging Face GPT-2 folder (every layer slot independent)."""
    cfg, eps = read_hf_config(folder)
    assert cfg.vocab_size is not None  # read_hf_config always sets it
    model = GPT2(cfg, cfg.vocab_size)
    set_layer_norm_eps(model, eps)
    copy_weights(model, read_hf_weights(folder, cfg.tie_embeddings), f"Hugging Face model {folder}")
    return model


def hf_weights(model: GPT2) -> Dict[str, torch.Tensor]:
    """Every layer slot's weights as Hugging Face names them; tied slots become copies of their roots."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == LM_HEAD_WEIGHT and model.tokens.tied:
            continue
        value = model.tokens.without_padding(name, tensor.detach().cpu())
        weights[hf_name(name)] = (value.t() if name.endswith(CONV1D_WEIGHTS) else value).clone(
            memory_format=torch.contiguous_format)
    # Hugging Face's GPT-2 always has biases; model.bias=false is the same network with zero biases.
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and module is not model.tokens.lm_head:
            weights[hf_name(f"{name}.bias")] = torch.zeros(module.weight.shape[0])
    return weights


def architecture(model: GPT2) -> ModelConfig:
    """The model config that builds ``model`` as it is now (its vocabulary size and embedding tie included)."""
    return ModelConfig(
        name="gpt2", n_layer=len(model.stack), n_head=cast(PreLNBlock, model.stack.blocks[0]).attn.n_head,
        d_model=model.wpe.embedding_dim, dropout=model.drop.p, bias=model.ln_f.bias is not None,
        max_positions=model.wpe.num_embeddings, tie_embeddings=model.tokens.tied,
        vocab_size=model.tokens.vocab_size,
    )


def to_hf(model: GPT2, folder: Path) -> None:
    """Write a folder that ``transformers.GPT2LMHeadModel.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = architecture(model)
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_positions,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model.ln_f.eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        # tyingrun's tokenizers have no GPT-2 <|endoftext|> id; left unset rather than pointing outside the vocab.
        "bos_token_id": None,
        "eos_token_id": None,
    }
    save_file(hf_weights(model), str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    (folder / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
