"""Tokenizers: byte-level BPE trained on a corpus and cached, the GPT-2 tokenizer, or a local tokenizer.json."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tyingrun.config import DatasetConfig
from tyingrun.data.text import (
    Corpus,
    atomic_output,
    cache_root,
    documents_hash,
    first_line,
    go_offline_unless_hub_reachable,
    hub_offline,
    short_hash,
)
from tyingrun.errors import BadInput

__all__ = ["EOS", "cache_root", "load_tokenizer", "train_bpe"]

log = logging.getLogger("tyingrun")

EOS = "<|endoftext|>"
BPE_FORMAT = 1
# Byte-level BPE starts from all 256 bytes plus the end-of-text token.
MIN_BPE_VOCAB = 257


def load_tokenizer(cfg: DatasetConfig, corpus: Corpus) -> Tokenizer:
    if cfg.tokenizer_path:
        return _tokenizer_from_file(cfg.tokenizer_path)
    if cfg.tokenizer == "gpt2":
        return _gpt2_tokenizer()
    if cfg.tokenizer == "bpe":
        return _cached_bpe(cfg, corpus)
    raise BadInput(f"dataset.tokenizer={cfg.tokenizer!r} is not an option; choose one of: bpe, gpt2")


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def _cached_bpe(cfg: DatasetConfig, corpus: Corpus) -> Tokenizer:
    if cfg.vocab_size < MIN_BPE_VOCAB:
        raise BadInput(
            f"dataset.vocab_size={cfg.vocab_size} is too small for byte-level BPE; use at least {MIN_BPE_VOCAB}"
        )
    key = short_hash(BPE_FORMAT, cfg.vocab_size, documents_hash(corpus.train))
    path = cache_root(cfg) / "tokenizers" / f"bpe-{cfg.vocab_size}-{key}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    log.info("training a byte-level BPE tokenizer (vocab %d) on %s (once; cached)", cfg.vocab_size, corpus.name)
    tokenizer = train_bpe(corpus.train, cfg.vocab_size)
    with atomic_output(path) as tmp:
        tokenizer.save(str(tmp))
    return tokenizer


def _tokenizer_from_file(given: str) -> Tokenizer:
    path = Path(given).expanduser()
    if not path.is_file():
        raise BadInput(f"dataset.tokenizer_path: no such file '{given}'; give a tokenizer.json saved by `tokenizers`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for any malformed file
        raise BadInput(f"dataset.tokenizer_path: '{given}' is not a tokenizer.json ({first_line(error)})") from error
    # A tokenizer saved for a classifier may truncate or pad; documents must stay whole.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _gpt2_tokenizer() -> Tokenizer:
    go_offline_unless_hub_reachable()
    try:
        return Tokenizer.from_pretrained("gpt2")
    except Exception as error:  # hub errors come as many unrelated types
        offline = "neither cached nor reachable (offline)"
        state = offline if hub_offline() else f"could not be loaded ({first_line(error)})"
        raise BadInput(
            f"dataset.tokenizer=gpt2: the GPT-2 tokenizer is {state}; run once with internet to cache it, "
            f"or download gpt2's tokenizer.json and pass dataset.tokenizer_path=FILE"
        ) from error
