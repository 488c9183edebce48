"""The one place that wires a config into data, model, policy, trainer and sinks, and writes the summary."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from tyingrun import config as config_module
from tyingrun.config import Config, HardwareConfig, ModelConfig
from tyingrun.data.lm import build_lm_data
from tyingrun.errors import BadInput
from tyingrun.metrics.meters import peak_memory, reset_peak_memory
from tyingrun.metrics.sinks import ConsoleSink, RunSinks, WandbSink
from tyingrun.models.gpt2 import GPT2
from tyingrun.policies import build_policy
from tyingrun.train.trainer import Trainer
from tyingrun.tying.counts import total_params

# Each model is built from its config section, the data it will train on, and the gradient mode.
MODELS = {
    "gpt2": lambda cfg, data, grad_mode: GPT2(cfg, cfg.vocab_size or data.vocab_size, grad_mode),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(hardware: HardwareConfig) -> torch.device:
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("hardware asks for CUDA but no GPU is visible; use hardware=cpu (or hardware=auto)")
    if hardware.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(hardware.device)


def configure_backends(hardware: HardwareConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = hardware.tf32
        torch.backends.cudnn.allow_tf32 = hardware.tf32


def build_data(cfg: Config):
    return build_lm_data(cfg.dataset)


def build_model(model_cfg: ModelConfig, data, grad_mode: str) -> nn.Module:
    if model_cfg.name not in MODELS:
        raise BadInput(f"model.name={model_cfg.name!r} is not a model; choose one of: {', '.join(MODELS)}")
    vocab_size = getattr(data, "vocab_size", None)
    if model_cfg.vocab_size is not None and vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise BadInput(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"remove the override or raise it"
        )
    return MODELS[model_cfg.name](model_cfg, data, grad_mode)


def run(cfg: Config, out_dir: Path) -> Dict[str, Any]:
    """Train one model under one policy; write metrics.jsonl, maps.jsonl and, when it completes, summary.json."""
    config_module.check(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = build_policy(cfg.policy, cfg.model.n_layer, cfg.train.seed)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.hardware)
    configure_backends(cfg.hardware, device)
    data = build_data(cfg)
    model = build_model(cfg.model, data, cfg.policy.grad).to(device)
    console = ConsoleSink(cfg.log.progress, cfg.train.max_steps)
    wandb = WandbSink(cfg.log.wandb_project, asdict(cfg), out_dir) if cfg.log.wandb else None
    sinks = RunSinks(out_dir, console, wandb)
    try:
        console.line(
            f"{cfg.model.name} {cfg.model.n_layer}x{cfg.model.d_model}, {total_params(model):,} parameters untied; "
            f"dataset {cfg.dataset.name}: {data.describe()}; policy {cfg.policy.name}; device {device}"
        )
        console.line(f"run folder {out_dir}")
        reset_peak_memory(device)
        measured = Trainer(cfg, model, model.stack, data, policy, device, sinks).fit()
        memory_bytes, memory_kind = peak_memory(device)
        summary = {
            "status": "completed",
            "model": cfg.model.name,
            "dataset": cfg.dataset.name,
            "policy": cfg.policy.name,
            "grad_mode": cfg.policy.grad,
            "steps": cfg.train.max_steps,
            "n_layer": cfg.model.n_layer,
            "total_params": total_params(model),
            **measured,
            "peak_memory_bytes": memory_bytes,
            "peak_memory_kind": memory_kind,
            "seed": cfg.train.seed,
        }
        sinks.summary(summary)
        console.close()
        console.table("summary", summary)
        console.line(f"summary written to {out_dir / 'summary.json'}")
    finally:
        sinks.close()
    return summary
