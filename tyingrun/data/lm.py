"""Language-model data: token streams chunked into fixed-length blocks, a resumable shuffling sampler, eval batches.

Each split's documents are tokenized, each followed by ``<|endoftext|>``, and concatenated into one stream.
Blocks hold ``block_size + 1`` tokens with stride ``block_size``: consecutive blocks share one token, so every
token of the stream (but the first) is a prediction target exactly once. The ragged tail is dropped.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import tokenizers
import torch

from tyingrun.config import DatasetConfig
from tyingrun.data.text import atomic_output, cache_root, documents_hash, load_corpus, short_hash
from tyingrun.data.tokenizer import EOS, load_tokenizer
from tyingrun.errors import BadInput

log = logging.getLogger("tyingrun")

TOKENS_FORMAT = 1
# Documents per encode_batch call: enough to keep every core busy, few enough to bound memory.
ENCODE_CHUNK = 4096


@dataclass
class LMData:
    train: torch.Tensor  # int64 [n_train_blocks, block_size + 1]
    val: torch.Tensor  # int64 [n_val_blocks, block_size + 1]
    vocab_size: int
    tokenizer: tokenizers.Tokenizer
    unit = "tokens"

    def train_sampler(self, batch_size: int, seed: int) -> BlockSampler:
        return BlockSampler(self.train, batch_size, seed)

    def val_batches(self, batch_size: int, limit: Optional[int]) -> Iterator[dict[str, torch.Tensor]]:
        return eval_batches(self.val, batch_size, limit)

    def describe(self) -> str:
        return f"{len(self.train)} train / {len(self.val)} val blocks of {self.train.shape[1] - 1} tokens"


def build_lm_data(cfg: DatasetConfig) -> LMData:
    corpus = load_corpus(cfg)
    tokenizer = load_tokenizer(cfg, corpus)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise BadInput(f"the tokenizer has no {EOS} token to separate documents; use one that has (e.g. gpt2 or bpe)")
    tokenizer_key = short_hash(tokenizer.to_str())
    blocks = {}
    for split, documents in (("train", corpus.train), ("val", corpus.val)):
        ids = _cached_token_ids(cfg, split, documents, tokenizer, tokenizer_key, eos)
        if len(ids) < cfg.block_size + 1:
            raise BadInput(
                f"dataset={cfg.name}: the {split} split has {len(ids)} tokens, fewer than one block of "
                f"{cfg.block_size + 1}; lower dataset.block_size or give more text"
            )
        blocks[split] = chunk_blocks(torch.from_numpy(ids.astype(np.int64)), cfg.block_size)
    return LMData(train=blocks["train"], val=blocks["val"], vocab_size=tokenizer.get_vocab_size(), tokenizer=tokenizer)


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
    if path.exists():
        return np.load(path)
    log.info("tokenizing the %s split of %s (%d documents; cached)", split, cfg.name, len(documents))
    ids = encode_documents(tokenizer, documents, eos)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, ids)
    return ids


def _as_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()}


class BlockSampler:
    """Shuffled training batches, one permutation of the blocks per epoch, resumable at any batch.

    Epoch ``e`` uses the permutation drawn from ``seed + e``; batch ``k`` of the epoch is its ``k``-th slice of
    ``batch_size`` (an incomplete last slice is dropped). With fewer blocks than ``batch_size`` the permutation
    wraps around, so a batch is always full and each batch is one epoch.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks = blocks
        self.batch_size = batch_size
        self.batches_per_epoch = max(1, len(blocks) // batch_size)
        self._start(seed=seed, epoch=0, position=0)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self._start(seed=self.seed, epoch=self.epoch + 1, position=0)
        offsets = self.position * self.batch_size + torch.arange(self.batch_size)
        indices = self._order[offsets % len(self.blocks)]
        self.position += 1
        return _as_batch(self.blocks[indices])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._start(seed=int(state["seed"]), epoch=int(state["epoch"]), position=int(state["position"]))

    def _start(self, seed: int, epoch: int, position: int) -> None:
        self.seed, self.epoch, self.position = seed, epoch, position
        generator = torch.Generator().manual_seed(seed + epoch)
        self._order = torch.randperm(len(self.blocks), generator=generator)


def eval_batches(blocks: torch.Tensor, batch_size: int, limit: Optional[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in block order (the last one may be smaller); the first ``limit`` of them, or all when None."""
    for start in itertools.islice(range(0, len(blocks), batch_size), limit):
        yield _as_batch(blocks[start : start + batch_size])
