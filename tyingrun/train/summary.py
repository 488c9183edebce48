"""summary.json assembled: what the trainer measured, inside what the run was (tyingrun.summary types every key)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple, cast

from tyingrun.config import Config
from tyingrun.metrics.memory import train_state_figures
from tyingrun.metrics.mfu import mfu, peak_flops
from tyingrun.summary import Summary
from tyingrun.train.distributed import values_of_ranks
from tyingrun.train.optim import optimizer_parameters
from tyingrun.tying.counts import total_params
from tyingrun.tying.flops import sequence_length, train_flops_per_token, unique_blocks

if TYPE_CHECKING:
    from tyingrun.train.trainer import Trainer


def measurements(trainer: Trainer, wall_time_s: float) -> Dict[str, Any]:
    """What ``trainer`` measured over its run: the last evaluation (the final one), the map it ends with and its
    counts, memory and compute, time, throughput and MFU, what compiled, and the policy's diagnostics."""
    model, optimizer, cfg = trainer.model, trainer.optimizer, trainer.cfg
    mesh, device, unit = trainer.mesh, trainer.device, trainer.data.unit
    # A reasoning task sets its own instance length; text data blocks of dataset.block_size.
    seq_len = sequence_length(model, getattr(trainer.data, "block_size", cfg.dataset.block_size))
    looped = trainer.loop_counts.figures(model, seq_len)
    flops_per_token = looped.get("train_flops_per_token") or train_flops_per_token(model, seq_len, cfg.train.batch_size)
    rate = trainer.loop.throughput.rate
    # MFU counts tokens: a vision sample is its sequence of patches.
    tokens_per_s = rate if unit == "tokens" else rate * seq_len
    compiled = trainer.regional_compile

    def per_rank(held: int) -> list:
        return values_of_ranks(held, device) if mesh.distributed else [held]

    return {
        **trainer.loop.last_eval,
        "final_map": list(trainer.stack.src),
        "final_trainable": trainer.stack.effective_trainable,
        **trainer.counts,
        **trainer.loop.mean_counts(),
        "optimizer_params": sum(p.numel() for p in optimizer_parameters(optimizer)),
        **train_state_figures(model, optimizer, per_rank),
        "unique_blocks": unique_blocks(model),
        "train_flops_per_token": flops_per_token,
        **looped,
        **trainer.peak.highest,
        "wall_time_s": wall_time_s,
        f"{unit}_per_s": rate,
        "mfu": mfu(flops_per_token, tokens_per_s, peak_flops(device, cfg.hardware.peak_flops)),
        "compile_graphs": compiled.graphs if compiled else None,
        "compile_recompiles": compiled.recompiles if compiled else None,
        **trainer.policy.diagnostics(),
    }


def run_summary(cfg: Config, model: Any, measured: Dict[str, Any], converted: Dict[str, Any],
                memory: Tuple[int, str]) -> Summary:
    """The whole summary: what ran, ``measured`` (measurements), policy=recursive's ``converted`` losses, and the
    device's peak memory (``memory``: metrics.memory.peak_memory)."""
    memory_bytes, memory_kind = memory
    summary: Dict[str, Any] = {
        "status": "completed",
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "policy": cfg.policy.name,
        "grad_mode": cfg.policy.grad,
        "steps": cfg.train.max_steps,
        "n_layer": cfg.model.n_layer,
        "total_params": total_params(model),
        **measured,
        **converted,
        "peak_memory_bytes": memory_bytes,
        "peak_memory_kind": memory_kind,
        "seed": cfg.train.seed,
    }
    return cast(Summary, summary)
