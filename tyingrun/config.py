"""Dataclass schemas for every config group, registered in Hydra's ConfigStore, plus cross-field checks.

The YAML files under ``conf/`` pick values; these classes fix the keys and their types, so a misspelt
key or a wrong type is rejected before anything runs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, TypeVar

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
    # Round the embedding and head rows up to a multiple of this (64: 50,257 -> 50,304, faster matrix kernels);
    # the padding rows get -inf logits, are left out of parameter counts and trimmed by tyingrun-export. 1: none.
    pad_vocab_to: int = 1
    # bert: causal attention and next-token labels (the official code's variant) instead of masked-LM.
    causal: bool = False
    # vit: side of the square patches; it must divide the dataset's image size.
    patch_size: int = 4
    # llama (docs/llama.md): key/value heads of grouped-query attention (null: n_head; it must divide n_head),
    # width of one head (null: d_model / n_head), the SwiGLU MLP's hidden width (null: 4 * d_model), RoPE's base,
    # RMSNorm's epsilon, a per-head RMSNorm of queries and keys before RoPE (Qwen3), and biases on the four attention
    # projections and on the MLP's three matrices (model.bias is GPT-2's, BERT's and ViT's).
    n_kv_head: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass
class DatasetConfig:
    name: str = "pydoc"
    # Tokens per training sequence (language models).
    block_size: int = 128
    # Vocabulary of the tokenizer trained on the corpus (pydoc, text_files).
    vocab_size: int = 4096
    # Share of documents (or images) held out for validation where the data publishes no validation split
    # (pydoc, text_files, digits; 1b and cifar10 carve it from their training split).
    val_fraction: float = 0.05
    # Share held out for the final test where the data publishes no test split (pydoc, text_files, digits).
    test_fraction: float = 0.05
    # wiki2: "raw" (wikitext-2-raw-v1) or "v1" (wikitext-2-v1, tokenised with <unk>, as the paper's code used).
    # An explicit dataset.hf_config wins; other datasets ignore it.
    variant: str = "raw"
    # Local copy of a hub dataset: a datasets.save_to_disk folder or (text) a folder of raw text files.
    path: Optional[str] = None
    # text_files: .txt files or folders of them.
    files: List[str] = field(default_factory=list)
    # Hugging Face dataset id and configuration (wiki2, 1b, cifar10).
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    # Hub revision (branch, tag or commit) of dataset.hf_name; null: the default dataset's own (1b: its
    # auto-converted parquet branch refs/convert/parquet, since current `datasets` loads no scripts), else main.
    hf_revision: Optional[str] = None
    # "bpe": byte-level BPE trained on the corpus and cached (model=bert trains WordPiece instead);
    # "wordpiece": BERT's WordPiece trained on the corpus and cached; "gpt2": the GPT-2 tokenizer; "from_model": the
    # tokenizer.json of the Hugging Face model that train.init_from names (docs/llama.md).
    tokenizer: str = "bpe"
    # A local tokenizer.json to use instead of training or downloading one.
    tokenizer_path: Optional[str] = None
    # Use at most this many documents per split (null: all).
    max_documents: Optional[int] = None
    # Where tokenizers and token ids are cached; null: $TYINGRUN_CACHE or ~/.cache/tyingrun.
    cache_dir: Optional[str] = None
    # Vision training batches: random crop (after padding 4 pixels) and horizontal flip.
    augment: bool = False
    # Reasoning tasks (phop, addition, parity; docs/reasoning.md), generated from the run's seed streams.
    # phop: symbols in the alphabet; phop and parity: sequence length (parity: bits) in training.
    alphabet: int = 4
    length: int = 16
    # phop: hops in training; test_hops: the test split's hops (null or []: the training hops).
    hops: int = 2
    test_hops: Optional[List[int]] = None
    # addition: digits per operand, operands in training, the test split's operand counts, and the answer's digits
    # least significant first instead of most significant first.
    digits: int = 3
    operands: int = 2
    test_operands: Optional[List[int]] = None
    reverse_answer: bool = False
    # parity: the test split's lengths (null or []: the training length).
    test_length: Optional[List[int]] = None
    # Instances in the fixed val and test sets (distinct prompts, never drawn in training).
    val_size: int = 2000
    test_size: int = 2000


@dataclass
class PolicyConfig:
    name: str = "none"
    # Unique layer sets for sequential, cyclic and cycle_rev.
    n_sets: int = 2
    # from_file: an earlier run's summary.json or maps.jsonl.
    path: Optional[str] = None
    # from_file: a map given inline, one entry per slot ([0,0,2,2]); instead of path.
    map: Optional[List[Any]] = None
    # from_file: groups of slots that share the first (lowest) slot's weights ([[0,1,2],[3,5]]); unlisted slots
    # are independent. Instead of path or map.
    groups: Optional[List[Any]] = None
    # What a tie shares (every policy but none): "block" (the whole block), "attention" (the attention
    # projections; the MLP stays the slot's own) or "mlp" (the reverse).
    share: str = "block"
    # share=attention|mlp: share the shared sublayer's layer norm too (otherwise norms stay per slot).
    share_norms: bool = False
    # "shared" (gradients of every position summed) or "frozen_copy" (a tied slot passes no weight gradient).
    grad: str = "shared"
    # dynamic_q, random: K optimizer steps follow each decision before it is rewarded.
    steps_per_decision: int = 4
    # dynamic_q, random: layers 1..L-1 stay frozen at their initial weights until first visited.
    freeze_at_init: bool = True
    # dynamic_q, random, bandit: "paper" (-batch PPL, clipped at -10), "neg_loss", "improvement", "param_penalty"
    # or "paired_improvement" (CE before the decision - CE after its K steps, both on the same reward batch).
    reward: str = "paper"
    # param_penalty reward: -CE - param_penalty_weight * (trainable layer slots / all layer slots).
    param_penalty_weight: float = 1.0
    # dynamic_q, random, bandit: seed of the policy's own RNG and Q-network init; null takes train.seed.
    seed: Optional[int] = None
    # The learning options (docs/method.md#learning-options); each is off by default, which is the published agent.
    # dynamic_q: "episode" (epsilon *= 0.95 after each episode) or "decision" (epsilon *= epsilon_decay_per_decision
    # after each rewarded decision); floor 0.01 either way.
    epsilon_schedule: str = "episode"
    epsilon_decay_per_decision: float = 0.99
    # dynamic_q, bandit: learn from (r - running mean) / running std of the rewards so far (Welford).
    reward_normalization: bool = False
    # dynamic_q: bootstrap from "same_layer" (the decided layer's slice at the next map, as the authors' code) or
    # "next_decision" (the slice of the layer decided next, at the state it is decided in).
    td_target: str = "same_layer"
    # dynamic_q: keep the last `replay` transitions and learn from a uniform sample of up to 32 of them (0: off).
    replay: int = 0
    # dynamic_q: bootstrap from a target network, copied from the Q-network every `target_update` updates (0: off).
    target_update: int = 0
    # dynamic_q: the Q-network's learning rate decays as 1e-3 * tau / (tau + n) after n updates, tau =
    # q_lr_decay_updates (0: off, a constant 1e-3), so its estimates converge under noisy rewards (Robbins-Monro).
    q_lr_decay_updates: int = 0
    # bandit: "ucb1" (upper confidence bound) or "thompson" (Gaussian Thompson sampling), one bandit per layer.
    bandit_algorithm: str = "ucb1"
    # recursive (docs/method.md#recursive-conversion): convert train.init_from into n_sets shared blocks laid out by
    # `pattern` (cycle, sequence, middle_cycle, middle_sequence), each initialised by `init` (stepwise, average,
    # lower, upper, random), relaxed by a per-slot LoRA of rank `lora_rank` (0: strict tying) scaled
    # lora_alpha / lora_rank (null: lora_alpha = lora_rank).
    pattern: str = "cycle"
    init: str = "stepwise"
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    # looped (docs/looped.md): `prelude` unique blocks, then `core` blocks run `loops` times (their slots tied across
    # the loops), then `coda` unique blocks: model.n_layer = prelude + core * loops + coda. Or `counts` instead: layer
    # i runs counts[i] times in a row (model.n_layer = sum(counts)).
    prelude: int = 1
    core: int = 1
    coda: int = 1
    loops: int = 2
    counts: Optional[List[int]] = None
    # looped: loops per training step, "fixed" (policy.loops) or "poisson" (1 + Poisson(lambda), lambda log-normal
    # with mean policy.loops - 1 and log-space deviation loop_sigma, at most max_loops; the same on every rank).
    train_loops: str = "fixed"
    loop_sigma: float = 0.5
    # looped: the most loops a training step draws (null: 2 * policy.loops); when set, train.eval_loops stay within it.
    max_loops: Optional[int] = None
    # looped: backpropagate through the last backprop_loops loops only (truncated backprop); null: every loop.
    backprop_loops: Optional[int] = None
    # looped: the prelude's output fed into every later loop's input: "none", "add" or "concat" (concatenated with
    # the state and projected back to the width by one shared matrix, which starts as add).
    inject: str = "none"
    # looped: per-loop parameters of the core: "none", "scale" (a per-channel output scale per core slot, at 1),
    # "adaln" (each core slot's own block norms, starting as the shared ones) or "lora" (a LoRA of rank
    # policy.lora_rank on the matrices of every later loop's core slots, B at 0).
    loop_params: str = "none"


@dataclass
class HardwareConfig:
    name: str = "auto"
    # Train one run data-parallel over the processes torchrun starts (hardware=ddp).
    data_parallel: bool = False
    # Shard the weights, gradients and optimizer state over those processes with FSDP2 (hardware=fsdp); needs
    # data_parallel. Without it every rank holds the whole training state (DDP).
    fsdp: bool = False
    # fsdp: free each block's gathered weights after its forward and gather them again for its backward (less
    # memory, one more all-gather per block); false keeps them until the backward.
    fsdp_reshard_after_forward: bool = True
    # "auto" (cuda when present), "cpu" or "cuda".
    device: str = "auto"
    # Autocast dtype on CUDA: "bf16" or "fp32" (no autocast). The CPU always trains in fp32.
    precision: str = "bf16"
    tf32: bool = True
    # torch.compile per block (docs/gpu.md): one graph per block kind that every slot and tying map reuses (a
    # second where a slot's weights need no gradient), plus the loss around the stack; evaluation runs eager.
    compile: bool = False
    # Peak FLOP/s of one device for summary.json's mfu; null: the device's dense bf16 peak by name (H100/H200
    # 989e12, A100 312e12, ...), and no mfu on a device not in that table (or on the CPU).
    peak_flops: Optional[float] = None
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
    # Validation batches per periodic evaluation: a fixed sample spread over the whole val split, the same at
    # every evaluation; "all" (or null) scores the whole split every time. The final evaluation always scores
    # the whole val split and the whole test split.
    eval_batches: Any = 20
    log_interval: int = 10
    # Save a checkpoint every this many steps (0: only at the end); keep the newest keep_checkpoints.
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2
    # A run folder to continue exactly where it stopped (its config is reused; only the keys of
    # RESUMABLE_KEYS may be overridden, e.g. train.max_steps to extend it).
    resume: Optional[str] = None
    # Start a new run in a folder that holds another run's files: clear the folder (else refused). Only a run
    # folder (a run's config and nothing but the names a run writes, files.RUN_FOLDER_NAMES) that no source
    # (train.init_from, policy.path) lives in; its files are deleted once the new run has read its sources and
    # built, and put back if it fails before that.
    overwrite: bool = False
    # Start from earlier weights: a run folder (its newest checkpoint), a checkpoint folder, or a local
    # Hugging Face GPT-2 folder (config.json + model.safetensors). Ignored when resuming.
    init_from: Optional[str] = None
    # train.init_from (and policy=recursive) refuse a checkpoint trained with another tokenizer than this run's (its
    # embedding rows would stand for other tokens); true accepts it (docs/reliability-notes.md#source-identity).
    allow_other_tokenizer: bool = False
    # Weight-decay the embedding tables (and so a tied head, once) like other matrices, as nanoGPT does now.
    decay_embeddings: bool = True
    # policy=looped: after training, score the test split again at each of these loop counts (summary.json's
    # test_<metric>_by_loops); [] scores it at policy.loops only.
    eval_loops: List[int] = field(default_factory=list)
    # Learning rate of a tensor that n slots use, under policy.grad=shared: lr ("none"), lr / n ("linear") or
    # lr / sqrt(n) ("sqrt").
    tied_lr: str = "none"


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

# The values each of these keys accepts: config.check refuses any other, naming these. Where code elsewhere keeps a
# registry keyed by a key's values (REWARDS, the recursive patterns and inits, the wiki2 variants), it is built with
# registry_of, which fails on import unless the registry's names are exactly these.
CHOICES = {
    "policy.grad": ("shared", "frozen_copy"),
    "policy.share": ("block", "attention", "mlp"),
    "policy.reward": ("paper", "neg_loss", "improvement", "param_penalty", "paired_improvement"),
    "policy.epsilon_schedule": ("episode", "decision"),
    "policy.td_target": ("same_layer", "next_decision"),
    "policy.bandit_algorithm": ("ucb1", "thompson"),
    "policy.pattern": ("cycle", "sequence", "middle_cycle", "middle_sequence"),
    "policy.init": ("stepwise", "average", "lower", "upper", "random"),
    "policy.train_loops": ("fixed", "poisson"),
    "policy.inject": ("none", "add", "concat"),
    "policy.loop_params": ("none", "scale", "adaln", "lora"),
    "train.tied_lr": ("none", "linear", "sqrt"),
    "hardware.device": ("auto", "cpu", "cuda"),
    "hardware.precision": ("bf16", "fp32"),
    "train.schedule": ("cosine", "constant"),
    "log.progress": ("auto", "bar", "lines"),
    "dataset.tokenizer": ("bpe", "gpt2", "wordpiece", "from_model"),
    "dataset.variant": ("raw", "v1"),
}


T = TypeVar("T")


def registry_of(key: str, registry: Dict[str, T]) -> Dict[str, T]:
    """``registry``, which must be keyed by exactly the CHOICES of ``key`` (in their order): the schema and the code
    that acts on each choice cannot drift apart (a plain error on import if they do)."""
    if tuple(registry) != CHOICES[key]:
        raise ValueError(f"the registry of {key} holds {tuple(registry)} but CHOICES[{key!r}] is {CHOICES[key]}")
    return registry


# What a resumed run may change: how long it goes on, how often it logs, evaluates and checkpoints, and how it
# is shown; and, the whole hardware section (RESUMABLE_SECTIONS), what it computes on: a checkpoint is one format
# whether one process, DDP or FSDP wrote it. Everything else is what the run is (model, data, policy, seed,
# optimizer, ...) and stays.
RESUMABLE_KEYS = (
    "train.max_steps", "train.eval_interval", "train.log_interval", "train.checkpoint_interval",
    "train.keep_checkpoints", "train.resume", "log.progress", "log.wandb", "log.wandb_project",
)
RESUMABLE_SECTIONS = ("hardware",)


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
    for entry in cfg:
        section = str(entry)
        declared = {f.name for f in fields(SECTION_SCHEMAS[section])} if section in SECTION_SCHEMAS else set()
        unknown = [str(key) for key in cfg[section] if key not in declared] if declared else [""]
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
    check_numbers(cfg)
    check_eval_batches(t.eval_batches)
    if m.head_dim is None and m.d_model % m.n_head:
        raise BadInput(f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}; pick a divisor of it")
    check_llama_keys(m)
    if d.tokenizer == "from_model" and not t.init_from:
        raise BadInput("dataset.tokenizer=from_model reads the tokenizer of the model train.init_from names; set "
                       "train.init_from= a Hugging Face model folder or hf:<repo id>")
    if d.block_size > m.max_positions:
        raise BadInput(
            f"dataset.block_size={d.block_size} exceeds the model's {m.max_positions} positions; "
            f"lower dataset.block_size or raise model.max_positions"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise BadInput(f"model.dropout={m.dropout} must be in [0, 1)")
    check_freeze(m)
    check_hardware(cfg)


# The model=llama keys, at their defaults (which another model must leave them at).
LLAMA_ONLY = {"n_kv_head": None, "head_dim": None, "d_ff": None, "rope_theta": 10000.0, "norm_eps": 1e-5,
              "qk_norm": False, "attention_bias": False, "mlp_bias": False}


def check_llama_keys(m: ModelConfig) -> None:
    """The grouped-query and head-width keys of model=llama fit together; other models leave them unset."""
    if m.name != "llama":
        for key, unset in LLAMA_ONLY.items():
            if getattr(m, key) != unset:
                raise BadInput(f"model.{key} is a key of model=llama; model={m.name} does not use it")
        return
    for key in ("n_kv_head", "head_dim", "d_ff"):
        value = getattr(m, key)
        if value is not None and (isinstance(value, bool) or value < 1):
            raise BadInput(f"model.{key}={value} must be at least 1 (or null)")
    if m.n_kv_head is not None and m.n_head % m.n_kv_head:
        raise BadInput(f"model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head}; each key/value "
                       f"head serves a whole group of query heads")
    head_dim = m.head_dim or m.d_model // m.n_head
    if head_dim % 2:
        raise BadInput(f"model.head_dim={head_dim} is odd; RoPE rotates pairs of features, so it must be even")
    _in_range("model.rope_theta", m.rope_theta, 0, math.inf, low_open=True, high_open=True)
    _in_range("model.norm_eps", m.norm_eps, 0, 1, low_open=True)


def check_hardware(cfg: Config) -> None:
    """hardware.peak_flops is a positive number; hardware.fsdp shards over data-parallel ranks, whole blocks at a
    time."""
    h, p = cfg.hardware, cfg.policy
    if h.peak_flops is not None:
        _in_range("hardware.peak_flops", h.peak_flops, 0, math.inf, low_open=True, high_open=True)
    if not h.fsdp:
        return
    if not h.data_parallel:
        raise BadInput("hardware.fsdp=true shards over data-parallel ranks; use hardware=fsdp (it also sets "
                       "hardware.data_parallel=true)")
    if p.name == "recursive" or p.share != "block":
        what = "policy=recursive" if p.name == "recursive" else f"policy.share={p.share}"
        raise BadInput(f"hardware=fsdp shards whole blocks, so a tie must share a whole block; {what} shares part "
                       f"of one - use hardware=ddp for it")


def _in_range(key: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """BadInput naming ``key``, its value and its legal range unless ``value`` is a finite number in it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        high_text = "inf)" if math.isinf(high) else f"{high:g}{right}"
        raise BadInput(f"{key}={value} is out of range; it must be a finite number in {left}{low:g}, {high_text}")


def check_numbers(cfg: Config) -> None:
    """Every number of the schema in its legal range, NaN and inf refused."""
    m, d, t, p = cfg.model, cfg.dataset, cfg.train, cfg.policy
    inf = math.inf
    _in_range("train.lr", t.lr, 0, inf, low_open=True, high_open=True)
    _in_range("train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    _in_range("train.weight_decay", t.weight_decay, 0, inf, high_open=True)
    _in_range("train.beta1", t.beta1, 0, 1, high_open=True)
    _in_range("train.beta2", t.beta2, 0, 1, high_open=True)
    _in_range("train.grad_clip", t.grad_clip, 0, inf, high_open=True)
    _in_range("train.warmup_steps", t.warmup_steps, 0, inf, high_open=True)
    _in_range("train.checkpoint_interval", t.checkpoint_interval, 0, inf, high_open=True)
    _in_range("train.keep_checkpoints", t.keep_checkpoints, 1, inf, high_open=True)
    _in_range("train.seed", t.seed, 0, 2**63, high_open=True)
    _in_range("model.dropout", m.dropout, 0, 1, high_open=True)
    _in_range("dataset.val_fraction", d.val_fraction, 0, 1, low_open=True, high_open=True)
    _in_range("dataset.test_fraction", d.test_fraction, 0, 1, high_open=True)
    if d.val_fraction + d.test_fraction >= 1:
        raise BadInput(f"dataset.val_fraction={d.val_fraction} plus dataset.test_fraction={d.test_fraction} must be "
                       f"below 1 (something must be left to train on)")
    _in_range("dataset.vocab_size", d.vocab_size, 1, inf, high_open=True)
    if d.max_documents is not None:
        _in_range("dataset.max_documents", d.max_documents, 1, inf, high_open=True)
    if m.vocab_size is not None:
        _in_range("model.vocab_size", m.vocab_size, 1, inf, high_open=True)
    _in_range("model.pad_vocab_to", m.pad_vocab_to, 1, inf, high_open=True)
    _in_range("model.max_positions", m.max_positions, 1, inf, high_open=True)
    _in_range("policy.n_sets", p.n_sets, 1, inf, high_open=True)
    _in_range("policy.steps_per_decision", p.steps_per_decision, 1, inf, high_open=True)
    _in_range("policy.param_penalty_weight", p.param_penalty_weight, -inf, inf, low_open=True, high_open=True)
    _in_range("policy.epsilon_decay_per_decision", p.epsilon_decay_per_decision, 0, 1, low_open=True)
    _in_range("policy.replay", p.replay, 0, inf, high_open=True)
    _in_range("policy.target_update", p.target_update, 0, inf, high_open=True)
    _in_range("policy.q_lr_decay_updates", p.q_lr_decay_updates, 0, inf, high_open=True)
    _in_range("policy.loop_sigma", p.loop_sigma, 0, 10, low_open=True, high_open=True)
    if p.lora_alpha is not None:
        _in_range("policy.lora_alpha", p.lora_alpha, 0, inf, low_open=True, high_open=True)
    if p.seed is not None:
        _in_range("policy.seed", p.seed, 0, 2**63, high_open=True)


def check_eval_batches(value: Any) -> None:
    if value is None or value == "all":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"train.eval_batches={value!r} must be a number of batches (at least 1) or all")


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
