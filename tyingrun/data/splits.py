"""Held-out splits: deterministic train / val / test assignment, and paragraph-level leak removal and measurement.

Every assignment depends only on the data (a stable hash of a name or text, or a fixed seed), never on the run's
seed, so every run of a dataset is measured on the same held-out text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from tyingrun.config import DatasetConfig

PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Paragraphs shorter than this (headings, "Example:", a lone signature) may repeat across splits without
# counting as leaked: they carry little of what a model could memorise.
MIN_LEAK_CHARS = 64
HASH_BUCKETS = 2**32

NamedDocuments = list[tuple[str, str]]


@dataclass
class Splits:
    train: list[str]
    val: list[str]
    test: list[str]


def held_out_fractions(cfg: DatasetConfig) -> tuple[float, float]:
    """``dataset.val_fraction`` and ``dataset.test_fraction`` (the preflight checks they leave training data)."""
    return cfg.val_fraction, cfg.test_fraction


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for ``key``: the same on every machine, Python version and run."""
    return int(hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / HASH_BUCKETS


def split_by_name(documents: NamedDocuments, val_fraction: float, test_fraction: float) -> Splits:
    """A document's name hashes to [0, 1): below ``val_fraction`` it is validation, below
    ``val_fraction + test_fraction`` test, else training. Documents keep their order within a split.

    Small corpora still get every split: with two documents or more, validation and training get at least one
    each; with three or more, test too. The documents moved to fill a split are those whose hashes lie
    nearest to its range.
    """
    fractions = [hash_fraction(name) for name, _ in documents]
    by_hash = sorted(range(len(documents)), key=lambda index: (fractions[index], index))
    n_val = sum(fraction < val_fraction for fraction in fractions)
    n_test = sum(val_fraction <= fraction < val_fraction + test_fraction for fraction in fractions)
    n_val, n_test = _every_split_filled(len(documents), n_val, n_test)
    split_of = {index: "val" for index in by_hash[:n_val]}
    split_of.update({index: "test" for index in by_hash[n_val : n_val + n_test]})
    texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for index, (_, text) in enumerate(documents):
        texts[split_of.get(index, "train")].append(text)
    return Splits(**texts)


def _every_split_filled(n_documents: int, n_val: int, n_test: int) -> tuple[int, int]:
    """Held-out counts raised to one validation (two documents or more) and one test document (three or
    more), and lowered to leave at least one training document."""
    if n_documents < 2:
        return 0, 0
    least_test = 1 if n_documents >= 3 else 0
    n_val, n_test = max(n_val, 1), max(n_test, least_test)
    while n_val + n_test > n_documents - 1:
        if n_test - least_test >= n_val - 1:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def carve_by_hash(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split ``texts`` into (kept, carved): a text is carved when the hash of its content is below ``fraction``.

    Equal texts land on the same side, so a duplicated sentence never sits in both.
    """
    kept: list[str] = []
    carved: list[str] = []
    for text in texts:
        (carved if hash_fraction(text) < fraction else kept).append(text)
    return kept, carved


def stratified_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` split into (kept, held out), about ``fraction`` of them held out, each in ascending order.

    Each class is held out in the same share when every class has enough items for both sides (else the
    draw ignores classes). The draw depends on ``seed`` only, never on the run's seed.
    """
    from sklearn.model_selection import train_test_split

    counts = np.unique(labels, return_counts=True)[1]
    by_class = labels if counts.min() * min(fraction, 1.0 - fraction) >= 1.0 else None
    kept, held = train_test_split(indices, test_size=fraction, stratify=by_class, random_state=seed)
    return np.sort(kept), np.sort(held)


def spread_sample(n_items: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced indices of ``range(n_items)`` from the first to the last, in order; every index
    when ``count >= n_items``. A fixed sample that reaches the whole split, not just its first documents."""
    if count >= n_items:
        return torch.arange(n_items)
    if count == 1:
        return torch.zeros(1, dtype=torch.int64)
    return torch.arange(count) * (n_items - 1) // (count - 1)


# ---- paragraph-level leaks ----


def paragraphs(document: str) -> list[str]:
    """The document's paragraphs (split at blank lines) as written, empty ones dropped."""
    return [paragraph for paragraph in PARAGRAPH_BREAK.split(document) if paragraph.strip()]


def normalise(paragraph: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped: reflowed copies of a paragraph compare equal."""
    return " ".join(paragraph.split())


def long_paragraphs(documents: Iterable[str], min_chars: int = MIN_LEAK_CHARS) -> set[str]:
    """The normalised paragraphs of at least ``min_chars`` characters in ``documents``."""
    found = set()
    for document in documents:
        for paragraph in paragraphs(document):
            text = normalise(paragraph)
            if len(text) >= min_chars:
                found.add(text)
    return found


def without_paragraphs(documents: list[str], seen: set[str], min_chars: int = MIN_LEAK_CHARS) -> list[str]:
    """``documents`` less their paragraphs of ``min_chars``+ normalised characters that are in ``seen``.

    A document that loses paragraphs is rejoined with blank lines; one that loses all of them is dropped.
    """
    kept_documents = []
    for document in documents:
        pieces = paragraphs(document)
        kept = [piece for piece in pieces if not _leaks(normalise(piece), seen, min_chars)]
        if len(kept) == len(pieces):
            kept_documents.append(document)
        elif kept:
            kept_documents.append("\n\n".join(kept))
    return kept_documents


def without_leaks(splits: Splits, min_chars: int = MIN_LEAK_CHARS) -> Splits:
    """Validation cleaned of training text, and test cleaned of training and validation text."""
    val = _cleaned(splits.val, splits.train, min_chars)
    test = _cleaned(splits.test, splits.train + val, min_chars)
    return Splits(train=splits.train, val=val, test=test)


def _cleaned(held_out: list[str], seen_documents: list[str], min_chars: int) -> list[str]:
    """``held_out`` less the long paragraphs of ``seen_documents``, and less any document that equals one of
    them (short duplicates such as two modules' "Main entry point" have no long paragraph to catch)."""
    seen_whole = {normalise(document) for document in seen_documents}
    kept = without_paragraphs(held_out, long_paragraphs(seen_documents, min_chars), min_chars)
    return [document for document in kept if normalise(document) not in seen_whole]


def leaked_fraction(held_out_docs: list[str], train_docs: list[str], min_chars: int = MIN_LEAK_CHARS) -> float:
    """The share of the held-out text's (normalised) characters that lie in paragraphs of ``min_chars``+
    normalised characters also found in ``train_docs``; 0.0 for empty held-out text."""
    in_train = long_paragraphs(train_docs, min_chars)
    total = leaked = 0
    for document in held_out_docs:
        for paragraph in paragraphs(document):
            text = normalise(paragraph)
            total += len(text)
            leaked += len(text) if _leaks(text, in_train, min_chars) else 0
    return leaked / total if total else 0.0


def _leaks(normalised: str, seen: set[str], min_chars: int) -> bool:
    return len(normalised) >= min_chars and normalised in seen
