"""The one place that wires a config into data, model, policy, trainer and sinks, and writes the summary."""

from __future__ import annotations

import random
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from tyingrun import config as config_module
from tyingrun.config import Config, HardwareConfig, ModelConfig
from tyingrun.data.lm import build_lm_data
from tyingrun.data.vision import build_vision_data
from tyingrun.errors import BadInput
from tyingrun.metrics.meters import peak_memory, reset_peak_memory
from tyingrun.metrics.sinks import ConsoleSink, RankSinks, RunSinks, WandbSink
from tyingrun.models.bert import BERT
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.vit import ViT
from tyingrun.policies import build_policy
from tyingrun.train.checkpoint import checkpoint_step, latest_checkpoint
from tyingrun.train.distributed import SINGLE, Mesh, mesh_for
from tyingrun.train.init_from import init_from, init_source
from tyingrun.train.signals import RunInterrupted
from tyingrun.train.trainer import Trainer
from tyingrun.tying.counts import total_params


def _vit(cfg: ModelConfig, data, grad_mode: str) -> ViT:
    if data.image_size % cfg.patch_size:
        raise BadInput(
            f"model.patch_size={cfg.patch_size} does not divide the dataset's {data.image_size}-pixel images; "
            f"pick a divisor of {data.image_size}"
        )
    return ViT(cfg, data.image_size, data.channels, data.n_classes, grad_mode)


# Each model is built from its config section, the data it will train on, and the gradient mode.
MODELS = {
    "gpt2": lambda cfg, data, grad_mode: GPT2(cfg, cfg.vocab_size or data.vocab_size, grad_mode),
    "bert": lambda cfg, data, grad_mode: BERT(cfg, cfg.vocab_size or data.vocab_size, grad_mode),
    "vit": _vit,
}
# The kind of data each model trains on ("lm": token blocks, "vision": labelled images), and the datasets of each.
MODEL_TASKS = {"gpt2": GPT2.task, "bert": BERT.task, "vit": ViT.task}
DATASETS = {"lm": ("pydoc", "wiki2", "1b", "text_files"), "vision": ("cifar10", "digits")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(hardware: HardwareConfig, mesh: Mesh = SINGLE) -> torch.device:
    """The device of this process: under data parallelism on GPUs, the GPU of its local rank."""
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("hardware asks for CUDA but no GPU is visible; use hardware=cpu (or hardware=auto)")
    use_cuda = hardware.device == "cuda" or (hardware.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda", mesh.local_rank) if use_cuda else torch.device("cpu")


def configure_backends(hardware: HardwareConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = hardware.tf32
        torch.backends.cudnn.allow_tf32 = hardware.tf32


def check_model_name(model_cfg: ModelConfig) -> None:
    if model_cfg.name not in MODELS:
        raise BadInput(f"model.name={model_cfg.name!r} is not a model; choose one of: {', '.join(MODELS)}")


def build_data(cfg: Config):
    """The data the model trains on; a dataset of the wrong kind is refused before anything is loaded."""
    check_model_name(cfg.model)
    task = MODEL_TASKS[cfg.model.name]
    if cfg.dataset.name not in DATASETS[task]:
        known = [name for names in DATASETS.values() for name in names]
        problem = "is not a dataset" if cfg.dataset.name not in known else f"does not suit model={cfg.model.name}"
        suitable = ", ".join(DATASETS[task])
        raise BadInput(f"dataset={cfg.dataset.name} {problem}; model={cfg.model.name} trains on one of: {suitable}")
    if task == "vision":
        return build_vision_data(cfg.dataset)
    bert = cfg.model.name == "bert"
    dataset = cfg.dataset
    if bert and dataset.tokenizer == "bpe":
        # BERT's own WordPiece replaces the default; a tokenizer the user names (gpt2, tokenizer_path) is kept.
        dataset = replace(dataset, tokenizer="wordpiece")
    return build_lm_data(dataset, masked_lm=bert and not cfg.model.causal)


def build_model(model_cfg: ModelConfig, data, grad_mode: str) -> nn.Module:
    check_model_name(model_cfg)
    vocab_size = getattr(data, "vocab_size", None)
    if model_cfg.vocab_size is not None and vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise BadInput(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"remove the override or raise it"
        )
    return MODELS[model_cfg.name](model_cfg, data, grad_mode)


def resume_point(run_dir: str) -> Path:
    """The newest checkpoint of an earlier run folder."""
    folder = Path(run_dir).expanduser()
    if not (folder / ".hydra" / "config.yaml").is_file():
        raise BadInput(f"train.resume={run_dir} is not a tyingrun run folder (no .hydra/config.yaml); "
                       f"give the folder a run printed as 'run folder ...'")
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise BadInput(f"train.resume={run_dir} has no checkpoint to resume from; start the run afresh")
    return checkpoint


def build_sinks(cfg: Config, out_dir: Path, mesh: Mesh, resume_step: Optional[int]):
    """Rank 0 records the run (and wandb when asked); other ranks record only the maps they applied."""
    if not mesh.is_main:
        return RankSinks(out_dir, mesh.rank, resume_step)
    console = ConsoleSink(cfg.log.progress, cfg.train.max_steps)
    wandb = WandbSink(cfg.log.wandb_project, asdict(cfg), out_dir) if cfg.log.wandb else None
    return RunSinks(out_dir, console, wandb, resume_step)


def run(cfg: Config, out_dir: Path) -> Dict[str, Any]:
    """Train one model under one policy; write metrics.jsonl, maps.jsonl and, when it completes, summary.json."""
    config_module.check(cfg)
    if cfg.log.wandb:
        WandbSink.require_login()
    checkpoint = resume_point(cfg.train.resume) if cfg.train.resume else None
    # A resumed run's own checkpoint holds its weights; init_from only starts a new run.
    start = init_source(cfg.train.init_from) if cfg.train.init_from and checkpoint is None else None
    if checkpoint is not None:
        out_dir = checkpoint.parent.parent
        (out_dir / "summary.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = build_policy(cfg.policy, cfg.model.n_layer, cfg.train.seed)
    mesh = mesh_for(cfg.hardware.name, cfg.hardware.device)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.hardware, mesh)
    configure_backends(cfg.hardware, device)
    data = build_data(cfg)
    model = build_model(cfg.model, data, cfg.policy.grad).to(device)
    if start is not None:
        init_from(model, start)
    sinks = build_sinks(cfg, out_dir, mesh, checkpoint_step(checkpoint) if checkpoint else None)
    console = sinks.console
    try:
        console.line(
            f"{cfg.model.name} {cfg.model.n_layer}x{cfg.model.d_model}, {total_params(model):,} parameters untied; "
            f"dataset {cfg.dataset.name}: {data.describe()}; policy {cfg.policy.name}; device {device}"
        )
        console.line(f"run folder {out_dir}" + (f"; {mesh.world_size} data-parallel ranks" if mesh.distributed else ""))
        reset_peak_memory(device)
        trainer = Trainer(cfg, model, model.stack, data, policy, device, sinks, mesh)
        try:
            measured = trainer.fit(resume_from=checkpoint)
        except RunInterrupted as stop:
            console.close()
            if mesh.is_main:
                sys.stderr.write(f"tyingrun: {stop}; checkpoint saved, resume with: tyingrun train.resume={out_dir}\n")
            raise SystemExit(stop.exit_code) from None
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
