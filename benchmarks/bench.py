"""``make bench``: what tying costs and saves, measured side by side in one process.

(a) loop overhead: tyingrun's ``policy=none`` step over a bare hand-written torch loop (same model, batches), both
    reading the loss only at log points (every LOG_INTERVAL steps), as a training loop that never waits for the
    device does;
(b) train_state_bytes at a map with a quarter of the layers independent over the physical limit;
(c) step time at that map under ``frozen_copy`` over ``policy=none``;
(d) dynamic_q's decision cost (Q-network + reward batch) as a fraction of training time at K=4;
(e) tokens/s of each, and MFU on a GPU (``train_flops_per_token`` of each map over the device's peak bf16 FLOP/s);
(f) peak tensor bytes of a training step at that map under ``frozen_copy`` over ``policy=none``, beside the ratio
    the train-state savings alone would give and the floor (tying leaves every slot's activations), and on a GPU
    a cross-check against ``torch.cuda.max_memory_allocated``;
(g) what measuring the peak costs: a measured step over an unmeasured one, and a run measured at its start over
    one never measured.

Step times are medians over rounds; each round times every variant in turn, so drift hits all alike.
Writes ``benchmarks/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from tyingrun.config import Config, DatasetConfig, HardwareConfig, LogConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.metrics.mfu import mfu, peak_flops
from tyingrun.metrics.sinks import ConsoleSink, RunSinks
from tyingrun.metrics.tensor_memory import TensorMemoryTracker, training_state
from tyingrun.run import build_data, build_parts
from tyingrun.train.optim import optimizer_parameters
from tyingrun.train.trainer import Trainer
from tyingrun.tying import maps
from tyingrun.tying.counts import train_state_bytes
from tyingrun.tying.flops import sequence_length, train_flops_per_token

TARGETS = {"loop_overhead": 1.03, "train_state_vs_limit": 1.05, "frozen_copy_step_ratio": 0.80, "decision_cost": 0.10}
LOG_INTERVAL = 10


def bench_config(args, policy: PolicyConfig) -> Config:
    device = "cuda" if args.device == "cuda" else "cpu"
    return Config(
        model=ModelConfig(
            n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, max_positions=args.block_size
        ),
        dataset=DatasetConfig(block_size=args.block_size),
        policy=policy,
        hardware=HardwareConfig(name="bench", device=device, precision="bf16" if device == "cuda" else "fp32"),
        train=TrainConfig(batch_size=args.batch_size, max_steps=10**9, warmup_steps=0, schedule="constant",
                          checkpoint_interval=0, log_interval=LOG_INTERVAL, eval_interval=10**9),
        log=LogConfig(progress="lines"),
    )


def build_trainer(cfg: Config, data, out_dir: Path) -> Trainer:
    """A trainer built from the same parts a run builds (``run.build_parts``), on data shared by every variant."""
    parts = build_parts(cfg, out_dir, data)
    out_dir.mkdir(parents=True)
    sinks = RunSinks(out_dir, ConsoleSink("lines", cfg.train.max_steps, quiet=True))
    trainer = Trainer(cfg, parts.model, parts.model.stack, parts.data, parts.policy, parts.device, sinks)
    trainer.apply_decision(parts.policy.start(cfg.model.n_layer))
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(trainer: Trainer) -> Callable[[], None]:
    """A hand-written loop over the same model, optimizer and batches: what tyingrun's loop is compared to. It keeps
    the losses on the device and reads them every LOG_INTERVAL steps, as the trainer does."""
    model, optimizer, sampler, device = trainer.model, trainer.optimizer, trainer.sampler, trainer.device
    params = optimizer_parameters(optimizer)
    losses = []

    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in sampler.next_batch().items()}
        with trainer.autocast():
            loss = model.loss(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, trainer.cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if len(losses) == LOG_INTERVAL:
            torch.stack(losses).tolist()
            losses.clear()

    return step


def median_step_times(variants: Dict[str, Callable[[], None]], device, rounds: int, steps: int) -> Dict[str, float]:
    for step in variants.values():  # warm-up: allocator, optimizer state, kernels
        for _ in range(2):
            step()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - started) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def physical_limit_bytes(trainer: Trainer) -> int:
    """Weights, gradients and AdamW's two moments of the embeddings, final norm and independent blocks only."""
    stack = trainer.model.stack
    in_stack = {id(p) for p in stack.parameters()}
    params = [p for p in trainer.model.parameters() if id(p) not in in_stack]
    params += [p for root in maps.roots_of(stack.src) for p in stack.blocks[root].parameters()]
    unique = {p.untyped_storage().data_ptr(): p for p in params}
    return 4 * sum(p.numel() * p.element_size() for p in unique.values())


def decision_cost(trainer: Trainer, decisions: int) -> float:
    """Time in the policy's decisions (Q-network, reward batch) over all training time, at its K."""
    spent = {"policy": 0.0, "total": 0.0}
    after_step = trainer.policy.after_step

    def timed_after_step(context):
        started = time.perf_counter()
        decision = after_step(context)
        spent["policy"] += time.perf_counter() - started
        return decision

    trainer.policy.after_step = timed_after_step
    steps = decisions * trainer.cfg.policy.steps_per_decision
    started = time.perf_counter()
    for _ in range(steps):
        trainer.run_step()
    synchronize(trainer.device)
    spent["total"] = time.perf_counter() - started
    return spent["policy"] / spent["total"]


def model_flops_utilisation(trainer: Trainer, tokens_per_s: float) -> float | None:
    """MFU of ``trainer`` at its map (train_flops_per_token, counted per slot); None off a GPU with a known peak."""
    seq_len = sequence_length(trainer.model, trainer.cfg.dataset.block_size)
    flops = train_flops_per_token(trainer.model, seq_len, trainer.cfg.train.batch_size)
    return mfu(flops, tokens_per_s, peak_flops(trainer.device, trainer.cfg.hardware.peak_flops))


def remeasure(trainer: Trainer) -> None:
    """Make the trainer measure its next step's peak again, as a run does at its start and at each new map."""
    trainer.peak.reset()


def peak_tensors(none: Trainer, quarter: Trainer) -> dict:
    """The quarter map's peak tensor bytes over policy=none's, beside two references.

    ``ratio_from_state_savings_alone``: none's peak less the train state (weights, gradients, optimizer state)
    tying saves. ``floor``: the quarter map's activations and temporaries at its peak alone, which no saving of
    state removes, since every slot, tied or not, computes. Under frozen_copy the ratio falls below the first: a
    tied slot computes no weight gradient, so autograd keeps none of the inputs only a weight gradient needs.
    """
    none_peak = none.peak.highest["peak_tensor_bytes"]
    saved = train_state_bytes(none.model, none.optimizer) - train_state_bytes(quarter.model, quarter.optimizer)
    return {
        "none": none.peak.highest, "quarter_frozen_copy": quarter.peak.highest,
        "ratio": quarter.peak.highest["peak_tensor_bytes"] / none_peak,
        "ratio_from_state_savings_alone": 1 - saved / none_peak,
        "floor": quarter.peak.highest["peak_other_bytes"] / none_peak,
    }


def cuda_cross_check(trainer: Trainer) -> Optional[dict]:
    """peak_tensor_bytes of one measured step beside torch.cuda.max_memory_allocated over the same step, less
    what the allocator held before it that is not this trainer's state (other models, workspaces)."""
    if trainer.device.type != "cuda":
        return None
    synchronize(trainer.device)
    with TensorMemoryTracker(lambda: training_state(trainer.model, trainer.optimizer), trainer.device) as at_entry:
        not_state = torch.cuda.memory_allocated(trainer.device) - at_entry.live_bytes
    remeasure(trainer)
    torch.cuda.reset_peak_memory_stats(trainer.device)
    trainer.run_step()
    synchronize(trainer.device)
    allocated = torch.cuda.max_memory_allocated(trainer.device) - not_state
    measured = trainer.peak.highest["peak_tensor_bytes"]
    return {"peak_tensor_bytes": measured, "max_memory_allocated": allocated, "ratio": measured / allocated}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def in_turn(names: Sequence[str], round_index: int) -> Sequence[str]:
    """The variants in the order of this round: each round reverses the last, so neither always runs first."""
    return names if round_index % 2 == 0 else names[::-1]


def measured_step_time(trainer: Trainer, rounds: int) -> Dict[str, float]:
    """Median time of a step that measures its peak and of one that does not."""
    def measured_step() -> None:
        remeasure(trainer)
        trainer.run_step()

    steps = {"measured": measured_step, "unmeasured": trainer.run_step}
    times = {name: [] for name in steps}
    for round_index in range(rounds):
        for name in in_turn(list(steps), round_index):
            times[name].append(timed(steps[name], trainer.device))
    return {name: statistics.median(values) for name, values in times.items()}


def run_time(cfg: Config, data, out_dir: Path, steps: int, measured: bool) -> float:
    """Wall time of a fresh run's first ``steps`` steps, measured at its start as every run is, or never."""
    trainer = build_trainer(cfg, data, out_dir)
    if not measured:
        trainer.peak.measured.add(trainer.peak.tying())

    def run() -> None:
        for _ in range(steps):
            trainer.run_step()

    return timed(run, trainer.device)


def measurement_overhead(args, data, tmp: Path, trainer: Trainer) -> dict:
    """A measured step over an unmeasured one, and a fresh run measured at its start over one never measured."""
    step_s = measured_step_time(trainer, args.rounds)
    cfg = bench_config(args, PolicyConfig(name="none"))
    runs = {"measured": [], "unmeasured": []}
    for round_index in range(args.rounds):
        for name in in_turn(list(runs), round_index):
            out_dir = tmp / f"run_{name}_{round_index}"
            runs[name].append(run_time(cfg, data, out_dir, args.run_steps, measured=name == "measured"))
    run_s = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "step_s": step_s, "step_ratio": step_s["measured"] / step_s["unmeasured"],
        "run_steps": args.run_steps, "run_s": run_s, "run_ratio": run_s["measured"] / run_s["unmeasured"],
        "run_extra_s": run_s["measured"] - run_s["unmeasured"],
    }


def run_benchmarks(args) -> dict:
    none_policy = PolicyConfig(name="none")
    quarter = PolicyConfig(name="sequential", n_sets=args.n_layer // 4, grad="frozen_copy")
    dynamic = PolicyConfig(name="dynamic_q", grad="frozen_copy", steps_per_decision=4)
    data = build_data(bench_config(args, none_policy))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "none": build_trainer(bench_config(args, none_policy), data, Path(tmp) / "none"),
            "bare": build_trainer(bench_config(args, none_policy), data, Path(tmp) / "bare"),
            "quarter_frozen_copy": build_trainer(bench_config(args, quarter), data, Path(tmp) / "quarter"),
        }
        variants = {
            "none": trainers["none"].run_step,
            "bare": bare_step(trainers["bare"]),
            "quarter_frozen_copy": trainers["quarter_frozen_copy"].run_step,
        }
        device = trainers["none"].device
        step_s = median_step_times(variants, device, args.rounds, args.steps)
        quarter_trainer = trainers["quarter_frozen_copy"]
        state_bytes = train_state_bytes(quarter_trainer.model, quarter_trainer.optimizer)
        limit = physical_limit_bytes(quarter_trainer)
        # Every trainer measured its first steps' peak during the warm-up of the timing above.
        peaks = peak_tensors(trainers["none"], quarter_trainer)
        peaks["cuda_cross_check"] = cuda_cross_check(trainers["none"])
        overhead = measurement_overhead(args, data, Path(tmp), trainers["none"])
        dynamic_trainer = build_trainer(bench_config(args, dynamic), data, Path(tmp) / "dynamic_q")
        cost = decision_cost(dynamic_trainer, args.decisions)
    tokens_per_step = args.batch_size * args.block_size
    throughput = {name: tokens_per_step / seconds for name, seconds in step_s.items()}
    figures = {
        "loop_overhead": step_s["none"] / step_s["bare"],
        "train_state_vs_limit": state_bytes / limit,
        "frozen_copy_step_ratio": step_s["quarter_frozen_copy"] / step_s["none"],
        "decision_cost": cost,
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "model": {"n_layer": args.n_layer, "d_model": args.d_model, "n_head": args.n_head},
        "batch": {"batch_size": args.batch_size, "block_size": args.block_size},
        "quarter_map": quarter_trainer.model.stack.src,
        "step_s": step_s,
        "train_state_bytes": {"measured": state_bytes, "physical_limit": limit},
        "peak_tensor_bytes": peaks,
        "memory_measurement_overhead": overhead,
        "figures": {name: {"value": value, "target": TARGETS[name], "met": value <= TARGETS[name]}
                    for name, value in figures.items()},
        "tokens_per_s": throughput,
        "mfu": {name: model_flops_utilisation(trainers[name], rate)
                for name, rate in throughput.items()},
    }


def print_table(results: dict) -> None:
    table = Table(title=f"tyingrun bench on {results['device']} ({results['threads']} threads)")
    for column in ("figure", "value", "target", "met"):
        table.add_column(column)
    for name, figure in results["figures"].items():
        table.add_row(name, f"{figure['value']:.3f}", f"<= {figure['target']}", "yes" if figure["met"] else "NO")
    for name, rate in results["tokens_per_s"].items():
        mfu_value = results["mfu"][name]
        extra = f", MFU {mfu_value:.1%}" if mfu_value is not None else ""
        table.add_row(f"tokens/s {name}", f"{rate:,.0f}{extra}", "", "")
    print_memory_rows(table, results)
    Console().print(table)


def print_memory_rows(table: Table, results: dict) -> None:
    peaks, overhead = results["peak_tensor_bytes"], results["memory_measurement_overhead"]
    mib = {name: peaks[name]["peak_tensor_bytes"] / 2**20 for name in ("none", "quarter_frozen_copy")}
    table.add_row("peak tensors quarter / none", f"{peaks['ratio']:.3f}",
                  f"state savings alone: {peaks['ratio_from_state_savings_alone']:.3f}", "")
    table.add_row("  floor: quarter's activations / none", f"{peaks['floor']:.3f}", "", "")
    table.add_row("peak tensors none, quarter", f"{mib['none']:,.1f}, {mib['quarter_frozen_copy']:,.1f} MiB", "", "")
    check = peaks["cuda_cross_check"]
    if check is not None:
        table.add_row("peak tensors / CUDA max allocated", f"{check['ratio']:.3f}", "1", "")
    table.add_row("measured step / unmeasured", f"{overhead['step_ratio']:.2f}", "", "")
    table.add_row(f"run of {overhead['run_steps']} steps measured / not", f"{overhead['run_ratio']:.3f}",
                  f"{overhead['run_extra_s']:+.2f} s per run", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--decisions", type=int, default=14)
    parser.add_argument("--run-steps", type=int, default=10,
                        help="steps of the runs that show what measuring peak memory at a run's start costs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args()
    results = run_benchmarks(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
