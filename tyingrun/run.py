"""The one place that wires a config into data, model, policy, trainer and sinks, and writes the summary."""

from __future__ import annotations

import math
import os
import random
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple, cast

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tyingrun.config import Config, HardwareConfig, ModelConfig
from tyingrun.contracts import Sink, TiedModule, TrainingData
from tyingrun.data.build import build_dataset
from tyingrun.data.tokenizer import with_model_tokenizer
from tyingrun.errors import BadInput
from tyingrun.files import (
    CONFIG_FILE,
    CONVERSION_FILE,
    MAPS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    read_json,
    write_json_atomic,
)
from tyingrun.metrics.memory import peak_memory, reset_peak_memory
from tyingrun.metrics.sinks import ConsoleSink, RankSinks, RunSinks, WandbSink, decided_before, logged_by, resumed_lines
from tyingrun.models import MODELS
from tyingrun.overrides import hydra_value
from tyingrun.policies import build_policy, stack_sharing
from tyingrun.policies.base import Policy
from tyingrun.preflight import preflight
from tyingrun.run_status import LAUNCH_COMMAND_ENV, write_status
from tyingrun.seeding import derive_seed
from tyingrun.summary import Summary
from tyingrun.train import looped, recursive
from tyingrun.train.checkpoint import checkpoint_step, newest_intact_checkpoint, read_state, restore_model
from tyingrun.train.distributed import SINGLE, Mesh, barrier, mesh_for
from tyingrun.train.freeze import freeze_tensors
from tyingrun.train.fsdp import shard_model
from tyingrun.train.init_from import check_source_data, init_from, init_source
from tyingrun.train.signals import RunInterrupted, StopSignals
from tyingrun.train.summary import run_summary
from tyingrun.train.trainer import Trainer
from tyingrun.tying.counts import total_params
from tyingrun.tying.weights import read_tensors


def seed_stream(seed: int, name: str, *keys: int) -> None:
    """Seed the global RNGs (python, numpy, torch) from one named stream of the run's seed."""
    derived = derive_seed(seed, name, *keys)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


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


def load_run_config(run_dir: Path) -> Config:
    """The typed config a finished (or stopped) run folder was trained with."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise BadInput(f"{run_dir} is not a tyingrun run folder (no {CONFIG_FILE})")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path)))
    except OmegaConfBaseException as err:
        raise BadInput(f"{path} does not fit this tyingrun's config ({' '.join(str(err).split())})") from None


def build_data(cfg: Config) -> TrainingData:
    """The data the model trains on (the preflight has checked that the two suit each other)."""
    data = build_dataset(with_model_tokenizer(cfg.dataset, cfg.train.init_from), cfg.model, seed=cfg.train.seed)
    return cast(TrainingData, data)


def build_model(model_cfg: ModelConfig, data: Optional[TrainingData], grad_mode: str, share: str = "block",
                share_norms: bool = False) -> TiedModule:
    """The model, its TiedStack set to ``grad_mode`` and to what a tie shares (policy.share, policy.share_norms)."""
    vocab_size = getattr(data, "vocab_size", None)
    if model_cfg.vocab_size is not None and vocab_size is not None and model_cfg.vocab_size < vocab_size:
        raise BadInput(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"remove the override or raise it"
        )
    model = MODELS[model_cfg.name].build(model_cfg, data, grad_mode)
    model.stack.set_sharing(share, share_norms)
    return model


def prepare_policy_tensors(model: TiedModule, cfg: Config) -> None:
    """The tensors a policy adds to a built model (policy=recursive's LoRA; policy=looped's loop control and per-loop
    tensors), so that a checkpoint of it loads back."""
    recursive.prepare(model, cfg.policy)
    looped.prepare(model.stack, cfg)


def checkpoint_shapes(stored: Dict[str, torch.Tensor], checkpoint: Path) -> SimpleNamespace:
    """What a model builder reads from its data (vocabulary; image size, channels, classes), from saved weights."""
    if "tokens.wte.weight" in stored:
        return SimpleNamespace(vocab_size=len(stored["tokens.wte.weight"]))
    if {"patches.weight", "positions", "head.weight"} <= set(stored):
        _, channels, patch, _ = stored["patches.weight"].shape
        side = math.isqrt(stored["positions"].shape[1] - 1)
        return SimpleNamespace(image_size=side * patch, channels=channels, n_classes=len(stored["head.weight"]))
    raise BadInput(f"checkpoint {checkpoint} holds neither a token embedding nor a patch embedding; it is not "
                   f"of a tyingrun model")


def load_checkpointed_model(run_dir: Path, purpose: str) -> Tuple[Config, Path, TiedModule, Dict[str, Any]]:
    """A run's config, newest checkpoint, model as that checkpoint left it (map, flags, weights; no data is built)
    and the checkpoint's state, for tools that read finished runs (``purpose``: what they do, for the message)."""
    cfg = load_run_config(run_dir)
    checkpoint = newest_intact_checkpoint(run_dir)
    if checkpoint is None:
        raise BadInput(f"{run_dir} has no checkpoint to {purpose}; let the run finish (or resume it) first")
    shapes = checkpoint_shapes(read_tensors(checkpoint / WEIGHTS_FILE), checkpoint)
    _, state = read_state(checkpoint)
    # The vocabulary without model.pad_vocab_to's padding rows, which the stored weights include.
    vocab_size = state.get("vocab_size") or getattr(shapes, "vocab_size", cfg.model.vocab_size)
    model_cfg = replace(cfg.model, vocab_size=vocab_size)
    model = build_model(model_cfg, shapes, cfg.policy.grad, *stack_sharing(cfg.policy))
    prepare_policy_tensors(model, cfg)
    freeze_tensors(model, cfg.model.freeze)
    restore_model(model, checkpoint, state)
    return cfg, checkpoint, model, state


def check_config(cfg: Config) -> None:
    """Every check of ``cfg`` that needs no data and no device (the preflight)."""
    preflight(cfg)


def resume_argument(out_dir: Path) -> str:
    """The ``train.resume=...`` argument that continues the run in ``out_dir``, quoted for a POSIX shell."""
    return shlex.quote(f"train.resume={hydra_value(str(out_dir))}")


def resume_command(out_dir: Path) -> str:
    """The whole command that continues the run in ``out_dir``, as this run was launched."""
    return f"{os.environ.get(LAUNCH_COMMAND_ENV, 'tyingrun')} {resume_argument(out_dir)}"


def resume_point(run_dir: str, out_dir: Path) -> Path:
    """The newest checkpoint of the run folder that ``train.resume`` names, which must be this run's folder."""
    folder = Path(run_dir).expanduser()
    if not (folder / CONFIG_FILE).is_file():
        raise BadInput(f"train.resume={run_dir} is not a tyingrun run folder (no {CONFIG_FILE}); "
                       f"give the folder a run printed as 'run folder ...'")
    if folder.resolve() != out_dir.resolve():
        raise BadInput(f"train.resume={run_dir} continues that run in its own folder, not in {out_dir}; "
                       f"drop hydra.run.dir")
    checkpoint = newest_intact_checkpoint(folder)
    if checkpoint is None:
        raise BadInput(f"train.resume={run_dir} has no checkpoint to resume from; start the run afresh")
    # Everything the resume reads is read once here, before anything in the folder is touched.
    step, _ = read_state(checkpoint)
    read_tensors(checkpoint / WEIGHTS_FILE)
    for name, rule in ((METRICS_FILE, logged_by), (MAPS_FILE, decided_before)):
        resumed_lines(folder / name, step, rule, warn_dropped=False)
    return checkpoint


def build_sinks(cfg: Config, out_dir: Path, mesh: Mesh, resume_step: Optional[int]) -> Sink:
    """Rank 0 records the run (and wandb when asked); other ranks record only the maps they applied."""
    # Rank 0 claimed the folder (RunFolder) before it built anything; no rank writes into it before that.
    barrier()
    if not mesh.is_main:
        return RankSinks(out_dir, mesh.rank, resume_step)
    console = ConsoleSink(cfg.log.progress, cfg.train.max_steps)
    wandb = WandbSink(cfg.log.wandb_project, asdict(cfg), out_dir) if cfg.log.wandb else None
    return RunSinks(out_dir, console, wandb, resume_step)


@dataclass
class RunParts:
    """Everything a run is built from, before anything is written to its folder."""

    cfg: Config
    out_dir: Path
    mesh: Mesh
    device: torch.device
    data: TrainingData
    model: TiedModule
    policy: Policy
    checkpoint: Optional[Path]  # the checkpoint a resumed run continues from
    conversion: Optional[Dict[str, Any]] = None  # policy=recursive: what the conversion did (a new run only)
    source_model: Optional[TiedModule] = None  # policy=recursive: the source, measured beside the converted model


def build_parts(cfg: Config, out_dir: Path, data: Optional[TrainingData] = None) -> RunParts:
    """Check everything, then build data (unless given, already built from ``cfg``), model and policy; nothing
    is written yet."""
    mesh = mesh_for(cfg.hardware.data_parallel, cfg.hardware.device, "fsdp" if cfg.hardware.fsdp else "ddp")
    preflight(cfg, mesh.world_size)
    if cfg.log.wandb:
        WandbSink.require_login()
    checkpoint = resume_point(cfg.train.resume, out_dir) if cfg.train.resume else None
    # A resumed run's own checkpoint holds its weights; init_from only starts a new run.
    start = init_source(cfg.train.init_from) if cfg.train.init_from and checkpoint is None else None
    policy = build_policy(cfg.policy, cfg.model.n_layer, cfg.train.seed)
    device = resolve_device(cfg.hardware, mesh)
    configure_backends(cfg.hardware, device)
    data = build_data(cfg) if data is None else data
    seed_stream(cfg.train.seed, "init")
    model = build_model(cfg.model, data, cfg.policy.grad, *stack_sharing(cfg.policy))
    prepare_policy_tensors(model, cfg)
    model = model.to(device)
    conversion, source_model = None, None
    if start is not None and cfg.policy.name == "recursive":
        conversion, source_model = recursive.convert(model, start, cfg.policy)
    elif start is not None:
        init_from(model, start)
    if start is not None:
        label = "policy=recursive: train.init_from" if cfg.policy.name == "recursive" else "train.init_from"
        check_source_data(start, data.tokenizer_sha256, cfg.dataset.name, cfg.train.allow_other_tokenizer, label)
    if cfg.hardware.fsdp:
        shard_model(model, cfg.hardware, device)
    # What the global RNGs draw from now on is dropout: a stream of its own on every rank.
    seed_stream(cfg.train.seed, "dropout", mesh.rank)
    return RunParts(cfg, out_dir, mesh, device, data, model, policy, checkpoint, conversion, source_model)


def converted_losses(trainer: Trainer, parts: RunParts) -> Dict[str, Any]:
    """policy=recursive: what the conversion did, and the val and test loss of the source and of the converted
    model before any training step, over the whole splits as the final evaluation scores them (so the conversion's
    own cost is ``converted_test_loss - source_test_loss``)."""
    losses = {}
    for name, model in (("source", parts.source_model), ("converted", parts.model)):
        for split in ("val", "test"):
            losses[f"{name}_{split}_loss"] = trainer.evaluator.evaluate(split, None, model)[f"{split}_loss"]
    parts.model.train()
    parts.source_model = None
    return {"conversion": parts.conversion, **losses}


def execute(parts: RunParts) -> Summary:
    """Train the built parts; write metrics.jsonl, maps.jsonl and, when the run completes, summary.json. From
    the first line on, a stop signal stops the run after its next step, checkpointed."""
    with StopSignals() as signals:
        return train_and_record(parts, signals)


def train_and_record(parts: RunParts, signals: StopSignals) -> Summary:
    cfg, out_dir, mesh, device, model = parts.cfg, parts.out_dir, parts.mesh, parts.device, parts.model
    if parts.checkpoint is not None:
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks = build_sinks(cfg, out_dir, mesh, checkpoint_step(parts.checkpoint) if parts.checkpoint else None)
    console = sinks.console
    try:
        console.line(
            f"{cfg.model.name} {cfg.model.n_layer}x{cfg.model.d_model}, {total_params(model):,} parameters untied; "
            f"dataset {cfg.dataset.name}: {parts.data.describe()}; policy {cfg.policy.name}; device {device}"
        )
        console.line(f"run folder {out_dir}" + (f"; {mesh.world_size} data-parallel ranks" if mesh.distributed else ""))
        reset_peak_memory(device)
        trainer = Trainer(cfg, model, model.stack, parts.data, parts.policy, device, sinks, mesh)
        converted: Dict[str, Any] = {}
        if parts.conversion is not None:
            converted = converted_losses(trainer, parts)
            if mesh.is_main:
                write_json_atomic(out_dir / CONVERSION_FILE, converted)
        elif parts.checkpoint is not None and (out_dir / CONVERSION_FILE).is_file():
            converted = read_json(out_dir / CONVERSION_FILE)  # a resumed conversion reports its start too
        try:
            measured = trainer.fit(resume_from=parts.checkpoint, signals=signals)
        except RunInterrupted as stop:
            console.close()
            if mesh.is_main:
                resume = resume_command(out_dir)
                write_status(out_dir, "stopped", error=str(stop), exit_code=stop.exit_code, resume=resume)
                sys.stderr.write(f"tyingrun: {stop}; checkpoint saved, resume with: {resume}\n")
            raise SystemExit(stop.exit_code) from None
        summary = run_summary(cfg, model, measured, converted, peak_memory(device))
        sinks.summary(dict(summary))
        console.close()
        console.table("summary", dict(summary))
        console.line(f"summary written to {out_dir / SUMMARY_FILE}")
    finally:
        sinks.close()
    return summary


def run(cfg: Config, out_dir: Path) -> Summary:
    """Train one model under one policy into ``out_dir``: check, build, then execute."""
    return execute(build_parts(cfg, out_dir))
