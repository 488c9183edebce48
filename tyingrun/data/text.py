"""Text corpora as lists of documents in three disjoint splits: train, val and test.

Corpora: ``pydoc`` (built offline from the running Python's own documentation), ``wiki2`` (WikiText-2),
``1b`` (One Billion Word) and ``text_files`` (the user's files). Where a corpus publishes splits they are used
(wiki2: train / validation / test; 1b: train / test, with val carved from train); otherwise documents are
assigned by a stable hash of their names (see ``tyingrun.data.splits``). Also the helpers the data package
shares: where caches live, atomic cache writes, content hashes and the Hugging Face hub reachability probe.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import socket
import sys
import sysconfig
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar
from urllib.parse import urlparse

from tyingrun.config import DatasetConfig, registry_of
from tyingrun.data.splits import (
    NamedDocuments,
    Splits,
    carve_by_hash,
    held_out_fractions,
    paragraphs,
    split_by_name,
    without_leaks,
)
from tyingrun.errors import BadInput
from tyingrun.files import atomic_path, file_sha256

T = TypeVar("T")

log = logging.getLogger("tyingrun")

PYDOC_FORMAT = 1
SKIPPED_STDLIB_FOLDERS = frozenset({"site-packages", "test", "tests", "idlelib"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# The names a hub dataset (or a save_to_disk copy) may give each split, in order of preference.
HUB_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid"), "test": ("test",)}
# The splits each hub corpus publishes; 1b has no validation split, so val is carved from train.
PUBLISHED_SPLITS = {"wiki2": ("train", "val", "test"), "1b": ("train", "test")}
# Words that mark a raw file's split, checked in this order ("heldout" is the One Billion Word test set).
RAW_FILE_WORDS = (("test", "test"), ("heldout", "test"), ("valid", "val"), ("train", "train"))
HUB_DEFAULTS = {"wiki2": ("wikitext", None), "1b": ("lm1b", None)}
# The revision of a default hub id. One Billion Word ("lm1b", now billion-word-benchmark/lm1b, to which the hub
# redirects) is a loading script on its main branch, which datasets 4.0 and later no longer run; the hub's own
# conversion of it to parquet files lives on the refs/convert/parquet branch, which they load as plain data files.
HUB_DEFAULT_REVISIONS = {"1b": "refs/convert/parquet"}
# What `datasets` raises for a script-based dataset: "Dataset scripts are no longer supported, but found x.py", or,
# where the repository holds nothing but its script, DataFilesNotFoundError.
SCRIPT_DATASET_ERRORS = ("Dataset scripts are no longer supported", "DataFilesNotFoundError")
WIKI2_VARIANTS = registry_of("dataset.variant", {"raw": "wikitext-2-raw-v1", "v1": "wikitext-2-v1"})
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0
WIKI_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    test: list[str]


def load_corpus(cfg: DatasetConfig) -> Corpus:
    """The splits of the text corpus ``dataset.name`` (one of CORPUS_LOADERS, checked by the preflight)."""
    splits = CORPUS_LOADERS[cfg.name](cfg)
    limit = cfg.max_documents
    return Corpus(name=cfg.name, train=splits.train[:limit], val=splits.val[:limit], test=splits.test[:limit])


# ---- shared helpers: cache folder, atomic writes, hashes, hub probe ----


def cache_root(cfg: DatasetConfig) -> Path:
    """``dataset.cache_dir``, else ``$TYINGRUN_CACHE``, else ``~/.cache/tyingrun``."""
    chosen = cfg.cache_dir or os.environ.get("TYINGRUN_CACHE") or "~/.cache/tyingrun"
    return Path(chosen).expanduser()


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """files.atomic_path into the cache (its folders made as needed): readers, and concurrent runs sharing the
    cache, see either no file or a complete one. A cache folder that cannot be written is bad input."""
    entered = False
    try:
        with atomic_path(path, make_parents=True) as tmp:
            entered = True
            yield tmp
    except OSError as error:
        if entered:  # raised while writing, not because the folder refused the file
            raise
        raise BadInput(
            f"cannot write to the cache folder {path.parent} ({error.strerror}); "
            f"set dataset.cache_dir or $TYINGRUN_CACHE to a writable folder"
        ) from error


# Beside every cache file: the SHA-256 of its bytes, written after it; a file whose bytes differ is damaged.
CONTENT_HASH_SUFFIX = ".sha256"


def read_cached(path: Path, load: Callable[[Path], T], what: str) -> Optional[T]:
    """``load(path)`` when the cache holds ``path`` with the content hash ``write_cached`` saved beside it; None
    when it must be built (again): not there, without its hash (written before hashes, or cut short before its
    hash was saved), or damaged, which a warning names."""
    hash_path = path.with_name(path.name + CONTENT_HASH_SUFFIX)
    if not path.is_file():
        return None
    if not hash_path.is_file():
        log.info("the cached %s %s has no content hash; building it again", what, path)
        return None
    if file_sha256(path) != hash_path.read_text().strip():
        sys.stderr.write(f"tyingrun: warning: the cached {what} {path} is damaged (its content hash differs); "
                         f"building it again\n")
        return None
    return load(path)


def write_cached(path: Path, save: Callable[[Path], None]) -> None:
    """``save`` into ``path`` atomically, then the content hash that ``read_cached`` checks."""
    with atomic_output(path) as tmp:
        save(tmp)
    with atomic_output(path.with_name(path.name + CONTENT_HASH_SUFFIX)) as tmp:
        tmp.write_text(file_sha256(path))


def short_hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def documents_hash(documents: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8", "surrogatepass")
        # The length prefix keeps ["ab", "c"] and ["a", "bc"] apart.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def hub_offline() -> bool:
    return any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"} for var in OFFLINE_VARS)


def go_offline_unless_hub_reachable() -> None:
    """Switch the Hugging Face libraries to offline mode when the hub cannot be reached.

    Their own retries take ~20 s to give up; offline mode fails at once and still loads cached copies.
    """
    if hub_offline() or _hub_reachable():
        return
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    # The libraries read the variables when imported; flip the flags of copies imported already.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def _hub_reachable() -> bool:
    """Open a TCP connection to the hub (or the HTTPS proxy) within HUB_PROBE_TIMEOUT_S."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (target.hostname or "huggingface.co", target.port or (80 if target.scheme == "http" else 443))
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
            reached.set()
        except OSError:
            pass

    # A thread, because the connect timeout does not bound a hanging DNS lookup.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return reached.is_set()


# ---- pydoc: the running Python's documentation ----


def _pydoc_splits(cfg: DatasetConfig) -> Splits:
    """Split by document name, then clean: Python's help topics and docstrings repeat whole paragraphs, so
    validation and test lose those that training (or, for test, validation) already holds."""
    return without_leaks(split_by_name(pydoc_documents(cache_root(cfg)), *held_out_fractions(cfg)))


def pydoc_documents(cache: Path) -> NamedDocuments:
    """Help topics plus standard-library docstrings, built once per Python installation and cached."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = cache / "corpora" / f"pydoc-{short_hash(PYDOC_FORMAT, sys.version, stdlib)}.json"
    cached = read_cached(path, lambda p: [(str(name), str(text)) for name, text in json.loads(p.read_text("utf-8"))],
                         "pydoc corpus")
    if cached is not None:
        return cached
    log.info("building the pydoc corpus from %s (once; cached in %s)", stdlib, path.parent)
    documents = _help_topics() + _stdlib_docstrings(stdlib)
    write_cached(path, lambda tmp: tmp.write_text(json.dumps(documents), encoding="utf-8"))
    return documents


def _help_topics() -> NamedDocuments:
    from pydoc_data.topics import topics

    return [(f"topic:{key}", topics[key]) for key in sorted(topics)]


def _stdlib_docstrings(stdlib: Path) -> NamedDocuments:
    """One document per module file: its docstrings in source order, read with ``ast`` (nothing imported)."""
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_STDLIB_FOLDERS.intersection(relative.parts[:-1]):
            continue
        docstrings = _module_docstrings(path)
        if docstrings:
            documents.append((relative.as_posix(), "\n\n".join(docstrings)))
    return documents


def _module_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            # Old escape sequences in some modules raise SyntaxWarning on newer Pythons.
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    return list(_docstrings_in_order(tree))


def _docstrings_in_order(node: ast.AST) -> Iterator[str]:
    if isinstance(node, DOCSTRING_NODES):
        docstring = ast.get_docstring(node)
        if docstring:
            yield docstring
    for child in ast.iter_child_nodes(node):
        yield from _docstrings_in_order(child)


# ---- wiki2 and 1b: Hugging Face datasets or a local copy ----


def _hub_corpus_splits(cfg: DatasetConfig) -> Splits:
    """The corpus's published splits. One Billion Word publishes only train and test: its validation split
    is carved from train, each sentence by a stable hash of its text (``dataset.val_fraction``), so repeated
    sentences stay on one side and every run validates on the same sentences."""
    published = PUBLISHED_SPLITS[cfg.name]
    lines = _local_copy_lines(cfg, published) if cfg.path else _hub_lines(cfg, published)
    to_documents = wiki_articles if cfg.name == "wiki2" else one_per_line
    documents = {split: to_documents(split_lines) for split, split_lines in lines.items()}
    if "val" not in documents:
        documents["train"], documents["val"] = carve_by_hash(documents["train"], cfg.val_fraction)
    return Splits(**documents)


def hub_dataset_id(cfg: DatasetConfig) -> tuple[str, Optional[str]]:
    """The Hugging Face dataset id and configuration of wiki2 or 1b: dataset.hf_name and dataset.hf_config
    when given, else the default (for wiki2, the configuration of dataset.variant)."""
    default_name, default_config = HUB_DEFAULTS[cfg.name]
    if cfg.name == "wiki2":
        if cfg.variant not in WIKI2_VARIANTS:
            choices = ", ".join(WIKI2_VARIANTS)
            raise BadInput(f"dataset.variant={cfg.variant!r} is not an option; choose one of: {choices}")
        default_config = WIKI2_VARIANTS[cfg.variant]
    return chosen_hub_id(cfg, default_name, default_config)


def chosen_hub_id(cfg: DatasetConfig, default_name: str, default_config: Optional[str]) -> tuple[str, Optional[str]]:
    return cfg.hf_name or default_name, cfg.hf_config or default_config


def hub_revision(cfg: DatasetConfig, hf_name: str) -> Optional[str]:
    """dataset.hf_revision when given; else, for the dataset's default hub id, its default revision (None: main)."""
    if cfg.hf_revision:
        return cfg.hf_revision
    default_name = HUB_DEFAULTS.get(cfg.name, (None,))[0]
    return HUB_DEFAULT_REVISIONS.get(cfg.name) if hf_name == default_name else None


def wiki_articles(lines: list[str]) -> list[str]:
    """Group WikiText lines into articles: each starts at a ``" = Title = "`` line.

    Blank lines are dropped; the others keep their text and newline as in the raw files, so the hub's
    rows and the raw ``wiki.*.raw`` files give the same documents.
    """
    articles: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        if WIKI_ARTICLE_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line if line.endswith("\n") else line + "\n")
    return ["".join(article) for article in articles]


def one_per_line(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def _local_copy_lines(cfg: DatasetConfig, published: tuple[str, ...]) -> dict[str, list[str]]:
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise BadInput(
            f"dataset.path={cfg.path!r} is not a folder; give a datasets.save_to_disk folder "
            f"or a folder of raw text files (names containing {_raw_file_hint(published)})"
        )
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        import datasets

        return _text_splits(datasets.load_from_disk(str(folder)), f"dataset.path={cfg.path!r}", published)
    return _raw_file_lines(folder, cfg.path, published)


def _raw_file_lines(folder: Path, given: str, published: tuple[str, ...]) -> dict[str, list[str]]:
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    by_split: dict[str, list[Path]] = {split: [] for split in published}
    for path in files:
        split = raw_file_split(path.relative_to(folder).as_posix())
        if split in by_split:
            by_split[split].append(path)
    missing = [split for split, found in by_split.items() if not found]
    if missing:
        raise BadInput(
            f"dataset.path={given!r} holds no {missing[0]} text; name the files with "
            f"{_raw_file_hint(published)} (like wiki.train.raw), or give a save_to_disk folder"
        )
    return {split: _read_lines(found) for split, found in by_split.items()}


def raw_file_split(relative_path: str) -> Optional[str]:
    """The split a raw text file belongs to by its path ('wiki.valid.raw' -> 'val'), or None."""
    lowered = relative_path.lower()
    return next((split for word, split in RAW_FILE_WORDS if word in lowered), None)


def _raw_file_hint(published: tuple[str, ...]) -> str:
    words = [" or ".join(repr(word) for word, split in RAW_FILE_WORDS if split == wanted) for wanted in published]
    return ", ".join(words)


def _read_lines(files: list[Path]) -> list[str]:
    return [line for path in files for line in _read_text(path, "dataset.path").splitlines(keepends=True)]


def _hub_lines(cfg: DatasetConfig, published: tuple[str, ...]) -> dict[str, list[str]]:
    dataset_dict, label = load_hub_dataset(cfg, *hub_dataset_id(cfg), "a save_to_disk folder or raw text files")
    return _text_splits(dataset_dict, f"Hugging Face dataset {label!r}", published)


def load_hub_dataset(cfg: DatasetConfig, hf_name: str, hf_config: Optional[str], local_copy: str) -> tuple[Any, str]:
    """``datasets.load_dataset(hf_name, hf_config)`` and its label.

    Offline and not cached, it fails at once with a BadInput that names ``local_copy``, the kind of
    dataset.path folder that replaces the hub.
    """
    revision = hub_revision(cfg, hf_name)
    label = (hf_name if hf_config is None else f"{hf_name}/{hf_config}") + (f"@{revision}" if revision else "")
    go_offline_unless_hub_reachable()
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset_dict = datasets.load_dataset(hf_name, hf_config, revision=revision)
    # datasets signals "not cached" and "no such dataset" with many unrelated exception types.
    except Exception as error:
        raise BadInput(_hub_failure(cfg.name, label, error, local_copy)) from error
    return dataset_dict, label


def _hub_failure(name: str, label: str, error: Exception, local_copy: str) -> str:
    fix = f"or download it and pass dataset.path=FOLDER ({local_copy})"
    if any(sign in f"{type(error).__name__}: {error}" for sign in SCRIPT_DATASET_ERRORS):
        return (
            f"dataset={name}: the Hugging Face dataset {label!r} is a loading script, which this `datasets` no longer "
            f"runs; set dataset.hf_name to a copy stored as data files (parquet), or dataset.hf_revision="
            f"refs/convert/parquet for the hub's own conversion of it, {fix}"
        )
    if hub_offline():
        return (
            f"dataset={name}: the Hugging Face dataset {label!r} is neither cached nor reachable (offline); "
            f"run once with internet to cache it, {fix}"
        )
    return (
        f"dataset={name}: could not load the Hugging Face dataset {label!r} ({first_line(error)}); "
        f"check dataset.hf_name and dataset.hf_config, {fix}"
    )


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _text_splits(dataset_dict: object, source: str, published: tuple[str, ...]) -> dict[str, list[str]]:
    """The ``text`` column of each split in ``published``, found under its names in HUB_SPLIT_NAMES."""
    return {split: _text_column(dataset_dict[find_split(dataset_dict, split, source)], source) for split in published}


def find_split(dataset_dict: object, split: str, source: str) -> str:
    """The name ``dataset_dict`` gives ``split`` (train, val or test), or BadInput naming the splits it has."""
    names = list(dataset_dict.keys()) if hasattr(dataset_dict, "keys") else []
    found = next((name for name in HUB_SPLIT_NAMES[split] if name in names), None)
    if found is None:
        wanted = " or ".join(map(repr, HUB_SPLIT_NAMES[split]))
        raise BadInput(f"{source} has splits {names}; it needs a {wanted} split")
    return found


def _text_column(split: Any, source: str) -> list[str]:
    if "text" not in split.column_names:
        raise BadInput(f"{source} has columns {split.column_names}; it needs a 'text' column")
    return list(split["text"])


# ---- text_files: the user's own files ----


def _text_file_splits(cfg: DatasetConfig) -> Splits:
    """One document per file with three files or more, else one per paragraph, split by name."""
    if not cfg.files:
        raise BadInput("dataset=text_files needs dataset.files: .txt files or folders, e.g. dataset.files=[notes.txt]")
    texts = [(str(path), _read_text(path, "dataset.files")) for path in _expand_files(cfg.files)]
    documents = [(name, text) for name, text in texts if text.strip()]
    if not documents:
        names = ", ".join(name for name, _ in texts)
        raise BadInput(f"dataset.files: every file is empty ({names}); give files with text")
    if len(documents) < 3:
        documents = [paragraph for name, text in documents for paragraph in _named_paragraphs(name, text)]
    return split_by_name(documents, *held_out_fractions(cfg))


def _expand_files(entries: list[str]) -> list[Path]:
    files = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = []
            for candidate in sorted(path.rglob("*.txt")):
                if candidate.is_file():  # a regular file (or a link to one): a FIFO or device would never end
                    found.append(candidate)
                elif not candidate.is_dir():
                    sys.stderr.write(f"tyingrun: warning: dataset.files: skipping '{candidate}': not a regular "
                                     f"file\n")
            if not found:
                raise BadInput(f"dataset.files: the folder '{entry}' holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise BadInput(f"dataset.files: '{entry}' is not a regular file or folder (a pipe or device would never "
                           f"end); give .txt files or folders")
        else:
            raise BadInput(
                f"dataset.files: no such file '{entry}'; give existing .txt files or folders "
                f"(relative paths start at {Path.cwd()})"
            )
    return files


def _named_paragraphs(name: str, text: str) -> NamedDocuments:
    """A file's paragraphs as documents named ``file#index``, so that one or two files still fill three splits."""
    return [(f"{name}#{index}", paragraph.strip()) for index, paragraph in enumerate(paragraphs(text))]


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"{key}: '{path}' is not UTF-8 text; convert it to UTF-8") from error


# The text corpora by name: the one list of them (the data registry, tyingrun.data.build, reads it).
CORPUS_LOADERS: dict[str, Callable[[DatasetConfig], Splits]] = {
    "pydoc": _pydoc_splits,
    "wiki2": _hub_corpus_splits,
    "1b": _hub_corpus_splits,
    "text_files": _text_file_splits,
}
