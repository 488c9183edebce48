"""``tyingrun-inspect RUN_DIR``: where the sharing is in a run, read from its newest checkpoint (nothing trains).

It prints the final map, what each slot shares and with which slot, the unique and trainable parameter counts,
and per slot the bytes of weights, gradients and optimizer state that the slot's own storage costs (a tied
slot's shared tensors cost nothing: they are its root's). The rows add up to ``train_state_bytes``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from tyingrun.errors import BadInput, fail
from tyingrun.run import load_checkpointed_model
from tyingrun.train.optim import build_optimizer, sync_optimizer
from tyingrun.tying import counts
from tyingrun.tying.weights import storage_key

CPU = torch.device("cpu")


def load_run(run_dir: Path):
    """The run's model (map, flags, weights) and optimizer (state) as its newest checkpoint left them."""
    cfg, checkpoint, model, state = load_checkpointed_model(run_dir, "inspect")
    optimizer = build_optimizer(model, cfg.train, replace(cfg.hardware, fused_adamw=False), CPU)
    sync_optimizer(optimizer, model)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise BadInput(f"checkpoint {checkpoint}: the optimizer state does not fit the model ({err})") from None
    return cfg, checkpoint, model, optimizer


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def storage_rows(model, optimizer) -> List[Dict[str, Any]]:
    """One row per slot, then one for everything outside the stack: what it reads from whom, and the bytes of the
    weights, gradients and optimizer state of the storage it owns (each storage counted once, where it lives)."""
    stack = model.stack
    seen = set()

    def cost(params) -> Dict[str, int]:
        weights = grads = state = 0
        for param in params:
            key = storage_key(param)
            if key in seen:
                continue
            seen.add(key)
            weights += param.untyped_storage().nbytes()
            grads += _bytes(param) if param.requires_grad else 0
            state += sum(_bytes(v) for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v))
        return {"weights": weights, "grads": grads, "optimizer": state}

    rows = []
    for slot in range(len(stack)):
        reads = stack.reads(slot)
        block = dict(stack.blocks[slot].named_parameters())
        # policy=recursive: a slot's LoRA factors are its own storage.
        lora = list(stack.lora[slot].parameters())
        own = [block[name] for name, source in reads.items() if source == slot] + lora
        shared = sorted(name for name, source in reads.items() if source != slot)
        shares = _describe(shared, block, stack) + (" (+ own LoRA)" if lora else "")
        rows.append({"slot": slot, "root": stack.src[slot], "trainable": stack.is_trainable(slot) or bool(lora),
                     "shares": shares, "own_params": sum(p.numel() for p in own),
                     **cost(own)})
    if stack.looping is not None and len(list(stack.looping.parameters())):
        # policy=looped: the input injection's matrix and the per-loop scales, beside the slots.
        loop_params = list(stack.looping.parameters())
        rows.append({"slot": "loops", "root": None, "trainable": any(p.requires_grad for p in loop_params),
                     "shares": "-", "own_params": sum(p.numel() for p in loop_params), **cost(loop_params)})
    in_stack = {id(p) for p in stack.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_stack]
    rows.append({"slot": "rest", "root": None, "trainable": any(p.requires_grad for p in rest), "shares": "-",
                 "own_params": sum(p.numel() for p in counts.unique_parameters(rest).values()), **cost(rest)})
    return rows


def _describe(shared: List[str], block: Dict[str, Any], stack) -> str:
    if not shared:
        return "nothing (own weights)"
    if len(shared) == len(block):
        return "the whole block"
    parts = sorted({name.split(".")[0] for name in shared})
    return ", ".join(parts)


def looped_parts(cfg, stack) -> Dict[int, str]:
    """policy=looped: the part each slot belongs to (prelude, the core at loop k, coda; or layer i's k-th run)."""
    if cfg.policy.name != "looped":
        return {}
    if stack.looping is None:
        roots = sorted(set(stack.src))
        return {slot: f"layer {roots.index(root)}, run {slot - root + 1}/{stack.src.count(root)}"
                for slot, root in enumerate(stack.src)}
    plan = stack.looping.plan
    parts = plan.parts()
    named = {slot: "prelude" for slot in parts["prelude"]}
    named.update({slot: f"core, loop {(slot - plan.prelude) // plan.core + 1}" for slot in parts["core"]})
    named.update({slot: "coda" for slot in parts["coda"]})
    return named


def looped_line(cfg, stack) -> List[str]:
    """The looped layout in one line (policy=looped), else nothing."""
    p = cfg.policy
    if p.name != "looped":
        return []
    if stack.looping is None:
        return [f"looped: per-layer repeat counts {list(p.counts)}  loop params {p.loop_params}"]
    plan = stack.looping.plan
    return [f"looped: prelude {plan.prelude} + core {plan.core} x {plan.loops} loops + coda {plan.coda}  "
            f"train loops {p.train_loops}  inject {p.inject}  loop params {p.loop_params}"]


def report(run_dir: Path) -> str:
    cfg, checkpoint, model, optimizer = load_run(run_dir)
    stack = model.stack
    rows = storage_rows(model, optimizer)
    norms = " (with its norm)" if stack.share_norms else ""
    lines = [
        f"run {run_dir}  checkpoint {checkpoint.name}",
        f"model {cfg.model.name} {len(stack)}x{cfg.model.d_model}  policy {cfg.policy.name}  grad {stack.grad_mode}  "
        f"share {stack.share}{norms}",
        f"final map {list(stack.src)}  trainable {stack.effective_trainable}",
        *looped_line(cfg, stack),
        f"parameters: total (untied) {counts.total_params(model):,}  unique {counts.stored_params(model):,}  "
        f"trainable {counts.trainable_params(model):,}",
        "",
        f"{'slot':>4}  {'root':>4}  {'shares from root':<24} {'trainable':>9}  {'own params':>11}  {'weights B':>11}  "
        f"{'grads B':>11}  {'optimizer B':>11}",
    ]
    parts = looped_parts(cfg, stack)
    for row in rows:
        root = "" if row["root"] is None else row["root"]
        shares = row["shares"] if row["root"] != row["slot"] else "-"
        part = f"  {parts[row['slot']]}" if row["slot"] in parts else ""
        lines.append(f"{row['slot']:>4}  {root:>4}  {shares:<24} {str(row['trainable']):>9}  {row['own_params']:>11,}  "
                     f"{row['weights']:>11,}  {row['grads']:>11,}  {row['optimizer']:>11,}{part}")
    total = {key: sum(row[key] for row in rows) for key in ("weights", "grads", "optimizer")}
    lines.append(f"{'total':>4}  {'':>4}  {'':<24} {'':>9}  {counts.stored_params(model):>11,}  "
                 f"{total['weights']:>11,}  {total['grads']:>11,}  {total['optimizer']:>11,}")
    lines.append(f"train_state_bytes {counts.train_state_bytes(model, optimizer):,} (weights + gradients + optimizer "
                 f"state, each storage once)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tyingrun-inspect",
        description="Where the sharing is in a run, from its newest checkpoint: the final map, what each slot shares, "
                    "unique and trainable parameters, and per slot the bytes of weights, gradients and optimizer "
                    "state. Nothing is trained.",
    )
    parser.add_argument("run_dir", type=Path, help="a tyingrun run folder with checkpoints/")
    args = parser.parse_args(argv)
    try:
        run_dir = args.run_dir.expanduser()
        if not run_dir.is_dir():
            raise BadInput(f"{run_dir} is not a folder; give a tyingrun run folder")
        text = report(run_dir)
    except BadInput as err:
        fail(str(err), program="tyingrun-inspect")
    print(text)


if __name__ == "__main__":
    main()
