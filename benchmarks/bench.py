"""``make bench``: what tying costs and saves, measured side by side in one process.

(a) loop overhead: tyingrun's ``policy=none`` step over a bare hand-written torch loop (same model, batches);
(b) train_state_bytes at a map with a quarter of the layers independent over the physical limit;
(c) step time at that map under ``frozen_copy`` over ``policy=none``;
(d) dynamic_q's decision cost (Q-network + reward batch) as a fraction of training time at K=4;
(e) tokens/s of each, and MFU on a GPU.

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
from typing import Callable, Dict

import torch
from rich.console import Console
from rich.table import Table

from tyingrun.config import Config, DatasetConfig, HardwareConfig, LogConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.metrics.sinks import ConsoleSink, RunSinks
from tyingrun.policies import build_policy
from tyingrun.run import build_data, build_model, configure_backends, resolve_device
from tyingrun.train.optim import optimizer_parameters
from tyingrun.train.trainer import Trainer
from tyingrun.tying import maps
from tyingrun.tying.counts import train_state_bytes

TARGETS = {"loop_overhead": 1.03, "train_state_vs_limit": 1.05, "frozen_copy_step_ratio": 0.80, "decision_cost": 0.10}
# Peak dense bf16 FLOP/s of common accelerators, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


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
                          checkpoint_interval=0, log_interval=10**9, eval_interval=10**9),
        log=LogConfig(progress="lines"),
    )


def build_trainer(cfg: Config, data, out_dir: Path) -> Trainer:
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.hardware)
    configure_backends(cfg.hardware, device)
    model = build_model(cfg.model, data, cfg.policy.grad).to(device)
    policy = build_policy(cfg.policy, cfg.model.n_layer, cfg.train.seed)
    out_dir.mkdir(parents=True)
    sinks = RunSinks(out_dir, ConsoleSink("lines", cfg.train.max_steps))
    sinks.console.console.quiet = True
    trainer = Trainer(cfg, model, model.stack, data, policy, device, sinks)
    trainer.apply_decision(policy.start(cfg.model.n_layer))
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(trainer: Trainer) -> Callable[[], None]:
    """A hand-written loop over the same model, optimizer and batches: what tyingrun's loop is compared to."""
    model, optimizer, sampler, device = trainer.model, trainer.optimizer, trainer.sampler, trainer.device
    params = optimizer_parameters(optimizer)

    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in sampler.next_batch().items()}
        with trainer.autocast():
            loss = model.loss(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, trainer.cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

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


def mfu(trainer: Trainer, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation with the PaLM formula (6N + 12 L d T per token); None off a known GPU."""
    if trainer.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(trainer.device)
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    cfg = trainer.cfg.model
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    per_token = 6 * n_params + 12 * cfg.n_layer * cfg.d_model * trainer.cfg.dataset.block_size
    return per_token * tokens_per_s / peak


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
        "figures": {name: {"value": value, "target": TARGETS[name], "met": value <= TARGETS[name]}
                    for name, value in figures.items()},
        "tokens_per_s": throughput,
        "mfu": {name: mfu(trainers["none"], rate) for name, rate in throughput.items()},
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
    Console().print(table)


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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = parser.parse_args()
    results = run_benchmarks(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
