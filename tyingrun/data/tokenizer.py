"""Tokenizers: byte-level BPE or WordPiece trained on a corpus and cached, the GPT-2 tokenizer, or a local
tokenizer.json."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tyingrun.config import DatasetConfig
from tyingrun.data.text import (
    Corpus,
    cache_root,
    documents_hash,
    first_line,
    go_offline_unless_hub_reachable,
    hub_offline,
    read_cached,
    short_hash,
    write_cached,
)
from tyingrun.errors import BadInput
from tyingrun.hub import model_folder

__all__ = ["EOS", "MASK", "SEP", "cache_root", "document_separator", "load_tokenizer", "train_bpe", "train_wordpiece",
           "with_model_tokenizer"]

log = logging.getLogger("tyingrun")

EOS = "<|endoftext|>"
# The end-of-sequence token of SentencePiece-style vocabularies (Llama 2, TinyLlama).
SENTENCE_END = "</s>"
MODEL_TOKENIZER = "tokenizer.json"
# BERT's special tokens, in BERT's order (ids 0-4 of a trained WordPiece vocabulary).
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
BPE_FORMAT = 1
WORDPIECE_FORMAT = 1
# Byte-level BPE starts from all 256 bytes plus the end-of-text token.
MIN_BPE_VOCAB = 257


def load_tokenizer(cfg: DatasetConfig, corpus: Corpus) -> Tokenizer:
    if cfg.tokenizer_path:
        return _tokenizer_from_file(cfg.tokenizer_path)
    if cfg.tokenizer == "gpt2":
        return _gpt2_tokenizer()
    if cfg.tokenizer == "bpe":
        if cfg.vocab_size < MIN_BPE_VOCAB:
            raise BadInput(
                f"dataset.vocab_size={cfg.vocab_size} is too small for byte-level BPE; use at least {MIN_BPE_VOCAB}"
            )
        return _cached_trained(cfg, corpus, "bpe", BPE_FORMAT, train_bpe)
    if cfg.tokenizer == "wordpiece":
        return _cached_trained(cfg, corpus, "wordpiece", WORDPIECE_FORMAT, train_wordpiece)
    if cfg.tokenizer == "from_model":
        raise BadInput("dataset.tokenizer=from_model reads the tokenizer of the model train.init_from names; set "
                       "train.init_from")
    raise BadInput(f"dataset.tokenizer={cfg.tokenizer!r} is not an option; choose one of: bpe, gpt2, wordpiece, "
                   f"from_model")


def with_model_tokenizer(cfg: DatasetConfig, init_from: Optional[str]) -> DatasetConfig:
    """``cfg`` with dataset.tokenizer=from_model resolved to the tokenizer.json of train.init_from's model folder."""
    if cfg.tokenizer != "from_model" or not init_from:
        return cfg
    path = model_folder(init_from) / MODEL_TOKENIZER
    if not path.is_file():
        raise BadInput(f"dataset.tokenizer=from_model: train.init_from={init_from} has no {MODEL_TOKENIZER}; give a "
                       f"Hugging Face model folder with one, or pick another dataset.tokenizer")
    return replace(cfg, tokenizer_path=str(path))


def document_separator(tokenizer: Tokenizer) -> int:
    """The id that ends each document in a token stream: ``<|endoftext|>``, else ``</s>``, else WordPiece's
    ``[SEP]``."""
    for token in (EOS, SENTENCE_END, SEP):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise BadInput(
        f"the tokenizer has neither {EOS} nor {SEP} to separate documents; use one that has (e.g. bpe or wordpiece)"
    )


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


def train_wordpiece(documents: list[str], vocab_size: int) -> Tokenizer:
    """BERT's tokenizer (as bert-base-uncased): lowercased, split at whitespace and punctuation, then WordPiece."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, UNK, CLS, SEP, MASK], show_progress=False
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def _cached_trained(
    cfg: DatasetConfig, corpus: Corpus, kind: str, version: int, train: Callable[[list[str], int], Tokenizer]
) -> Tokenizer:
    key = short_hash(version, cfg.vocab_size, documents_hash(corpus.train))
    path = cache_root(cfg) / "tokenizers" / f"{kind}-{cfg.vocab_size}-{key}.json"
    cached = read_cached(path, lambda p: Tokenizer.from_file(str(p)), f"{kind} tokenizer")
    if cached is not None:
        return cached
    log.info("training a %s tokenizer (vocab %d) on %s (once; cached)", kind, cfg.vocab_size, corpus.name)
    tokenizer = train(corpus.train, cfg.vocab_size)
    write_cached(path, lambda tmp: tokenizer.save(str(tmp)))
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
