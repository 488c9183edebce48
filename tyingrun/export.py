"""``tyingrun-export RUN_DIR OUT_DIR``: a GPT-2 or Llama run's newest checkpoint as a Hugging Face folder, checked
after writing: the folder is loaded back and must reproduce the run's logits and loss on validation batches, or
no folder is left (a layer-shared model exported wrongly still loads, and only its scores show it)."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.config import Config
from tyingrun.contracts import Batch, TiedModule
from tyingrun.errors import EXIT_FAILED, BadInput, fail
from tyingrun.files import read_json
from tyingrun.models import hf_gpt2, hf_llama
from tyingrun.models.hf_llama import HF_CONFIG
from tyingrun.run import build_data, load_checkpointed_model

PROGRAM = "tyingrun-export"
# Validation batches the written folder must reproduce, and how closely: logits within LOGIT_TOLERANCE times
# max(1, their largest magnitude), the mean loss within LOSS_TOLERANCE (fp32 on both sides).
VERIFY_BATCHES = 4
LOGIT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-4
FOLDER_README = """# {name}, exported by tyingrun

Written by `tyingrun-export` from the run `{run}` (its newest checkpoint, {checkpoint}).
`transformers.AutoModelForCausalLM.from_pretrained` loads it as `{architecture}` ({n_layer} layers).

A standard {family} has no layer tying: every tied layer slot of the run is written here as a copy of the
slot it shares, so this folder stores {n_layer} layers although the run trained {unique} distinct ones
(its tying map was {map}). LoRA corrections (policy=recursive) are merged into each slot's weights.
The input embedding and the LM head are {tie}.

The export reloaded this folder with {reader} and checked it against the run on {batches} validation batches:
largest logit difference {logit_diff:.2e}, loss {loss_ours:.6f} (run) vs {loss_theirs:.6f} (folder).
`tokenizer.json` is the run's tokenizer.
"""


@dataclass(frozen=True)
class Format:
    write: Callable[[Any, Path], None]
    read: Callable[[Path], nn.Module]  # tyingrun's own reader, when transformers is not installed
    family: str


FORMATS = {"gpt2": Format(hf_gpt2.to_hf, hf_gpt2.from_hf, "GPT-2"),
           "llama": Format(hf_llama.to_hf, hf_llama.from_hf, "Llama")}


class ExportMismatch(Exception):
    """The written folder does not compute what the run computes."""


def load_for_export(run_dir: Path) -> tuple[Config, Path, TiedModule, dict]:
    """The run's config, newest checkpoint, model (its weights and tying map, LoRA corrections merged) and state."""
    cfg, checkpoint, model, state = load_checkpointed_model(run_dir, "export")
    if cfg.model.name not in FORMATS:
        raise BadInput(f"{run_dir} trained model={cfg.model.name}; only GPT-2 and Llama runs export to Hugging Face")
    looping = model.stack.looping
    if looping is not None and (looping.injection is not None or len(looping.scales)):
        raise BadInput(f"{run_dir} is a looped model with policy.inject={cfg.policy.inject} and policy.loop_params="
                       f"{cfg.policy.loop_params}; a Hugging Face {cfg.model.name} has no input injection or per-loop "
                       f"scales, so only looped runs without them export (adaln and lora do)")
    if model.stack.has_lora:
        # policy=recursive: each slot's weights become W + B A, every slot its own (Hugging Face models have no ties).
        model.stack.merge_lora()
    return cfg, checkpoint, model, state


def load_run_model(run_dir: Path) -> TiedModule:
    """The run's model as ``tyingrun-export`` writes it (load_for_export)."""
    return load_for_export(run_dir)[2]


def reloaded(folder: Path, fmt: Format) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The written folder as a function of token ids to logits, and what read it: transformers when installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        model = fmt.read(folder).eval()
        return model, "tyingrun's own reader (transformers is not installed)"
    from transformers.utils import logging as hf_logging

    # The export's own line is its whole output: no loading bars or notes from transformers.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return (lambda ids: hf(ids).logits), f"transformers' {type(hf).__name__}"


@torch.no_grad()
def compare(model: nn.Module, folder: Path, fmt: Format, batches: Iterable[Batch]) -> dict:
    """Logits and mean loss of the run's model and of the written folder on ``batches``."""
    theirs, reader = reloaded(folder, fmt)
    worst, loss_ours, loss_theirs, count = 0.0, 0.0, 0.0, 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"].flatten()
        ours_logits, their_logits = model(ids).float(), theirs(ids).float()
        scale = max(1.0, ours_logits.abs().max().item())
        worst = max(worst, (ours_logits - their_logits).abs().max().item() / scale)
        loss_ours += F.cross_entropy(ours_logits.flatten(0, 1), labels).item()
        loss_theirs += F.cross_entropy(their_logits.flatten(0, 1), labels).item()
        count += 1
    return {"reader": reader, "batches": count, "logit_diff": worst, "loss_ours": loss_ours / count,
            "loss_theirs": loss_theirs / count}


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadInput(f"{out_dir} exists and is not an empty folder; give a new OUT_DIR")


def export_run(run_dir: Path, out_dir: Path) -> str:
    """Write ``run_dir`` as a Hugging Face folder at ``out_dir``, verified, and say what was written; nothing is left
    there when the folder does not reproduce the run (ExportMismatch)."""
    check_out_dir(out_dir)
    cfg, checkpoint, model, state = load_for_export(run_dir)
    model.eval()
    fmt = FORMATS[cfg.model.name]
    data = build_data(cfg)
    staging = out_dir.parent / f".{out_dir.name}.tyingrun-export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fmt.write(model, staging)
        cast(Any, data).tokenizer.save(str(staging / "tokenizer.json"))  # LMData: GPT-2 and Llama train on text
        checked = compare(model, staging, fmt, data.eval_batches("val", cfg.train.batch_size, VERIFY_BATCHES))
        loss_gap = abs(checked["loss_ours"] - checked["loss_theirs"])
        if checked["logit_diff"] > LOGIT_TOLERANCE or loss_gap > LOSS_TOLERANCE:
            raise ExportMismatch(
                f"the written folder does not reproduce the run: reloaded with {checked['reader']}, its logits "
                f"differ by up to {checked['logit_diff']:.2e} (relative) and its validation loss is "
                f"{checked['loss_theirs']:.6f} against the run's {checked['loss_ours']:.6f}; nothing was written "
                f"to {out_dir}")
        written = read_json(staging / HF_CONFIG)
        (staging / "README.md").write_text(_readme(cfg, run_dir, checkpoint, state, written, fmt, checked))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (f"wrote {out_dir} ({fmt.family}, {len(model.stack)} layers, "
            f"tie_word_embeddings={written['tie_word_embeddings']}); "
            f"reloaded with {checked['reader']}: logits within {checked['logit_diff']:.1e}, val loss "
            f"{checked['loss_theirs']:.4f} as the run's {checked['loss_ours']:.4f}")


def _readme(cfg: Config, run_dir: Path, checkpoint: Path, state: dict, written: dict, fmt: Format,
            checked: dict) -> str:
    """The folder's README.md, from the run and the folder's config.json (``written``)."""
    return FOLDER_README.format(
        name=f"{cfg.model.name} {cfg.model.n_layer}x{cfg.model.d_model}", run=run_dir, checkpoint=checkpoint.name,
        architecture=written["architectures"][0], n_layer=len(state["map"]), family=fmt.family,
        unique=len(set(state["map"])), map=state["map"],
        tie="one tied matrix (tie_word_embeddings=true)" if written["tie_word_embeddings"] else "two matrices",
        **checked)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Write a GPT-2 or Llama run's newest checkpoint as a Hugging Face folder (config.json, "
                    "model.safetensors, tokenizer.json, README.md) that transformers.AutoModelForCausalLM."
                    "from_pretrained loads. A standard GPT-2 or Llama has no layer tying, so tied layer slots are "
                    "written as copies of the slots they share, and policy=recursive's LoRA corrections are merged. "
                    "The folder is then loaded back and must reproduce the run's logits and loss on "
                    f"{VERIFY_BATCHES} validation batches; if it does not, nothing is left at OUT_DIR (exit 1).",
    )
    parser.add_argument("run_dir", type=Path, help="a tyingrun run folder with checkpoints/")
    parser.add_argument("out_dir", type=Path, help="the folder to write (new or empty)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir.expanduser()
    try:
        print(export_run(args.run_dir.expanduser(), out_dir))
    except BadInput as err:
        fail(str(err), program=PROGRAM)
    except ExportMismatch as err:
        fail(str(err), EXIT_FAILED, program=PROGRAM)
    except OSError as err:
        where = err.filename or out_dir
        fail(f"cannot write {where}: {err.strerror or err}; give a new or writable OUT_DIR", program=PROGRAM)
    except (KeyError, TypeError, ValueError) as err:
        fail(f"{args.run_dir}: its checkpoint does not read back ({type(err).__name__}: {err}); it is damaged",
             program=PROGRAM)


if __name__ == "__main__":
    main()
