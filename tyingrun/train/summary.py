"""summary.json assembled: what the trainer measured, inside what the run was (tyingrun.summary types every key)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple, cast

from tyingrun.config import Config
from tyingrun.metrics.memory import train_state_figures
from tyingrun.summary import Summary
from tyingrun.train.distributed import values_of_ranks
from tyingrun.train.optim import optimizer_parameters
from tyingrun.tying.counts import total_params
from tyingrun.tying.flops import sequence_length, train_flops_per_token, unique_blocks

if TYPE_CHECKING:
    from tyingrun.train.trainer import Trainer


def measurements(trainer: Trainer, wall_time_s: float) -> Dict[str, Any]:
    """What ``trainer`` measured over its run: the last evaluation (the final one), the map it ends with and its
    counts, memory and compute, time, throughput and the policy's diagnostics."""
    model, optimizer, cfg = trainer.model, trainer.optimizer, trainer.cfg
    mesh, device = trainer.mesh, trainer.device

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
        # A reasoning task sets its own instance length; text data blocks of dataset.block_size.
        "train_flops_per_token": train_flops_per_token(
            model, sequence_length(model, getattr(trainer.data, "block_size", cfg.dataset.block_size)),
            cfg.train.batch_size),
        **trainer.peak.highest,
        "wall_time_s": wall_time_s,
        f"{trainer.data.unit}_per_s": trainer.loop.throughput.rate,
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
