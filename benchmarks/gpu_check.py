"""``make gpu-check``: everything that needs a CUDA GPU, measured by one prepared command (docs/gpu.md).

Sections, in the order they run (each timed; a failing one records its error and the next still runs, and the JSON
is rewritten after every section, so a check cut short still leaves what it measured):

* ``gpt2_124m``: tokens/s and MFU of GPT-2 124M (bf16, batch 16 x 1024, the 50,257-token vocabulary padded to a
  multiple of 64) under ``policy=none`` eager and compiled, and ``policy=dynamic_q`` (K=4) compiled, each through
  the trainer's own loop; the dynamic_q run goes on until it has trained under at least 20 distinct maps and
  reports the graphs and recompiles of every compiled region; peak tensor bytes of a step against
  ``torch.cuda.max_memory_allocated``.
* ``cuda_tests``: the tests marked ``cuda`` (they skip without a GPU).
* ``families``: one short bf16 run per model family (GPT-2, BERT, ViT) under none, cyclic and dynamic_q, through
  ``tyingrun.run.run`` as the CLI runs them.
* ``parity``: with 2 or more GPUs, 2-process NCCL runs under hardware=ddp and hardware=fsdp against one process;
  skipped with a line otherwise.

``targets`` says for each target of issue 30 whether it is met and by how much it is missed. Without CUDA the
same plumbing runs at toy sizes on the CPU (``--quick``), so the script is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import build_trainer, cuda_cross_check, synchronize  # noqa: E402

from tyingrun.data_cli import compose_config  # noqa: E402
from tyingrun.metrics.mfu import mfu, peak_flops  # noqa: E402
from tyingrun.run import build_data  # noqa: E402
from tyingrun.tying.flops import sequence_length, train_flops_per_token  # noqa: E402

TARGETS = {"mfu_gpt2_124m_compiled_none": 0.40, "dynamic_q_over_none_tokens_per_s": 0.90,
           "recompiles_per_block_kind": 2}
FAMILIES = {"gpt2": "pydoc", "bert": "pydoc", "vit": "digits", "llama": "pydoc"}
POLICIES = ("none", "cyclic", "dynamic_q")
DISTINCT_MAPS = 20
# The test files that hold tests marked cuda (collecting only these keeps the section short).
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_tensor_memory.py")


def hardware_overrides(cuda: bool) -> List[str]:
    return ["hardware=gpu"] if cuda else ["hardware=cpu"]


def gpt2_overrides(args, policy: str, compile_: bool) -> List[str]:
    """GPT-2 124M at batch 16 x 1024 (toy sizes under --quick), never evaluating or checkpointing while timed."""
    size = (["model.n_layer=2", "model.d_model=64", "model.n_head=2", "dataset.block_size=64", "train.batch_size=2"]
            if args.quick else ["dataset.block_size=1024", "train.batch_size=16"])
    return [
        "model=gpt2_124m", "dataset=pydoc", f"policy={policy}", *hardware_overrides(args.cuda), *size,
        "model.vocab_size=50257", "model.pad_vocab_to=64", f"hardware.compile={str(compile_).lower()}",
        "train.warmup_steps=0", "train.schedule=constant", "train.log_interval=10", "train.max_steps=1000000",
        "train.eval_interval=1000000", "train.checkpoint_interval=0", "log.progress=lines",
    ]


class TimedRun:
    """A trainer stepping through its own loop (``run_step``), with the flops of the map each step trained under."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.maps: Dict[tuple, int] = {}
        self.flops: List[int] = []
        self.seq_len = sequence_length(trainer.model, trainer.cfg.dataset.block_size)

    def step(self) -> None:
        self.trainer.run_step()
        tying = self.trainer.peak.tying()
        if tying not in self.maps:
            batch_size = self.trainer.cfg.train.batch_size
            self.maps[tying] = train_flops_per_token(self.trainer.model, self.seq_len, batch_size)
        self.flops.append(self.maps[tying])

    def timed(self, steps: int) -> Dict[str, float]:
        """Tokens/s and MFU over ``steps`` steps after the ones already run."""
        synchronize(self.trainer.device)
        started, first, measured_before = time.perf_counter(), len(self.flops), len(self.trainer.peak.measured)
        for _ in range(steps):
            self.step()
        synchronize(self.trainer.device)
        seconds = time.perf_counter() - started
        cfg = self.trainer.cfg
        tokens_per_s = steps * cfg.train.batch_size * cfg.dataset.block_size / seconds
        flops = sum(self.flops[first:]) / steps
        peak = peak_flops(self.trainer.device, cfg.hardware.peak_flops)
        # A new (map, trainable flags) measures its peak tensor memory in an eager step (or two): under dynamic_q
        # part of the window's time is that measurement, not training.
        return {"steps": steps, "seconds": seconds, "tokens_per_s": tokens_per_s, "train_flops_per_token": flops,
                "mfu": mfu(flops, tokens_per_s, peak), "peak_flops": peak,
                "maps_memory_measured": len(self.trainer.peak.measured) - measured_before}


def compile_counts(trainer) -> Optional[Dict[str, Any]]:
    compiled = trainer.regional_compile
    return None if compiled is None else {"graphs": compiled.graphs, "recompiles": compiled.recompiles}


def gpt2_124m(args, tmp: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    variants = {"none_eager": ("none", False), "none_compiled": ("none", True),
                "dynamic_q_compiled": ("dynamic_q", True)}
    data = build_data(compose_config(gpt2_overrides(args, "none", False)))
    out: Dict[str, Any] = {}
    for name, (policy, compile_) in variants.items():
        started = time.perf_counter()
        trainer = build_trainer(compose_config(gpt2_overrides(args, policy, compile_)), data, tmp / f"gpt2_{name}")
        run = TimedRun(trainer)
        # Compilation, the allocator, optimizer state; the first steps under a map measure its peak memory eagerly.
        for _ in range(args.warmup_steps):
            run.step()
        synchronize(trainer.device)
        entry = {"warmup_s": time.perf_counter() - started, **run.timed(args.timed_steps)}
        if policy == "dynamic_q":
            while len(run.maps) < DISTINCT_MAPS and len(run.flops) < args.max_map_steps:
                run.step()
            entry.update(steps_run=len(run.flops), distinct_maps=len(run.maps))
        entry["compile"] = compile_counts(trainer)
        if name == "none_eager":
            entry["peak_tensor_bytes"] = cuda_cross_check(trainer)
        out[name] = entry
        results["sections"]["gpt2_124m"] = out
        write(results, args.out)
        del trainer, run
        release_memory()
    return out


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def families(args, tmp: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from tyingrun.run import run

    steps = 12 if args.quick else 30
    out: Dict[str, Any] = {}
    for model, dataset in FAMILIES.items():
        for policy in POLICIES:
            overrides = [f"model={model}", f"dataset={dataset}", f"policy={policy}", *hardware_overrides(args.cuda),
                         f"train.max_steps={steps}", f"train.eval_interval={steps}", "train.eval_batches=2",
                         "train.log_interval=10", "train.checkpoint_interval=0", "log.progress=lines"]
            key = f"{model}/{policy}"
            try:
                summary = run(compose_config(overrides), tmp / "runs" / model / policy)
                unit = "tokens" if dataset != "digits" else "samples"
                out[key] = {name: summary.get(name) for name in (
                    "status", "val_loss", "val_acc", "test_loss", "test_acc", f"{unit}_per_s", "mfu",
                    "independent_layers", "peak_memory_bytes", "wall_time_s")}
            except Exception as err:  # noqa: BLE001 - one failed run is recorded; the others still run
                out[key] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            results["sections"]["families"] = out
            write(results, args.out)
            release_memory()
    return out


def cuda_tests(args, tmp: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "cuda", *CUDA_TESTS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout_s)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "summary": lines[-1] if lines else "",
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}


def parity(args, tmp: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return {"skipped": f"{gpus} GPU(s): the 2-process NCCL DDP and FSDP parity runs need 2 or more"}
    steps = 10
    common = ["model=gpt2", "dataset=pydoc", "policy=cyclic", f"train.max_steps={steps}", "train.log_interval=1",
              f"train.eval_interval={steps}", "train.eval_batches=2", "hardware.precision=fp32", "log.progress=lines"]
    losses = {}
    for name, launch in (("single", [sys.executable, "-m", "tyingrun.cli", "hardware=gpu"]),
                         ("ddp", ["torchrun", "--nproc_per_node=2", "-m", "tyingrun.cli", "hardware=ddp"]),
                         ("fsdp", ["torchrun", "--nproc_per_node=2", "-m", "tyingrun.cli", "hardware=fsdp"])):
        folder = tmp / f"parity_{name}"
        subprocess.run([*launch, *common, f"hydra.run.dir={folder}"], check=True, capture_output=True, timeout=240)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["train_loss"] for row in rows if "train_loss" in row]
    return {name: {"max_abs_diff_vs_single": max(abs(a - b) for a, b in zip(values, losses["single"], strict=True))}
            for name, values in losses.items() if name != "single"}


SECTIONS: Dict[str, Callable] = {"gpt2_124m": gpt2_124m, "cuda_tests": cuda_tests, "families": families,
                                 "parity": parity}


def targets(sections: Dict[str, Any]) -> Dict[str, Any]:
    """Each target of issue 30: the value, the target, whether it is met, and the gap when missed."""
    gpt2 = sections.get("gpt2_124m") or {}
    none, dynamic = gpt2.get("none_compiled") or {}, gpt2.get("dynamic_q_compiled") or {}
    values: Dict[str, Optional[float]] = {
        "mfu_gpt2_124m_compiled_none": none.get("mfu"),
        "dynamic_q_over_none_tokens_per_s": (dynamic["tokens_per_s"] / none["tokens_per_s"]
                                             if "tokens_per_s" in dynamic and "tokens_per_s" in none else None),
        "recompiles_per_block_kind": max(
            (count for region, count in ((dynamic.get("compile") or {}).get("recompiles") or {}).items()
             if region.startswith("block:")), default=None),
    }
    out = {}
    for name, value in values.items():
        target = TARGETS[name]
        at_most = name == "recompiles_per_block_kind"
        met = None if value is None else (value <= target if at_most else value >= target)
        out[name] = {"value": value, "target": f"{'<=' if at_most else '>='} {target}", "met": met,
                     "missed_by": None if met is None or met else abs(value - target)}
    return out


def write(results: Dict[str, Any], path: Path) -> None:
    results["targets"] = targets(results["sections"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def environment(cuda: bool) -> Dict[str, Any]:
    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if cuda:
        info.update(device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    peak_flops=peak_flops(torch.device("cuda")))
    else:
        info["device"] = "cpu (no CUDA: toy sizes, the plumbing only)"
    return info


def print_table(results: Dict[str, Any]) -> None:
    print(f"\ngpu-check on {results['environment']['device']} in {results['wall_s']:.0f} s")
    for name, section in results["sections"].items():
        print(f"  {name}: {json.dumps(section, default=str)[:600]}")
    for name, target in results["targets"].items():
        print(f"  target {name}: {target['value']} ({target['target']}) met={target['met']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of " + ", ".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="toy sizes (the default without CUDA)")
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--timed-steps", type=int, default=30)
    parser.add_argument("--max-map-steps", type=int, default=240, help="dynamic_q: stop here even short of 20 maps")
    parser.add_argument("--budget-s", type=float, default=450, help="sections left when this is spent are skipped")
    parser.add_argument("--test-timeout-s", type=float, default=150)
    args = parser.parse_args()
    args.cuda = torch.cuda.is_available()
    args.quick = args.quick or not args.cuda
    if args.quick:
        args.warmup_steps, args.timed_steps, args.max_map_steps = 4, 4, min(args.max_map_steps, 40)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    started = time.perf_counter()
    results: Dict[str, Any] = {"environment": environment(args.cuda), "sections": {}, "section_s": {}, "errors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            if time.perf_counter() - started > args.budget_s:
                results["sections"][name] = {"skipped": f"the {args.budget_s:.0f} s budget was spent"}
                continue
            section_started = time.perf_counter()
            print(f"gpu-check: {name}", flush=True)
            try:
                results["sections"][name] = SECTIONS[name](args, Path(tmp), results)
            except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
                results["errors"][name] = traceback.format_exc(limit=6)
                print(f"gpu-check: {name} failed: {type(err).__name__}: {err}", flush=True)
            results["section_s"][name] = time.perf_counter() - section_started
            results["wall_s"] = time.perf_counter() - started
            write(results, args.out)
            release_memory()
    print_table(results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
