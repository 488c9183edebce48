"""``tyingrun-export RUN_DIR OUT_DIR``: a GPT-2 run's newest checkpoint as a Hugging Face GPT-2 folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

from tyingrun.errors import BadInput, fail
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.hf_gpt2 import to_hf
from tyingrun.run import load_checkpointed_model


def load_run_model(run_dir: Path) -> GPT2:
    """The run's GPT-2 with the weights and tying map of its newest checkpoint, LoRA corrections merged."""
    cfg, _, model, _ = load_checkpointed_model(run_dir, "export")
    if not isinstance(model, GPT2):
        raise BadInput(f"{run_dir} trained model={cfg.model.name}; only GPT-2 runs export to Hugging Face GPT-2")
    if model.stack.has_lora:
        # policy=recursive: each slot's weights become W + B A, every slot its own (Hugging Face GPT-2 has no ties).
        model.stack.merge_lora()
    return model


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tyingrun-export",
        description="Write a GPT-2 run's newest checkpoint as a Hugging Face folder (config.json + "
                    "model.safetensors) that transformers.GPT2LMHeadModel.from_pretrained loads; tied layer "
                    "slots become copies of their roots.",
    )
    parser.add_argument("run_dir", type=Path, help="a tyingrun run folder with checkpoints/")
    parser.add_argument("out_dir", type=Path, help="the folder to write")
    args = parser.parse_args(argv)
    try:
        model = load_run_model(args.run_dir.expanduser())
        to_hf(model, args.out_dir.expanduser())
    except BadInput as err:
        fail(str(err), program="tyingrun-export")
    except OSError as err:
        where = err.filename or args.out_dir
        fail(f"cannot write {where}: {err.strerror or err}; give a new or writable OUT_DIR", program="tyingrun-export")
    except (KeyError, TypeError, ValueError) as err:
        fail(f"{args.run_dir}: its checkpoint does not read back ({type(err).__name__}: {err}); it is damaged",
             program="tyingrun-export")
    print(f"wrote {args.out_dir} (GPT-2, {len(model.stack)} layers, tie_word_embeddings={model.tokens.tied})")


if __name__ == "__main__":
    main()
