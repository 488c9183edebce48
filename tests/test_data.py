"""Corpora, tokenizers, LM blocks and samplers; offline, CPU, a few seconds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tyingrun.config import Config, DatasetConfig, HardwareConfig, ModelConfig, PolicyConfig
from tyingrun.data import tokenizer as tokenizer_module
from tyingrun.data.lm import BlockSampler, build_lm_data, encode_documents, eval_batches
from tyingrun.data.splits import hash_fraction
from tyingrun.data.text import load_corpus, wiki_articles
from tyingrun.data.tokenizer import EOS, load_tokenizer
from tyingrun.errors import BadInput
from tyingrun.preflight import check_model_and_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def pydoc_cache(tmp_path_factory, pydoc_corpus_file) -> Path:
    """A cache of this module's own for the pydoc tests, holding only the run's pydoc corpus (the standard library
    is parsed once per run): its tokenizers and token ids are built here."""
    cache = tmp_path_factory.mktemp("pydoc-cache")
    (cache / "corpora").mkdir()
    for path in pydoc_corpus_file.parent.glob(pydoc_corpus_file.name + "*"):  # the corpus and its content hash
        shutil.copy(path, cache / "corpora")
    return cache


def pydoc_config(cache: Path, **overrides) -> DatasetConfig:
    settings = {"name": "pydoc", "cache_dir": str(cache), "vocab_size": 512, "max_documents": 40, "block_size": 32}
    return DatasetConfig(**{**settings, **overrides})


def paragraphs(count: int, words: int = 30) -> str:
    return "\n\n".join(" ".join(f"word{(p * 7 + w) % 97}" for w in range(words)) for p in range(count))


# ---- corpora ----


@pytest.mark.slow
def test_pydoc_split_is_deterministic_disjoint_and_nonempty(tmp_path):
    """Parses the standard library (seconds), into a cache of its own so that it is a build."""
    built = load_corpus(pydoc_config(tmp_path, max_documents=None))
    assert list((tmp_path / "corpora").glob("pydoc-*.json"))
    cached = load_corpus(pydoc_config(tmp_path, max_documents=None))
    assert (built.train, built.val, built.test) == (cached.train, cached.val, cached.test)
    assert built.train and built.val and built.test
    assert not set(built.train) & set(built.val)
    assert 0.01 < len(built.val) / (len(built.train) + len(built.val)) < 0.15
    assert sum(map(len, built.train + built.val)) > 1_000_000


def test_max_documents_caps_each_split(pydoc_cache):
    corpus = load_corpus(pydoc_config(pydoc_cache, max_documents=5))
    assert len(corpus.train) == len(corpus.val) == len(corpus.test) == 5


def test_unknown_corpus_lists_the_options(tmp_path):
    cfg = Config(model=ModelConfig(), dataset=DatasetConfig(name="wikitext", cache_dir=str(tmp_path)),
                 policy=PolicyConfig(), hardware=HardwareConfig())
    with pytest.raises(BadInput, match="pydoc, wiki2, 1b, text_files"):
        check_model_and_dataset(cfg)


def test_text_files_single_file_is_split_by_paragraphs(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text(paragraphs(40))
    corpus = load_corpus(DatasetConfig(name="text_files", files=[str(notes)], cache_dir=str(tmp_path)))
    assert corpus.train and corpus.val and corpus.test
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 40


def test_text_files_folder_is_read_recursively_one_document_per_file(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for index in range(6):
        (folder / ("sub" if index % 2 else "") / f"part{index}.txt").write_text(f"file {index}\n\n{paragraphs(2)}")
    (folder / "ignored.md").write_text("not a .txt file")
    corpus = load_corpus(DatasetConfig(name="text_files", files=[str(folder)], cache_dir=str(tmp_path)))
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 6
    assert corpus.train and corpus.val and corpus.test


def test_text_files_missing_file_is_named(tmp_path):
    with pytest.raises(BadInput, match="no such file 'absent.txt'"):
        load_corpus(DatasetConfig(name="text_files", files=["absent.txt"], cache_dir=str(tmp_path)))


def test_text_files_empty_files_and_no_files_are_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(BadInput, match="every file is empty"):
        load_corpus(DatasetConfig(name="text_files", files=[str(empty)], cache_dir=str(tmp_path)))
    with pytest.raises(BadInput, match="needs dataset.files"):
        load_corpus(DatasetConfig(name="text_files", cache_dir=str(tmp_path)))


def test_wiki_articles_start_at_top_level_titles():
    lines = ["", " = First = \n", "", " intro \n", " = = Section = = \n", " body \n", " = Second = \n", " text \n"]
    assert wiki_articles(lines) == [" = First = \n intro \n = = Section = = \n body \n", " = Second = \n text \n"]


def write_wiki_folder(folder: Path) -> None:
    def article(title: str) -> str:
        return f" \n = {title} = \n \n {paragraphs(3)} \n \n = = History = = \n \n {paragraphs(2)} \n"

    folder.mkdir()
    (folder / "wiki.train.raw").write_text("".join(article(f"Train {i}") for i in range(8)))
    (folder / "wiki.valid.raw").write_text("".join(article(f"Valid {i}") for i in range(2)))
    (folder / "wiki.test.raw").write_text(article("Test"))


def test_wiki2_from_a_folder_of_raw_files(tmp_path):
    write_wiki_folder(tmp_path / "wikitext-2-raw")
    cfg = DatasetConfig(
        name="wiki2",
        path=str(tmp_path / "wikitext-2-raw"),
        tokenizer="bpe",
        vocab_size=300,
        block_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    corpus = load_corpus(cfg)
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (8, 2, 1)
    data = build_lm_data(cfg)
    assert data.train.shape[1] == data.val.shape[1] == data.test.shape[1] == 17
    assert len(data.train) > len(data.val) > 0 and len(data.test) > 0


def test_1b_from_a_save_to_disk_folder_one_sentence_per_document(tmp_path):
    import datasets

    sentences = [f"Sentence number {i} says something about topic {i % 5} ." for i in range(60)]
    splits = {"train": sentences[:50], "test": sentences[50:] + ["  "]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": rows}) for name, rows in splits.items()}
    ).save_to_disk(str(tmp_path / "lm1b"))
    cfg = DatasetConfig(name="1b", path=str(tmp_path / "lm1b"), max_documents=40, val_fraction=0.2)
    corpus = load_corpus(cfg)
    carved = [sentence for sentence in sentences[:50] if hash_fraction(sentence) < 0.2]
    assert 0 < len(carved) < 20
    assert corpus.train == [sentence for sentence in sentences[:50] if sentence not in carved][:40]
    assert corpus.val == carved
    assert corpus.test == sentences[50:]


HUB_LOAD_IN_FRESH_PYTHON = textwrap.dedent(
    """
    import socket, sys
    from tyingrun.config import DatasetConfig
    from tyingrun.data.text import Corpus, load_corpus
    from tyingrun.data.tokenizer import load_tokenizer
    from tyingrun.errors import BadInput

    network, target = sys.argv[1:]
    if network == "no-network":
        def refuse(*args, **kwargs):
            raise OSError("the tests never use the network")
        socket.create_connection = socket.getaddrinfo = refuse
    try:
        if target == "wiki2":
            load_corpus(DatasetConfig(name="wiki2"))
        else:
            load_tokenizer(DatasetConfig(tokenizer="gpt2"), Corpus("tiny", ["a"], ["b"], ["c"]))
    except BadInput as error:
        print(error)
        sys.exit(2)
    """
)


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize("target, fix", [("wiki2", "dataset.path="), ("gpt2", "dataset.tokenizer_path=")])
@pytest.mark.parametrize("network", ["offline-env", "no-network"])
def test_hub_download_not_cached_fails_fast_with_one_clean_line(tmp_path, network, target, fix):
    """In a fresh interpreter, so the Hugging Face libraries read the empty cache folders at import."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    if network == "no-network":  # the probe must find the hub unreachable and switch to offline mode itself
        del env["HF_HUB_OFFLINE"], env["HF_DATASETS_OFFLINE"]
    result = subprocess.run(
        [sys.executable, "-c", HUB_LOAD_IN_FRESH_PYTHON, network, target],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "neither cached nor reachable" in result.stdout and fix in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.stderr == ""


# ---- tokenizer ----


def test_bpe_tokenizer_is_trained_once_then_loaded(pydoc_cache, monkeypatch):
    cfg = pydoc_config(pydoc_cache)
    corpus = load_corpus(cfg)
    trained = load_tokenizer(cfg, corpus)
    assert trained.get_vocab_size() == 512
    assert trained.token_to_id(EOS) is not None

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    loaded = load_tokenizer(cfg, corpus)
    sample = corpus.val[0][:2000]
    assert loaded.encode(sample).ids == trained.encode(sample).ids
    assert loaded.decode(loaded.encode(sample).ids) == sample


def test_missing_tokenizer_file_is_bad_input(pydoc_cache):
    cfg = pydoc_config(pydoc_cache, tokenizer_path="nowhere/tokenizer.json")
    with pytest.raises(BadInput, match="no such file 'nowhere/tokenizer.json'"):
        load_tokenizer(cfg, load_corpus(cfg))


# ---- blocks ----


@pytest.fixture(scope="module")
def pydoc_data(pydoc_cache):
    return build_lm_data(pydoc_config(pydoc_cache))


def test_blocks_overlap_by_one_token_and_cover_the_stream(pydoc_data, pydoc_cache):
    train = pydoc_data.train
    assert train.dtype == torch.int64 and train.shape[1] == 33 and len(pydoc_data.val) > 0
    assert torch.equal(train[:-1, -1], train[1:, 0])
    corpus = load_corpus(pydoc_config(pydoc_cache))
    tokenizer = pydoc_data.tokenizer
    stream = torch.from_numpy(encode_documents(tokenizer, corpus.train, tokenizer.token_to_id(EOS)).astype("int64"))
    rebuilt = torch.cat([train[0], train[1:, 1:].reshape(-1)])
    assert torch.equal(rebuilt, stream[: len(rebuilt)])
    assert len(stream) - len(rebuilt) < 32


def test_second_build_reads_the_cache(pydoc_data, pydoc_cache, monkeypatch):
    monkeypatch.setattr("tyingrun.data.lm.encode_documents", lambda *args: pytest.fail("tokenized again"))
    again = build_lm_data(pydoc_config(pydoc_cache))
    assert torch.equal(again.train, pydoc_data.train) and torch.equal(again.val, pydoc_data.val)
    assert torch.equal(again.test, pydoc_data.test)


def test_split_shorter_than_one_block_is_bad_input(tmp_path):
    notes = tmp_path / "short.txt"
    notes.write_text(paragraphs(4, words=5))
    cfg = DatasetConfig(name="text_files", files=[str(notes)], vocab_size=300, block_size=200, cache_dir=str(tmp_path))
    with pytest.raises(BadInput, match=r"dataset=text_files: the \w+ split has \d+ tokens.*lower dataset.block_size"):
        build_lm_data(cfg)


# ---- batches ----


def numbered_blocks(count: int, block_size: int = 4) -> torch.Tensor:
    """Block i holds i*block_size ... i*block_size + block_size: ids name their block and overlap like real ones."""
    return torch.arange(count)[:, None] * block_size + torch.arange(block_size + 1)


def block_ids(batch: dict) -> list[int]:
    return (batch["input_ids"][:, 0] // 4).tolist()


def test_labels_are_inputs_shifted_by_one(pydoc_data):
    batch = BlockSampler(pydoc_data.train, batch_size=4, seed=0).next_batch()
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


def test_sampler_visits_each_block_once_per_epoch():
    sampler = BlockSampler(numbered_blocks(12), batch_size=4, seed=3)
    epochs = [[i for _ in range(3) for i in block_ids(sampler.next_batch())] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]
    assert sampler.state_dict() == {"seed": 3, "epoch": 1, "position": 3}


def test_sampler_fills_batches_from_fewer_blocks_than_batch_size():
    sampler = BlockSampler(numbered_blocks(3), batch_size=5, seed=0)
    for _ in range(3):
        ids = block_ids(sampler.next_batch())
        assert len(ids) == 5 and set(ids) == {0, 1, 2}


def test_sampler_resumes_with_the_same_batches():
    blocks = numbered_blocks(10)
    original = BlockSampler(blocks, batch_size=3, seed=7)
    for _ in range(5):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    resumed = BlockSampler(blocks, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for _ in range(6):
        expected, got = original.next_batch(), resumed.next_batch()
        assert torch.equal(expected["input_ids"], got["input_ids"]) and torch.equal(expected["labels"], got["labels"])


def test_eval_batches_are_in_order_and_limited():
    blocks = numbered_blocks(10)
    assert [block_ids(batch) for batch in eval_batches(blocks, 4, None)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # A limit takes evenly spaced blocks from the first to the last, not the first batches.
    assert [block_ids(batch) for batch in eval_batches(blocks, 4, 2)] == [[0, 1, 2, 3], [5, 6, 7, 9]]
    assert [block_ids(batch) for batch in eval_batches(blocks, 4, 3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
