"""Hugging Face Llama-family folders (``LlamaForCausalLM``, ``Qwen3ForCausalLM``: ``config.json`` +
``model.safetensors``) to and from tyingrun's Llama.

Only safetensors and JSON are read (no pickle), and ``transformers`` is not needed: the block already names its
tensors as Hugging Face does, so only the prefixes differ, and a tied head is left out of the file (Hugging Face
reads ``lm_head.weight`` as the embedding when ``tie_word_embeddings`` is true).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import save_file

from tyingrun.config import ModelConfig
from tyingrun.errors import BadInput
from tyingrun.files import read_json
from tyingrun.models.embeddings import LM_HEAD_WEIGHT
from tyingrun.models.llama import Llama, head_width, kv_heads, mlp_width
from tyingrun.tying.weights import copy_weights, read_tensors

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# The model types tyingrun's Llama block computes exactly, and the class transformers loads each with.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# (tyingrun prefix, Hugging Face prefix).
NAME_PREFIXES = (
    ("tokens.lm_head.", "lm_head."),
    ("tokens.wte.", "model.embed_tokens."),
    ("stack.blocks.", "model.layers."),
    ("norm.", "model.norm."),
)
# Keys whose value, when set, asks for something the block does not compute: key -> what it must be. (A window size
# alone, sliding_window, is inert: Qwen3 files carry one with use_sliding_window false; layer_types is checked too.)
UNSUPPORTED = {
    "hidden_act": ("silu",),
    "use_sliding_window": (False, None),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "moe_intermediate_size": (None,),
}


def hf_name(name: str) -> str:
    ours, theirs = next((o, t) for o, t in NAME_PREFIXES if name.startswith(o))
    return theirs + name.removeprefix(ours)


def tyingrun_name(name: str) -> str:
    match = next(((o, t) for o, t in NAME_PREFIXES if name.startswith(t)), None)
    if match is None:
        raise BadInput(f"a Llama checkpoint's tensor {name} is not one that LlamaForCausalLM or Qwen3ForCausalLM has")
    return match[0] + name.removeprefix(match[1])


def read_config_json(folder: Path) -> Dict[str, Any]:
    path = Path(folder) / HF_CONFIG
    try:
        return read_json(path)
    except FileNotFoundError:
        raise BadInput(f"{folder} is not a Hugging Face model folder (no {HF_CONFIG})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{path} is not valid JSON") from None


def _refuse(path: Path, key: str, value: Any, needed: str) -> BadInput:
    return BadInput(f"{path}: {key}={json.dumps(value)} is not implemented by tyingrun's Llama block (it needs "
                    f"{needed})")


def _rope_theta(hf: Dict[str, Any], path: Path) -> float:
    """RoPE's base, refusing any rope scaling (newer files: rope_parameters; older: rope_theta + rope_scaling)."""
    parameters = hf.get("rope_parameters") or {}
    key = "rope_parameters" if parameters else "rope_scaling"
    scaling = parameters or hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise _refuse(path, key, scaling, 'no rope scaling: rope_type "default"')
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def read_hf_config(folder: Path) -> ModelConfig:
    """The tyingrun model config of a Hugging Face Llama or Qwen3 folder; one line naming the key it cannot build."""
    path = Path(folder) / HF_CONFIG
    hf = read_config_json(folder)
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise _refuse(path, "model_type", kind, " or ".join(json.dumps(k) for k in ARCHITECTURES))
    for key, allowed in UNSUPPORTED.items():
        if hf.get(key) not in allowed and key in hf:
            raise _refuse(path, key, hf[key], " or ".join(json.dumps(a) for a in allowed))
    layer_types = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if layer_types:
        raise _refuse(path, "layer_types", layer_types[0], 'every layer "full_attention"')
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        name="llama", n_layer=hf["num_hidden_layers"], d_model=width, n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or width // heads,
        d_ff=hf["intermediate_size"], rope_theta=_rope_theta(hf, path), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=kind == "qwen3", attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=kind == "llama" and bool(hf.get("mlp_bias", False)), dropout=float(hf.get("attention_dropout", 0.0)),
        max_positions=hf.get("max_position_embeddings", 2048), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        vocab_size=hf["vocab_size"],
    )


def read_hf_weights(folder: Path, tied: bool) -> Dict[str, torch.Tensor]:
    """The weights of a Hugging Face Llama folder under tyingrun's names (as unique_weights names them)."""
    return {tyingrun_name(name): tensor for name, tensor in read_tensors(Path(folder) / HF_WEIGHTS).items()
            if not (tied and name == "lm_head.weight") and not name.endswith("rotary_emb.inv_freq")}


def from_hf(folder: Path) -> Llama:
    """tyingrun's Llama with the weights of a local Hugging Face folder (every layer slot independent)."""
    cfg = read_hf_config(folder)
    assert cfg.vocab_size is not None  # read_hf_config always sets it
    model = Llama(cfg, cfg.vocab_size)
    copy_weights(model, read_hf_weights(folder, cfg.tie_embeddings), f"Hugging Face model {folder}")
    return model


def architecture(model: Llama) -> ModelConfig:
    """The model config that builds ``model`` as it is now, every derived width spelt out."""
    cfg = model.cfg
    return ModelConfig(
        name="llama", n_layer=len(model.stack), d_model=cfg.d_model, n_head=cfg.n_head, n_kv_head=kv_heads(cfg),
        head_dim=head_width(cfg), d_ff=mlp_width(cfg), rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        dropout=cfg.dropout, max_positions=cfg.max_positions, tie_embeddings=model.tokens.tied,
        vocab_size=model.tokens.vocab_size,
    )


def hf_config(model: Llama) -> Dict[str, Any]:
    """The config.json of ``model``: a Qwen3 when it has QK-norm, else a Llama."""
    cfg = architecture(model)
    kind = "qwen3" if cfg.qk_norm else "llama"
    if cfg.qk_norm and cfg.mlp_bias:
        raise BadInput("model.qk_norm=true with model.mlp_bias=true is neither a Llama (no QK-norm) nor a Qwen3 (no "
                       "MLP biases); transformers has no class that loads it")
    config = {
        "model_type": kind,
        "architectures": [ARCHITECTURES[kind]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.attention_bias,
        "attention_dropout": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
        # tyingrun's own tokenizers have no fixed special ids; a converted model's come from its tokenizer.
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if kind == "llama":
        config["mlp_bias"] = cfg.mlp_bias
    else:
        config.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * cfg.n_layer)
    return config


def hf_weights(model: Llama) -> Dict[str, torch.Tensor]:
    """Every layer slot's weights as Hugging Face names them; tied slots become copies of their roots."""
    return {hf_name(name): model.tokens.without_padding(name, tensor.detach().cpu()).clone(
                memory_format=torch.contiguous_format)
            for name, tensor in model.state_dict().items() if not (name == LM_HEAD_WEIGHT and model.tokens.tied)}


def to_hf(model: Llama, folder: Path) -> None:
    """Write a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_weights(model), str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    (folder / HF_CONFIG).write_text(json.dumps(hf_config(model), indent=2) + "\n")
