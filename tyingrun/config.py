"""Dataclass schemas for every config group, registered in Hydra's ConfigStore, plus cross-field checks.

The YAML files under ``conf/`` pick values; these classes fix the keys and their types, so a misspelt
key or a wrong type is rejected before anything runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from tyingrun.errors import BadInput


@dataclass
class ModelConfig:
    name: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    # Learned positions; a dataset.block_size above this is rejected.
    max_positions: int = 256
    # Input embedding = output projection (language models).
    tie_embeddings: bool = True
    # Parts that never train, whatever the policy decides: layer indices, "embeddings" (every embedding
    # table; with a tied head that is the head too) and "head" (an untied LM head).
    freeze: List[Any] = field(default_factory=list)
    # Vocabulary size; null takes the tokenizer's.
    vocab_size: Optional[int] = None
    # bert: causal attention and next-token labels (the official code's variant) instead of masked-LM.
    causal: bool = False
    # vit: side of the square patches; it must divide the dataset's image size.
    patch_size: int = 4


@dataclass
class DatasetConfig:
    name: str = "pydoc"
    # Tokens per training sequence (language models).
    block_size: int = 128
    # Vocabulary of the tokenizer trained on the corpus (pydoc, text_files).
    vocab_size: int = 4096
    # Share of documents (or images) held out for validation (data without a published split: pydoc, digits).
    val_fraction: float = 0.05
    # Local copy of a hub dataset: a datasets.save_to_disk folder or (text) a folder of raw text files.
    path: Optional[str] = None
    # text_files: .txt files or folders of them.
    files: List[str] = field(default_factory=list)
    # Hugging Face dataset id and configuration (wiki2, 1b, cifar10).
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    # "bpe": byte-level BPE trained on the corpus and cached (model=bert trains WordPiece instead);
    # "wordpiece": BERT's WordPiece trained on the corpus and cached; "gpt2": the GPT-2 tokenizer.
    tokenizer: str = "bpe"
    # A local tokenizer.json to use instead of training or downloading one.
    tokenizer_path: Optional[str] = None
    # Use at most this many documents per split (null: all).
    max_documents: Optional[int] = None
    # Where tokenizers and token ids are cached; null: $TYINGRUN_CACHE or ~/.cache/tyingrun.
    cache_dir: Optional[str] = None
    # Vision training batches: random crop (after padding 4 pixels) and horizontal flip.
    augment: bool = False


@dataclass
class PolicyConfig:
    name: str = "none"
    # Unique layer sets for sequential, cyclic and cycle_rev.
    n_sets: int = 1
    # from_file: an earlier run's summary.json or maps.jsonl.
    path: Optional[str] = None
    # "shared" (gradients of every position summed) or "frozen_copy" (a tied slot passes no weight gradient).
    grad: str = "shared"
    # dynamic_q, random: K optimizer steps follow each decision before it is rewarded.
    steps_per_decision: int = 4
    # dynamic_q, random: layers 1..L-1 stay frozen at their initial weights until first visited.
    freeze_at_init: bool = True
    # dynamic_q, random: "paper" (-batch PPL, clipped at -10), "neg_loss", "improvement" or "param_penalty".
    reward: str = "paper"
    # param_penalty reward: -CE - param_penalty_weight * (trainable layer slots / all layer slots).
    param_penalty_weight: float = 1.0
    # dynamic_q, random: seed of the policy's own RNG and Q-network init; null takes train.seed.
    seed: Optional[int] = None


@dataclass
class HardwareConfig:
    name: str = "auto"
    # "auto" (cuda when present), "cpu" or "cuda".
    device: str = "auto"
    # Autocast dtype on CUDA: "bf16" or "fp32" (no autocast). The CPU always trains in fp32.
    precision: str = "bf16"
    tf32: bool = True
    # torch.compile the training loss: each distinct tying map (and trainable flags) compiles once, up to
    # torch._dynamo's recompile_limit (8) distinct ones; later new ones run eager.
    compile: bool = False
    # Fused AdamW kernel (CUDA only).
    fused_adamw: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    # Linear warmup steps, then cosine decay to min_lr_ratio * lr; "constant" keeps lr after warmup.
    warmup_steps: int = 20
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 50
    # Validation batches per evaluation (null: the whole validation split).
    eval_batches: Optional[int] = 20
    log_interval: int = 10
    # Save a checkpoint every this many steps (0: only at the end); keep the newest keep_checkpoints.
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2
    # A run folder to continue exactly where it stopped (its config is reused; overrides may extend it).
    resume: Optional[str] = None
    # Start from earlier weights: a run folder (its newest checkpoint), a checkpoint folder, or a local
    # Hugging Face GPT-2 folder (config.json + model.safetensors). Ignored when resuming.
    init_from: Optional[str] = None
    # Weight-decay the embedding tables (and so a tied head, once) like other matrices, as nanoGPT does now.
    decay_embeddings: bool = True


@dataclass
class LogConfig:
    # "auto": a rich progress bar on a terminal, plain log lines otherwise; "bar" or "lines" to force one.
    progress: str = "auto"
    wandb: bool = False
    wandb_project: str = "tyingrun"


@dataclass
class Config:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    policy: PolicyConfig = MISSING
    hardware: HardwareConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTION_SCHEMAS = {
    "model": ModelConfig, "dataset": DatasetConfig, "policy": PolicyConfig, "hardware": HardwareConfig,
    "train": TrainConfig, "log": LogConfig,
}

CHOICES = {
    "policy.grad": ("shared", "frozen_copy"),
    # The names of tyingrun.policies.dynamic_q.REWARDS (a test keeps the two equal).
    "policy.reward": ("paper", "neg_loss", "improvement", "param_penalty"),
    "hardware.device": ("auto", "cpu", "cuda"),
    "hardware.precision": ("bf16", "fp32"),
    "train.schedule": ("cosine", "constant"),
    "log.progress": ("auto", "bar", "lines"),
    "dataset.tokenizer": ("bpe", "gpt2", "wordpiece"),
}


def register_configs() -> None:
    """Store the typed schema that ``conf/config.yaml`` extends, so every group and section is validated."""
    ConfigStore.instance().store(name="base_config", node=Config)


def unknown_key_message(full_key: str) -> str:
    """Name the unknown key, the closest known one, and every key its section accepts."""
    section = full_key.split(".")[0]
    if section not in SECTION_SCHEMAS:
        return f"unknown config key {full_key}; the sections are: {', '.join(SECTION_SCHEMAS)}"
    names = [f.name for f in fields(SECTION_SCHEMAS[section])]
    close = difflib.get_close_matches(full_key, [f"{section}.{name}" for name in names], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown config key {full_key}; {hint}{section} accepts: {', '.join(names)}"


def reject_unknown_keys(cfg: DictConfig) -> None:
    """``+key=value`` can add keys that no schema declares; refuse them instead of silently ignoring them."""
    for section in cfg:
        declared = {f.name for f in fields(SECTION_SCHEMAS[section])} if section in SECTION_SCHEMAS else set()
        unknown = [key for key in cfg[section] if key not in declared] if declared else [""]
        if unknown:
            raise BadInput(unknown_key_message(f"{section}.{unknown[0]}".rstrip(".")))


def check(cfg: Config) -> None:
    """Cross-field checks that a schema cannot express; raise BadInput naming the key and the fix."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise BadInput(f"{key}={value!r} is not an option; choose one of: {', '.join(allowed)}")
    m, d, t = cfg.model, cfg.dataset, cfg.train
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.d_model": m.d_model,
        "model.patch_size": m.patch_size, "dataset.block_size": d.block_size, "train.batch_size": t.batch_size,
        "train.max_steps": t.max_steps,
        "train.eval_interval": t.eval_interval, "train.log_interval": t.log_interval,
    }
    for key, value in positive.items():
        if value < 1:
            raise BadInput(f"{key}={value} must be at least 1")
    if m.d_model % m.n_head:
        raise BadInput(f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}; pick a divisor of it")
    if d.block_size > m.max_positions:
        raise BadInput(
            f"dataset.block_size={d.block_size} exceeds the model's {m.max_positions} positions; "
            f"lower dataset.block_size or raise model.max_positions"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise BadInput(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < d.val_fraction < 1.0:
        raise BadInput(f"dataset.val_fraction={d.val_fraction} must be between 0 and 1")
    check_freeze(m)


FREEZE_PARTS = ("embeddings", "head")


def check_freeze(m: ModelConfig) -> None:
    for part in m.freeze:
        if isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < m.n_layer:
                raise BadInput(f"model.freeze: there is no layer {part}; model.n_layer={m.n_layer} has layers "
                               f"0..{m.n_layer - 1}")
        elif part not in FREEZE_PARTS:
            raise BadInput(f"model.freeze: {part!r} is not a part; give layer indices, embeddings or head")
        elif m.name == "vit":
            raise BadInput(f"model.freeze: model=vit has no token embedding or LM head ({part}); freeze layer "
                           f"indices instead")
        elif part == "head" and m.tie_embeddings:
            raise BadInput("model.freeze: the head is tied, so it is the token embedding matrix itself; freeze "
                           "embeddings (which freezes both), or set model.tie_embeddings=false to freeze it alone")
