"""Language-model data: token streams chunked into fixed-length blocks, a resumable shuffling sampler, eval batches.

Each corpus has three splits (train, val, test); each is tokenized, cached and chunked the same way.

Each split's documents are tokenized, each followed by the tokenizer's document separator (``<|endoftext|>``,
or ``[SEP]`` for WordPiece), and concatenated into one stream. Blocks hold ``block_size + 1`` tokens with stride
``block_size``: consecutive blocks share one token, so every token of the stream (but the first) is a prediction
target exactly once. The ragged tail is dropped.

Causal batches predict each next token. Masked-LM batches (BERT) take a block's first ``block_size`` tokens and
predict the masked ones only; every other position is labelled ``IGNORE_INDEX``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import tokenizers
import torch

from tyingrun.config import DatasetConfig
from tyingrun.contracts import IGNORE_INDEX, Batch
from tyingrun.data.sampling import ShuffledSampler, TransformedSampler
from tyingrun.data.splits import spread_sample
from tyingrun.data.text import Corpus, cache_root, documents_hash, load_corpus, read_cached, short_hash, write_cached
from tyingrun.data.tokenizer import MASK, document_separator, load_tokenizer
from tyingrun.errors import BadInput
from tyingrun.seeding import derive_seed

log = logging.getLogger("tyingrun")

TOKENS_FORMAT = 1
# Documents per encode_batch call: enough to keep every core busy, few enough to bound memory.
ENCODE_CHUNK = 4096
# BERT's masking: this share of the (non-special) tokens is predicted; of those, MASK_TOKEN_SHARE become [MASK],
# RANDOM_TOKEN_SHARE a random token, and the rest stay as they are.
MASK_PROB = 0.15
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1
# Validation and test batches are masked from this seed at every evaluation, so their perplexities are comparable
# across evaluations and runs.
EVAL_MASK_SEED = 0
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MaskedLM:
    """The masked-LM batch transform: corrupts ``input_ids`` and labels the predicted positions."""

    mask_id: int
    vocab_size: int
    special_ids: torch.Tensor  # never masked (separators, padding...)

    @classmethod
    def for_tokenizer(cls, tokenizer: tokenizers.Tokenizer) -> MaskedLM:
        mask_id = tokenizer.token_to_id(MASK)
        if mask_id is None:
            raise BadInput(
                f"masked-LM needs a {MASK} token and this tokenizer has none; use dataset.tokenizer=wordpiece, "
                f"a dataset.tokenizer_path that has one, or train causally with model.causal=true"
            )
        special = [token_id for token_id, token in tokenizer.get_added_tokens_decoder().items() if token.special]
        return cls(mask_id, tokenizer.get_vocab_size(), torch.tensor(special, dtype=torch.int64))

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        ids = batch["input_ids"]
        chosen = (torch.rand(ids.shape, generator=generator) < MASK_PROB) & ~torch.isin(ids, self.special_ids)
        roll = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator)
        corrupted = torch.where(chosen & (roll < MASK_TOKEN_SHARE), self.mask_id, ids)
        random_share = chosen & (roll >= MASK_TOKEN_SHARE) & (roll < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
        corrupted = torch.where(random_share, random_ids, corrupted)
        return {"input_ids": corrupted, "labels": torch.where(chosen, ids, IGNORE_INDEX)}


@dataclass
class LMData:
    train: torch.Tensor  # int64 [n_train_blocks, block_size + 1]
    val: torch.Tensor  # int64 [n_val_blocks, block_size + 1]
    test: torch.Tensor  # int64 [n_test_blocks, block_size + 1]
    vocab_size: int
    tokenizer: tokenizers.Tokenizer
    masking: Optional[MaskedLM] = None  # masked-LM batches (BERT) instead of causal ones
    unit = "tokens"

    @functools.cached_property
    def tokenizer_sha256(self) -> str:
        """What the token ids mean: the SHA-256 of the tokenizer's serialisation (checkpoints record it)."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def block_size(self) -> int:
        return self.train.shape[1] - 1

    def train_sampler(self, batch_size: int, seed: int) -> BlockSampler | TransformedSampler:
        """Shuffled training batches; the order and the masks draw from independent streams of ``seed``."""
        blocks = BlockSampler(self.train, batch_size, derive_seed(seed, "data_order"))
        if self.masking is None:
            return blocks
        return TransformedSampler(blocks, self.masking, derive_seed(seed, "masking"))

    def eval_batches(self, split: str, batch_size: int, limit: Optional[int]) -> Iterator[Batch]:
        """The batches of ``split`` (val or test): all of them in order when ``limit`` is None, else the fixed
        sample of ``limit`` batches that ``eval_batches`` (the function) draws. Masked-LM batches are masked
        from EVAL_MASK_SEED, the same masks at every call."""
        batches = eval_batches(self.blocks(split), batch_size, limit)
        if self.masking is None:
            return batches
        generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
        return (self.masking(batch, generator) for batch in batches)

    def eval_items(self, split: str) -> int:
        """Tokens predicted over the whole split: every block's ``block_size`` positions (for masked-LM, the
        positions it could mask)."""
        return len(self.blocks(split)) * self.block_size

    def blocks(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
        return getattr(self, split)

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def describe(self) -> str:
        objective = "" if self.masking is None else ", masked-LM"
        counts = f"{len(self.train)} train / {len(self.val)} val / {len(self.test)} test blocks"
        return f"{counts} of {self.block_size} tokens{objective}"


def build_lm_data(cfg: DatasetConfig, masked_lm: bool = False, corpus: Optional[Corpus] = None) -> LMData:
    """Tokenized blocks of every split of dataset ``cfg.name``; ``corpus``, when given, is that corpus already
    loaded (by ``load_corpus(cfg)``), to build from without loading it again."""
    corpus = corpus if corpus is not None else load_corpus(cfg)
    tokenizer = load_tokenizer(cfg, corpus)
    masking = MaskedLM.for_tokenizer(tokenizer) if masked_lm else None
    separator = document_separator(tokenizer)
    tokenizer_key = short_hash(tokenizer.to_str())
    blocks = {}
    for split in SPLITS:
        ids = _cached_token_ids(cfg, split, getattr(corpus, split), tokenizer, tokenizer_key, separator)
        if len(ids) < cfg.block_size + 1:
            raise BadInput(
                f"dataset={cfg.name}: the {split} split has {len(ids)} tokens, fewer than one block of "
                f"{cfg.block_size + 1}; lower dataset.block_size or give more text"
            )
        blocks[split] = chunk_blocks(torch.from_numpy(ids.astype(np.int64)), cfg.block_size)
    return LMData(**blocks, vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer, masking=masking)


def chunk_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of ``block_size + 1`` tokens taken every ``block_size`` tokens; the ragged tail is dropped."""
    return ids.unfold(0, block_size + 1, block_size).contiguous()


def encode_documents(tokenizer: tokenizers.Tokenizer, documents: list[str], eos: int) -> np.ndarray:
    """One stream: each document's ids followed by ``eos``; uint16 when the vocabulary fits, else int32."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
    pieces = [np.zeros(0, dtype)]
    for start in range(0, len(documents), ENCODE_CHUNK):
        encodings = tokenizer.encode_batch(documents[start : start + ENCODE_CHUNK], add_special_tokens=False)
        stream = itertools.chain.from_iterable(encoding.ids + [eos] for encoding in encodings)
        pieces.append(np.fromiter(stream, dtype))
    return np.concatenate(pieces)


def _cached_token_ids(
    cfg: DatasetConfig, split: str, documents: list[str], tokenizer: tokenizers.Tokenizer, tokenizer_key: str, eos: int
) -> np.ndarray:
    key = short_hash(TOKENS_FORMAT, tokenizer_key, documents_hash(documents), split)
    path = cache_root(cfg) / "tokens" / f"{cfg.name}-{split}-{key}.npy"
    cached = read_cached(path, np.load, f"token ids of the {split} split")
    if cached is not None:
        return cached
    log.info("tokenizing the %s split of %s (%d documents; cached)", split, cfg.name, len(documents))
    ids = encode_documents(tokenizer, documents, eos)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, ids)

    write_cached(path, save)
    return ids


def _as_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()}


class BlockSampler(ShuffledSampler):
    """Shuffled causal batches of blocks (see ShuffledSampler for the order and resumption)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks = blocks
        super().__init__(len(blocks), batch_size, seed, take=lambda indices: _as_batch(self.blocks[indices]))


def eval_batches(blocks: torch.Tensor, batch_size: int, limit: Optional[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``blocks`` in order (the last one may be smaller): all of them when ``limit`` is None, else
    ``limit`` full batches of evenly spaced blocks (see ``spread_sample``), the same at every call."""
    chosen = blocks if limit is None else blocks[spread_sample(len(blocks), limit * batch_size)]
    for start in range(0, len(chosen), batch_size):
        yield _as_batch(chosen[start : start + batch_size])
