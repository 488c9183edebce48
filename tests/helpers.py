"""What several test modules use: tiny models and batches, small run configs, fake run folders, JSONL rows, and the
one-line-error checks (in-process through composition, or on a real `tyingrun` process). Test modules import from
here, never from each other; conftest.py holds only fixtures."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional
from unittest import mock

import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tyingrun.config import (
    Config,
    DatasetConfig,
    HardwareConfig,
    LogConfig,
    ModelConfig,
    PolicyConfig,
    TrainConfig,
)
from tyingrun.data.lm import MaskedLM
from tyingrun.errors import EXIT_BAD_INPUT
from tyingrun.models.bert import BERT
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.vit import ViT

# The model and batch of a CLI run that takes seconds; each test module adds its own schedule.
# Throughput in metrics.jsonl and summary.json: what a resumed run may not reproduce.
TIMING_KEYS = ("tokens_per_s", "samples_per_s")
TINY_RUN = ["model.n_layer=4", "model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "log.progress=lines"]
# `python -m torch.distributed.run` for N local ranks: entry=(*LAUNCHER, "2", "-m", "tyingrun.cli").
LAUNCHER = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node")
# The option set of the learning study's dynamic_q_learning arm (docs/studies.md#the-learning-study), without its K
# (tests/test_learning_study.py keeps the two equal).
BEST = dict(reward="paired_improvement", reward_normalization=True, epsilon_schedule="decision",
            epsilon_decay_per_decision=0.985, td_target="next_decision", replay=256, target_update=20,
            q_lr_decay_updates=20)
SUMMARY_KEYS = {
    "status", "model", "dataset", "policy", "steps", "n_layer", "final_map", "independent_layers",
    "trainable_layers", "independent_layers_mean", "val_loss", "val_ppl", "total_params", "trainable_params",
    "trainable_params_mean", "stored_params", "train_state_bytes", "peak_memory_bytes", "peak_memory_kind",
    "wall_time_s", "tokens_per_s", "seed", "mfu", "compile_graphs", "compile_recompiles",
}


# ---- JSONL ----


def read_jsonl(path: Path, drop: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """The rows of a JSONL file, without the keys in ``drop`` (timings, say, that differ between equal runs)."""
    dropped = set(drop)
    return [{k: v for k, v in json.loads(line).items() if k not in dropped} for line in path.read_text().splitlines()]


# ---- one-line errors ----


def assert_one_line(result: Any, code: int = EXIT_BAD_INPUT, *words: str, program: str = "tyingrun",
                    ignore_warnings: bool = False) -> str:
    """A finished process (CompletedProcess) exited ``code`` with one line on stderr, ``<program>: error: ...``
    holding every one of ``words``, and no traceback anywhere; returns that line. ``ignore_warnings`` leaves
    warning lines (``tyingrun: warning:``, ``<program>: warning:``) out of the count."""
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in (result.stdout or "") + result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    if ignore_warnings:
        lines = [line for line in lines if not line.startswith(("tyingrun: warning:", f"{program}: warning:"))]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def bad_input_line(overrides: List[str], out_dir: Optional[Path] = None) -> str:
    """The line `tyingrun *overrides` ends with, found in-process on the CLI's own path: Hydra composes the config,
    the preflight checks it, then the run's parts are built (data, resume point, model) into ``out_dir``. Asserts
    that it is bad input (the CLI's exit 2), one line, and that nothing was written into ``out_dir``."""
    from tyingrun.cli import describe_failure
    from tyingrun.data_cli import compose_config
    from tyingrun.run import build_parts

    try:
        cfg = compose_config(list(overrides))
        if out_dir is not None:
            build_parts(cfg, out_dir)
    except Exception as err:  # noqa: BLE001 - every failure is what the test inspects
        message, code = describe_failure(err)
    else:
        raise AssertionError(f"tyingrun {' '.join(overrides)} was accepted")
    assert code == EXIT_BAD_INPUT, message
    assert message and "\n" not in message and "Traceback" not in message, message
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    return f"tyingrun: error: {message}"


def call_main(main: Callable[[List[str]], None], argv: List[str], capsys: Any) -> subprocess.CompletedProcess:
    """Call an entry point that takes its argv (``report_main``, ``export.main``, ``data_cli.main``) in-process, as
    its console script would: its exit status (0 unless it exits) and what it printed, in a CompletedProcess."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


# ---- tiny models and batches ----


def tiny_gpt2(n_layer=4, grad_mode="shared", vocab=64, d_model=32, seed=0, dropout=0.0, tie=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=n_layer, n_head=2, d_model=d_model, dropout=dropout, max_positions=32,
                      tie_embeddings=tie)
    return GPT2(cfg, vocab, grad_mode)


def lm_batch(vocab=64, batch=4, length=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def counted_flops_per_token(model, vocab=64, batch=2, length=32):
    """FLOPs of one training step of ``model`` on a random batch, as torch's FlopCounterMode counts them, per token."""
    batch = lm_batch(vocab=vocab, batch=batch, length=length)
    # The math backend runs attention as matrix products, which the counter sees (fused kernels it may not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(batch).loss.backward()
    return counter.get_total_flops() / batch["input_ids"].numel()


def tiny_bert(n_layer=4, grad_mode="shared", vocab=64, d_model=32, seed=0, causal=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="bert", n_layer=n_layer, n_head=2, d_model=d_model, max_positions=32, causal=causal)
    return BERT(cfg, vocab, grad_mode)


def mlm_batch(vocab=64, batch=4, length=16, seed=1):
    """An lm_batch masked as BERT's data masks it ([MASK] is id 0; no other special tokens)."""
    masking = MaskedLM(mask_id=0, vocab_size=vocab, special_ids=torch.tensor([0]))
    return masking(lm_batch(vocab, batch, length, seed), torch.Generator().manual_seed(seed))


def tiny_vit(n_layer=4, grad_mode="shared", d_model=32, seed=0, image_size=8, channels=1, n_classes=10):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="vit", n_layer=n_layer, n_head=2, d_model=d_model, patch_size=2)
    return ViT(cfg, image_size, channels, n_classes, grad_mode)


def image_batch(batch=4, image_size=8, channels=1, n_classes=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(batch, channels, image_size, image_size, generator=generator),
        "labels": torch.randint(0, n_classes, (batch,), generator=generator),
    }


# Each model with the batches it trains on, for tests that must hold for every architecture.
TINY_MODELS: Dict[str, tuple[Callable, Callable]] = {
    "gpt2": (tiny_gpt2, lm_batch), "bert": (tiny_bert, mlm_batch), "vit": (tiny_vit, image_batch),
}


# ---- runs ----


def small_lm_config(policy="cyclic", max_steps=6, model_keys=None, train_keys=None, policy_keys=None):
    """A GPT-2 run on pydoc that takes seconds on a CPU."""
    return Config(
        model=ModelConfig(n_layer=4, d_model=64, n_head=4, **(model_keys or {})),
        dataset=DatasetConfig(block_size=64),
        policy=PolicyConfig(name=policy, **{"n_sets": 2, **(policy_keys or {})}),
        hardware=HardwareConfig(name="cpu", device="cpu", precision="fp32"),
        train=TrainConfig(**{"max_steps": max_steps, "batch_size": 8, "warmup_steps": 2, "eval_interval": max_steps,
                             "eval_batches": 2, "log_interval": max_steps, **(train_keys or {})}),
        log=LogConfig(progress="lines"),
    )


def count_host_reads(monkeypatch: Any) -> Dict[str, int]:
    """Counts Tensor.item and Tensor.tolist calls inside Trainer.run_step: in the training step and its log line
    ("training"), in the evaluations it runs ("evaluation", Evaluator.measure), and in the optimizer's step
    ("optimizer": the CPU's AdamW reads its own step counter, a CPU tensor; CUDA's fused AdamW does not)."""
    from tyingrun.train.evaluation import Evaluator
    from tyingrun.train.trainer import Trainer

    reads = {"training": 0, "evaluation": 0, "optimizer": 0}
    where = []
    for method in ("item", "tolist"):
        original = getattr(torch.Tensor, method)

        def counted(tensor, *args, _original=original, **kwargs):
            if where:
                reads[where[-1]] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    for owner, name, role in ((Trainer, "run_step", "training"), (Evaluator, "measure", "evaluation"),
                              (torch.optim.AdamW, "step", "optimizer")):
        original = getattr(owner, name)

        def inside(self, *args, _original=original, _role=role, **kwargs):
            where.append(_role)
            try:
                return _original(self, *args, **kwargs)
            finally:
                where.pop()

        monkeypatch.setattr(owner, name, inside)
    return reads


def run_folder(cfg, folder):
    """Run ``cfg`` in-process into ``folder``, leaving the .hydra/config.yaml that the CLI's Hydra would write."""
    from tyingrun.run import run

    summary = run(cfg, folder)
    (folder / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), folder / ".hydra" / "config.yaml")
    return summary


def compose_and_run(overrides: List[str], folder: Path) -> Dict[str, Any]:
    """Run what `tyingrun *overrides hydra.run.dir=folder` runs, in-process: the CLI's composition and checks, then
    the run; leaves the folder's files but Hydra's own (.hydra/, run.log). Returns the summary."""
    from tyingrun.data_cli import compose_config
    from tyingrun.run import run

    return run(compose_config(list(overrides)), folder)


def follow(context, decision):
    """Apply ``decision`` to the context's map, as the trainer applies it to the model's stack."""
    context.src, context.trainable = list(decision.src), list(decision.trainable)


def run_steps(policy, context, steps):
    """``steps`` decision points of ``policy``; a context without a map starts from the policy's initial one. The
    decisions it returned."""
    if context.trainable is None:
        follow(context, policy.start(policy.n_layer))
    decisions = []
    for _ in range(steps):
        context.step += 1
        decision = policy.after_step(context)
        if decision is not None:
            follow(context, decision)
            decisions.append(decision)
    return decisions


# A GPT-2 run on pydoc for the data-parallel tests: 12 steps, evaluated at 0, 6 and 12.
PARALLEL_RUN = [
    "model.n_layer=4", "model.d_model=64", "dataset.block_size=64", "train.batch_size=8", "train.eval_batches=4",
    "train.max_steps=12", "train.log_interval=1", "train.eval_interval=6", "log.progress=lines",
]


def parallel_run(cli, run_dir, *overrides, ranks=1, parallel="ddp"):
    """A PARALLEL_RUN on the CPU: ``ranks`` gloo ranks under torchrun and hardware=``parallel`` (ddp or fsdp), or
    with ``ranks=1`` the one-process run they are compared with, in-process (compose_and_run). Every process
    computes on one thread, as torchrun sets it for its ranks: a run's time does not depend on what else keeps the
    cores busy (a spinning second thread of one process is slow on a busy machine)."""
    if ranks == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            compose_and_run([*PARALLEL_RUN, "hardware=cpu", *overrides], run_dir)
        finally:
            torch.set_num_threads(threads)
        return run_dir
    cli(*PARALLEL_RUN, f"hardware={parallel}", *overrides, f"hydra.run.dir={run_dir}",
        entry=(*LAUNCHER, str(ranks), "-m", "tyingrun.cli"), expect=0, env={"OMP_NUM_THREADS": "1"})
    return run_dir


def compose(overrides, **kwargs):
    """Hydra's composition of conf/ with ``overrides`` (a DictConfig, unchecked), as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from tyingrun.config import register_configs

    register_configs()
    with initialize_config_module("tyingrun.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides, **kwargs)


# ---- fake run folders for the report ----


def make_run(folder, seed=0, summary=None, status=None, **policy):
    config = {
        "model": {"name": "gpt2", "n_layer": 4},
        "dataset": {"name": "pydoc"},
        "policy": {"name": "dynamic_q", "reward": "paper", "steps_per_decision": 4, **policy},
        "train": {"seed": seed, "max_steps": 8},
        "log": {"progress": "auto"},
    }
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps({"steps": 8, "seed": seed, **summary}))
        (folder / "maps.jsonl").write_text(
            json.dumps({"step": 0, "map": [0, 1, 2, 3], "trainable": [True, False, False, False]}) + "\n"
            + json.dumps({"step": 4, "map": [0, 0, 2, 3], "trainable": [True, False, True, False]}) + "\n"
        )
    if status is not None:
        (folder / "status.json").write_text(json.dumps(status))
    return folder


def summary(ppl, params, layers=2.0):
    return {
        "val_ppl": ppl, "val_loss": 1.0, "trainable_params": params, "trainable_params_mean": params * 1.5,
        "independent_layers": layers, "independent_layers_mean": layers + 1, "trainable_layers": layers,
        "trainable_layers_mean": layers, "train_state_bytes": params * 16, "peak_memory_bytes": 2**28,
        "peak_memory_kind": "cpu_rss", "wall_time_s": 3.0, "tokens_per_s": 1000.0,
    }


def run_summary(test_ppl=None, val_ppl=None, **extra):
    """A summary with val_ppl (one more than test_ppl unless given) and, where given, test_ppl."""
    values = summary(val_ppl if val_ppl is not None else test_ppl + 1.0, 1000)
    if test_ppl is not None:
        values["test_ppl"] = test_ppl
    return {**values, **extra}


def report(root, out, reference="none", figures=False):
    """Write the report of ``root`` into ``out``; its CSV rows by group name, report.md and the console output.

    Without ``figures`` no PNG is drawn (a second each): the tables and notes are what these tests read; the
    figures have tests of their own (test_report, test_peak_memory, test_sweeps)."""
    from rich.console import Console

    from tyingrun.report import write_report

    console = Console(file=io.StringIO(), width=400)
    drawing = contextlib.nullcontext() if figures else mock.patch("tyingrun.report.write_figures", return_value=[])
    with drawing:
        write_report([root], out, console, reference=reference)
    rows = {" ".join(filter(None, (row["policy"], row["label"]))): row
            for row in csv.DictReader((out / "report.csv").open())}
    return rows, (out / "report.md").read_text(), console.file.getvalue()


def start_and_wait_for_checkpoint(cli, run_dir, *overrides):
    """Start ``tyingrun *overrides`` into ``run_dir`` and return the process once its first checkpoint exists."""
    process = cli.popen(*overrides, f"hydra.run.dir={run_dir}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step_*")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return process
