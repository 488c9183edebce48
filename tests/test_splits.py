"""Three disjoint splits for every dataset, paragraph-level leak removal, fixed eval samples, `tyingrun-data`."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tyingrun.config import DatasetConfig
from tyingrun.data.build import build_dataset
from tyingrun.data.lm import MaskedLM, build_lm_data
from tyingrun.data.splits import (
    Splits,
    leaked_fraction,
    split_by_name,
    spread_sample,
    stratified_split,
    without_leaks,
)
from tyingrun.data.text import cache_root, hub_dataset_id, load_corpus, pydoc_documents
from tyingrun.data.vision import build_vision_data
from tyingrun.data_cli import DOCUMENT_SEPARATOR, compose_config, main, read_dump
from tyingrun.errors import BadInput
from tyingrun.seeding import derive_seed

from .helpers import call_main

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
# Two paragraphs of 64+ characters and one shorter, as help topics repeat them.
SHARED = "The import statement finds a module, loads and initialises it if necessary, and binds a name."
OWN = "A paragraph that only the held-out document has, long enough to count as a paragraph of its own."
SHORT = "See also: the import system."


def words(index: int, count: int = 40) -> str:
    return " ".join(f"w{(index * 13 + position) % 101}" for position in range(count))


# ---- leaked_fraction and leak removal ----


def test_leaked_fraction_counts_the_normalised_characters_of_long_shared_paragraphs():
    train = [f"{SHARED}\n\n{SHORT}\n\nsomething else entirely, only in the training document."]
    reflowed = SHARED.replace(" and ", "\n   and ")  # the same paragraph, wrapped differently
    held_out = [f"{reflowed}\n\n{OWN}", f"{SHORT}"]
    expected = len(SHARED) / (len(SHARED) + len(OWN) + len(SHORT))
    assert leaked_fraction(held_out, train) == pytest.approx(expected)
    assert leaked_fraction(held_out, train, min_chars=len(SHARED) + 1) == 0.0
    assert leaked_fraction([OWN], train) == 0.0 and leaked_fraction([], train) == 0.0


def test_without_leaks_cleans_val_against_train_and_test_against_both():
    val_only = f"{OWN} It appears in validation and in test, never in training."
    splits = Splits(
        train=[f"{SHARED}\n\nthe rest of a training document that nobody repeats anywhere else", "Main entry point"],
        val=[f"{SHARED}\n\n{val_only}\n\n{SHORT}", SHARED],
        # A short document equal to a training one has no long paragraph, yet it goes too.
        test=[f"{val_only}\n\n{SHORT}\n\n{words(1)}", f"  {SHARED}  ", "Main  entry point\n"],
    )
    clean = without_leaks(splits)
    assert clean.train == splits.train
    assert clean.val == [f"{val_only}\n\n{SHORT}"]  # the all-shared second document is dropped
    assert clean.test == [f"{SHORT}\n\n{words(1)}"]
    for held_out in (clean.val, clean.test):
        assert leaked_fraction(held_out, clean.train) == 0.0
    assert leaked_fraction(clean.test, clean.val) == 0.0


# ---- split assignment ----


def test_split_by_name_is_a_deterministic_partition_near_the_fractions():
    documents = [(f"doc{index}", words(index)) for index in range(2000)]
    splits = split_by_name(documents, 0.05, 0.1)
    assert splits == split_by_name(list(documents), 0.05, 0.1)
    assert Counter(splits.train + splits.val + splits.test) == Counter(text for _, text in documents)
    assert 60 < len(splits.val) < 140 and 150 < len(splits.test) < 250


@pytest.mark.parametrize("count, expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (4, (2, 1, 1))])
def test_small_corpora_still_fill_the_splits(count, expected):
    splits = split_by_name([(f"d{index}", f"text {index}") for index in range(count)], 0.05, 0.05)
    assert (len(splits.train), len(splits.val), len(splits.test)) == expected


def test_spread_sample_reaches_both_ends_in_order():
    assert spread_sample(10, 4).tolist() == [0, 3, 6, 9]
    assert spread_sample(10, 1).tolist() == [0]
    assert spread_sample(3, 8).tolist() == [0, 1, 2]
    sample = spread_sample(1000, 37)
    assert sample[0] == 0 and sample[-1] == 999 and len(set(sample.tolist())) == 37


def test_stratified_split_keeps_class_shares_and_ignores_no_seed_but_its_own():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    kept, held = stratified_split(np.arange(200), labels, 0.2, seed=0)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(200))
    assert np.bincount(labels[held]).tolist() == [20, 10, 6, 4]
    again = stratified_split(np.arange(200), labels, 0.2, seed=0)
    assert np.array_equal(again[1], held)


# ---- pydoc ----


@pytest.fixture(scope="module")
def pydoc_corpus(pydoc_corpus_file):
    return load_corpus(DatasetConfig(name="pydoc"))


def test_pydoc_splits_are_pairwise_disjoint_by_document(pydoc_corpus):
    splits = {name: getattr(pydoc_corpus, name) for name in SPLITS}
    assert all(splits.values())
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(splits[first]) & set(splits[second]), (first, second)
    held_out = len(splits["val"]) + len(splits["test"])
    assert 0.04 < held_out / sum(map(len, splits.values())) < 0.2


@pytest.mark.slow
def test_pydoc_dump_is_clean_of_training_paragraphs(tmp_path, capsys, monkeypatch, pydoc_corpus):
    """`tyingrun-data dataset=pydoc --dump DIR` as a user runs it; the leak is measured on what it wrote."""
    monkeypatch.chdir(REPO)
    result = call_main(main, ["dataset=pydoc", "dataset.vocab_size=512", "--dump", str(tmp_path / "dump")], capsys)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["pydoc train", "pydoc val", "pydoc test"]
    assert all("leaked 0.00%" in line for line in lines[1:])
    dumped = {name: read_dump(tmp_path / "dump" / f"{name}.txt") for name in SPLITS}
    assert dumped == {name: getattr(pydoc_corpus, name) for name in SPLITS}
    assert DOCUMENT_SEPARATOR in (tmp_path / "dump" / "val.txt").read_text()
    assert leaked_fraction(dumped["val"], dumped["train"]) < 0.005
    assert leaked_fraction(dumped["test"], dumped["train"]) < 0.005
    assert leaked_fraction(dumped["test"], dumped["val"]) < 0.005


@pytest.mark.slow
def test_pydoc_split_before_cleaning_leaks_and_after_does_not():
    """Help topics repeat each other: the plain split by name leaks, the cleaned one does not."""
    documents = pydoc_documents(cache_root(DatasetConfig()))
    raw = split_by_name(documents, 0.05, 0.05)
    clean = without_leaks(raw)
    assert leaked_fraction(raw.val, raw.train) > 0.02
    assert leaked_fraction(clean.val, clean.train) == leaked_fraction(clean.test, clean.train) == 0.0
    assert clean.train == raw.train and len(clean.val) > 0.8 * len(raw.val)


# ---- LM eval batches ----


@pytest.fixture(scope="module")
def small_lm_data():
    return build_lm_data(DatasetConfig(name="pydoc", vocab_size=512, block_size=32))


def numbered(count: int, block_size: int = 32) -> torch.Tensor:
    """Blocks whose first token is their index, overlapping by one token as real ones do."""
    return torch.arange(count)[:, None] * block_size + torch.arange(block_size + 1)


def block_indices(batches) -> list[int]:
    return [int(first) // 32 for batch in batches for first in batch["input_ids"][:, 0]]


@pytest.mark.parametrize("split", ["val", "test"])
def test_limited_eval_batches_cover_start_middle_and_end_and_repeat(small_lm_data, split):
    assert len(small_lm_data.blocks(split)) > 20
    data = replace(small_lm_data, **{split: numbered(101)})
    first = list(data.eval_batches(split, 4, 5))
    second = list(data.eval_batches(split, 4, 5))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:]) for batch in first)
    chosen = block_indices(first)
    assert [len(batch["input_ids"]) for batch in first] == [4] * 5
    assert chosen == sorted(set(chosen)) and chosen[0] == 0 and chosen[-1] == 100
    assert sum(33 < index < 67 for index in chosen) >= 5
    assert block_indices(data.eval_batches(split, 7, None)) == list(range(101))
    assert data.eval_items(split) == 101 * 32
    assert small_lm_data.eval_items(split) == len(small_lm_data.blocks(split)) * 32


def test_masked_eval_batches_are_masked_the_same_on_both_splits_at_every_call(small_lm_data):
    masked = replace(small_lm_data, masking=MaskedLM(mask_id=0, vocab_size=512, special_ids=torch.tensor([0])))
    for split in ("val", "test"):
        first, second = list(masked.eval_batches(split, 4, 3)), list(masked.eval_batches(split, 4, 3))
        assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, second, strict=True))
        assert all((batch["labels"] != -100).any() for batch in first)


def test_training_order_masks_and_augmentation_draw_from_their_own_streams(small_lm_data):
    masked = replace(small_lm_data, masking=MaskedLM(mask_id=0, vocab_size=512, special_ids=torch.tensor([0])))
    sampler = masked.train_sampler(4, seed=5)
    assert sampler.sampler.seed == derive_seed(5, "data_order")
    assert sampler.generator.initial_seed() == derive_seed(5, "masking")
    augmented = build_vision_data(DatasetConfig(name="digits", augment=True)).train_sampler(4, seed=5)
    assert augmented.sampler.seed == derive_seed(5, "data_order")
    assert augmented.generator.initial_seed() == derive_seed(5, "augmentation")


# ---- other datasets ----


def image_rows(split) -> Counter:
    images, labels = split
    return Counter((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels, strict=True))


def test_digits_splits_are_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    cfg = compose_config(["model=vit", "dataset=digits"]).dataset
    data = build_vision_data(cfg)
    digits = load_digits()
    everything = image_rows((torch.from_numpy(digits.images).float().unsqueeze(1), torch.from_numpy(digits.target)))
    assert image_rows(data.train) + image_rows(data.val) + image_rows(data.test) == everything
    per_class = torch.bincount(torch.from_numpy(digits.target))
    for split, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
        share = torch.bincount(data.split(split)[1], minlength=10) / per_class
        assert torch.allclose(share, torch.full((10,), fraction), atol=0.02), split


def test_text_files_with_three_files_puts_one_file_in_each_split(tmp_path):
    files = []
    for index in range(3):
        path = tmp_path / f"book{index}.txt"
        path.write_text(f"{words(index)}\n\n{words(index + 10)}")
        files.append(path)
    corpus = load_corpus(DatasetConfig(name="text_files", files=[str(path) for path in files]))
    assert [len(getattr(corpus, name)) for name in SPLITS] == [1, 1, 1]
    assert sorted(corpus.train + corpus.val + corpus.test) == sorted(path.read_text() for path in files)


def write_raw_wiki(folder: Path, splits=("train", "valid", "test")) -> None:
    folder.mkdir()
    for split in splits:
        articles = "".join(f" = {split.title()} {index} = \n \n {words(index)} \n \n" for index in range(3))
        (folder / f"wiki.{split}.raw").write_text(articles)


def test_wiki2_raw_folder_yields_its_three_splits(tmp_path):
    write_raw_wiki(tmp_path / "wiki")
    cfg = DatasetConfig(name="wiki2", path=str(tmp_path / "wiki"), tokenizer="bpe", vocab_size=300, block_size=8)
    corpus = load_corpus(cfg)
    for name, title in (("train", "Train"), ("val", "Valid"), ("test", "Test")):
        documents = getattr(corpus, name)
        assert len(documents) == 3 and all(document.startswith(f" = {title} ") for document in documents)
    data = build_lm_data(cfg, corpus=corpus)
    assert all(len(data.blocks(name)) > 0 for name in SPLITS)
    assert "test blocks of 8 tokens" in data.describe()


def test_wiki2_raw_folder_without_a_test_file_is_bad_input(tmp_path):
    write_raw_wiki(tmp_path / "wiki", splits=("train", "valid"))
    with pytest.raises(BadInput, match=r"holds no test text; name the files with 'train', 'valid', 'test'"):
        load_corpus(DatasetConfig(name="wiki2", path=str(tmp_path / "wiki")))


def test_wiki2_variant_picks_the_hub_config():
    assert hub_dataset_id(DatasetConfig(name="wiki2")) == ("wikitext", "wikitext-2-raw-v1")
    assert hub_dataset_id(DatasetConfig(name="wiki2", variant="v1")) == ("wikitext", "wikitext-2-v1")
    explicit = DatasetConfig(name="wiki2", variant="v1", hf_config="wikitext-103-raw-v1")
    assert hub_dataset_id(explicit) == ("wikitext", "wikitext-103-raw-v1")
    assert hub_dataset_id(DatasetConfig(name="1b", variant="v1")) == ("lm1b", None)
    composed = compose_config(["dataset=wiki2", "dataset.variant=v1"]).dataset
    assert hub_dataset_id(composed) == ("wikitext", "wikitext-2-v1")
    with pytest.raises(BadInput, match="dataset.variant='v2' is not an option; choose one of: raw, v1"):
        hub_dataset_id(DatasetConfig(name="wiki2", variant="v2"))


def test_builder_prepares_bert_data_as_masked_wordpiece(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(words(index, 60) for index in range(30)))
    cfg = compose_config(["model=bert", "dataset=text_files", f"dataset.files=[{notes}]", "dataset.block_size=16",
                          "dataset.vocab_size=200"])
    data = build_dataset(cfg.dataset, cfg.model)
    assert data.masking is not None and data.tokenizer.token_to_id("[MASK]") is not None


# ---- tyingrun-data errors ----


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["dataset=nonexistent"], "unknown option dataset=nonexistent; choose one of: 1b, addition, cifar10, digits"),
        (["dataset=text_files", "dataset.files=[absent.txt]"], "dataset.files: no such file 'absent.txt'"),
        (["dataset=wiki2", "dataset.variant=v3"], "dataset.variant='v3' is not an option"),
        (["dataset=pydoc", "dataset.test_fraction=0.99"], "plus dataset.test_fraction=0.99 must be below 1"),
        (["model=vit", "dataset=digits", "--dump", "somewhere"], "--dump writes text corpora"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert error[-1].startswith("tyingrun-data: error: ") and message in error[-1], error
    assert not any(line.startswith("Traceback") for line in error)
