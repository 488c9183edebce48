"""``tyingrun-data``: build a dataset's train / val / test splits exactly as a run would, and report them.

    tyingrun-data dataset=pydoc [dataset.* and model.* overrides, as for tyingrun] [--dump DIR]

Prints one line per split: its documents (or images) and the tokens in its blocks, and for text corpora the
share of the split's text that repeats training paragraphs (``leaked_fraction``). ``--dump DIR`` writes a text
corpus's splits to ``DIR/train.txt``, ``val.txt`` and ``test.txt``: the documents in order, each two after
another separated by a blank line, the line DOCUMENT_SEPARATOR and another blank line (``read_dump`` reads
them back), and ``DIR/.tyingrun-dump.json``, the SHA-256 of each: a later dump replaces only files that it wrote
and that are unchanged since, so a folder holding a user's own ``train.txt`` is refused before anything is built.
A reasoning task (phop, addition, parity) prints each split's answer distribution and three examples, and ``--dump
DIR`` writes ``train.tsv``, ``val.tsv`` and ``test.tsv`` (tyingrun.data.reasoning_dump). Bad input ends in one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tyingrun.cli import CONFIG_ERRORS, explain
from tyingrun.config import Config, register_configs, reject_unknown_keys
from tyingrun.data.build import DATASET_TASKS, TEXT_DATASETS, build_dataset
from tyingrun.data.lm import LMData
from tyingrun.data.reasoning import ReasoningData
from tyingrun.data.reasoning_dump import describe_reasoning
from tyingrun.data.splits import leaked_fraction
from tyingrun.data.text import Corpus, load_corpus
from tyingrun.data.tokenizer import with_model_tokenizer
from tyingrun.errors import BadInput, fail
from tyingrun.files import atomic_path, file_sha256, read_json, write_json_atomic
from tyingrun.preflight import preflight

DOCUMENT_SEPARATOR = "<|tyingrun-document|>"
DOCUMENT_JOIN = f"\n\n{DOCUMENT_SEPARATOR}\n\n"
SPLITS = ("train", "val", "test")
PROGRAM = "tyingrun-data"
DUMP_MANIFEST = ".tyingrun-dump.json"  # file name -> SHA-256 of each split file a dump wrote
DUMP_SUFFIXES = (".txt", ".tsv")  # text corpora, reasoning tasks


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tyingrun-data",
        description="Build a dataset's train / val / test splits as tyingrun would and print their sizes and, "
                    "for text corpora, how much of val and test repeats training paragraphs.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=wiki2 dataset.variant=v1")
    parser.add_argument("--dump", metavar="DIR",
                        help="write train.txt, val.txt, test.txt (text corpora) or train.tsv, val.tsv, test.tsv "
                             "(reasoning tasks) into DIR, a new folder or one an earlier --dump wrote")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="tyingrun-data: %(message)s", stream=sys.stderr)
    try:
        dump = None if args.dump is None else dump_folder(args.dump)
        cfg = compose_config(args.overrides)
        for line in describe_splits(cfg, dump):
            print(line, flush=True)
    except BadInput as err:
        fail(str(err), program=PROGRAM)
    except (*CONFIG_ERRORS, OmegaConfBaseException) as err:
        fail(explain(err), program=PROGRAM)


def compose_config(overrides: List[str]) -> Config:
    """The config ``tyingrun`` would compose from ``overrides``, typed and checked."""
    from hydra import compose, initialize_config_module

    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    with initialize_config_module(config_module="tyingrun.conf", version_base="1.3"):
        composed = compose(config_name="config", overrides=overrides)
    reject_unknown_keys(composed)
    cfg = OmegaConf.to_object(composed)
    preflight(cfg)
    return cfg


def describe_splits(cfg: Config, dump: Optional[Path]) -> List[str]:
    """Build the data of ``cfg`` and describe each split in one line; dump a text corpus when asked."""
    name = cfg.dataset.name
    if DATASET_TASKS[name] == "reasoning":
        data = build_dataset(cfg.dataset, cfg.model, seed=cfg.train.seed)
        lines, tsv = describe_reasoning(cast(ReasoningData, data), cfg.dataset.val_size, cfg.train.seed,
                                        cfg.train.batch_size)
        if dump is not None:
            write_dump({f"{split}.tsv": text for split, text in tsv.items()}, dump)
        return lines
    if name not in TEXT_DATASETS:
        if dump is not None:
            raise BadInput(f"--dump writes text corpora; dataset={name} is an image dataset, leave --dump out")
        data = build_dataset(cfg.dataset, cfg.model)
        return [f"{name} {split}: {data.eval_items(split):,} images" for split in SPLITS]
    corpus = load_corpus(cfg.dataset)
    data = build_dataset(with_model_tokenizer(cfg.dataset, cfg.train.init_from), cfg.model, corpus)
    if dump is not None:
        write_dump({f"{split}.txt": DOCUMENT_JOIN.join(getattr(corpus, split)) for split in SPLITS}, dump)
    return [_text_split_line(corpus, cast(LMData, data), split) for split in SPLITS]


def _text_split_line(corpus: Corpus, data: LMData, split: str) -> str:
    documents = getattr(corpus, split)
    line = (
        f"{corpus.name} {split}: {len(documents):,} documents, {data.eval_items(split):,} tokens "
        f"in {len(data.blocks(split)):,} blocks of {data.block_size}"
    )
    if split != "train":
        line += f", leaked {leaked_fraction(documents, corpus.train):.2%} of its text (paragraphs found in train)"
    return line


def dump_folder(given: str) -> Path:
    """The folder ``--dump`` names, checked before anything is built: named, and not holding a split file that an
    earlier dump did not write (or that changed since it did)."""
    if not given.strip():
        raise BadInput("--dump needs a folder (it was given an empty name); give --dump DIR")
    folder = Path(given).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"--dump {given}: {folder} is a file, not a folder; give a new folder or one --dump wrote")
    try:
        written = read_json(folder / DUMP_MANIFEST)
    except (OSError, ValueError):
        written = {}
    for path in (folder / f"{split}{suffix}" for split in SPLITS for suffix in DUMP_SUFFIXES):
        if path.exists() and (not isinstance(written, dict) or written.get(path.name) != file_sha256(path)):
            raise BadInput(f"--dump {given}: {path} is not a file an earlier --dump wrote (or it changed since), and "
                           f"the dump would overwrite it; give a new folder, or move the file away")
    return folder


def write_dump(texts: Dict[str, str], folder: Path) -> None:
    """Write each file of ``texts`` (name -> text) into ``folder`` atomically, and the manifest of what it wrote."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, text in texts.items():
            path = folder / name
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
            written[name] = file_sha256(path)
        write_json_atomic(folder / DUMP_MANIFEST, written)
    except OSError as error:
        raise BadInput(f"--dump: cannot write to {folder} ({error.strerror}); give a writable folder") from error


def read_dump(path: Path) -> List[str]:
    """The documents of a split file that ``--dump`` wrote."""
    text = path.read_text(encoding="utf-8")
    return text.split(DOCUMENT_JOIN) if text else []


if __name__ == "__main__":
    main()
