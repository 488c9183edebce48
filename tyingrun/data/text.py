"""Text corpora as lists of documents with a train and a validation split.

Corpora: ``pydoc`` (built offline from the running Python's own documentation), ``wiki2`` (WikiText-2 raw),
``1b`` (One Billion Word) and ``text_files`` (the user's files). Also the helpers the data package shares:
where caches live, atomic cache writes, content hashes and the Hugging Face hub reachability probe.
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
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

from tyingrun.config import DatasetConfig
from tyingrun.errors import BadInput

log = logging.getLogger("tyingrun")

PYDOC_FORMAT = 1
SKIPPED_STDLIB_FOLDERS = frozenset({"site-packages", "test", "tests", "idlelib"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
VAL_SPLITS = ("validation", "valid", "test")
# Words that mark a raw file as training or held-out text, in order of preference for the held-out split.
TRAIN_FILE_WORD = "train"
VAL_FILE_WORDS = ("valid", "test", "heldout")
HUB_DEFAULTS = {"wiki2": ("wikitext", "wikitext-2-raw-v1"), "1b": ("lm1b", None)}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB_PROBE_TIMEOUT_S = 3.0
WIKI_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

NamedDocuments = list[tuple[str, str]]


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]


def load_corpus(cfg: DatasetConfig) -> Corpus:
    loaders: dict[str, Callable[[DatasetConfig], tuple[list[str], list[str]]]] = {
        "pydoc": _pydoc_splits,
        "wiki2": _hub_corpus_splits,
        "1b": _hub_corpus_splits,
        "text_files": _text_file_splits,
    }
    if cfg.name not in loaders:
        raise BadInput(f"dataset={cfg.name!r} is not a text corpus; choose one of: {', '.join(loaders)}")
    train, val = loaders[cfg.name](cfg)
    limit = cfg.max_documents
    return Corpus(name=cfg.name, train=train[:limit], val=val[:limit])


# ---- shared helpers: cache folder, atomic writes, hashes, hub probe ----


def cache_root(cfg: DatasetConfig) -> Path:
    """``dataset.cache_dir``, else ``$TYINGRUN_CACHE``, else ``~/.cache/tyingrun``."""
    chosen = cfg.cache_dir or os.environ.get("TYINGRUN_CACHE") or "~/.cache/tyingrun"
    return Path(chosen).expanduser()


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place once written.

    Readers (and concurrent runs sharing the cache) see either no file or a complete one.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise BadInput(
            f"cannot write to the cache folder {path.parent} ({error.strerror}); "
            f"set dataset.cache_dir or $TYINGRUN_CACHE to a writable folder"
        ) from error
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def split_by_name(documents: NamedDocuments, val_fraction: float) -> tuple[list[str], list[str]]:
    """A document goes to validation when a stable hash of its name falls below ``val_fraction``.

    With two or more documents both splits get at least one, so small corpora still have a validation split.
    """
    buckets = [int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10000 for name, _ in documents]
    is_val = [bucket < val_fraction * 10000 for bucket in buckets]
    if len(documents) >= 2 and not any(is_val):
        is_val[buckets.index(min(buckets))] = True
    if len(documents) >= 2 and all(is_val):
        is_val[buckets.index(max(buckets))] = False
    train = [text for (_, text), val in zip(documents, is_val, strict=True) if not val]
    val = [text for (_, text), val in zip(documents, is_val, strict=True) if val]
    return train, val


# ---- pydoc: the running Python's documentation ----


def _pydoc_splits(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    return split_by_name(pydoc_documents(cache_root(cfg)), cfg.val_fraction)


def pydoc_documents(cache: Path) -> NamedDocuments:
    """Help topics plus standard-library docstrings, built once per Python installation and cached."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = cache / "corpora" / f"pydoc-{short_hash(PYDOC_FORMAT, sys.version, stdlib)}.json"
    if path.exists():
        return [(name, text) for name, text in json.loads(path.read_text(encoding="utf-8"))]
    log.info("building the pydoc corpus from %s (once; cached in %s)", stdlib, path.parent)
    documents = _help_topics() + _stdlib_docstrings(stdlib)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(documents), encoding="utf-8")
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


def _hub_corpus_splits(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    if cfg.path:
        train_lines, val_lines = _local_copy_lines(cfg)
    else:
        train_lines, val_lines = _hub_lines(cfg)
    to_documents = wiki_articles if cfg.name == "wiki2" else one_per_line
    return to_documents(train_lines), to_documents(val_lines)


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


def _local_copy_lines(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise BadInput(
            f"dataset.path={cfg.path!r} is not a folder; give a datasets.save_to_disk folder "
            f"or a folder of raw text files (names containing 'train' and 'valid' or 'test')"
        )
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        import datasets

        return _text_splits(datasets.load_from_disk(str(folder)), f"dataset.path={cfg.path!r}")
    return _raw_file_lines(folder, cfg.path)


def _raw_file_lines(folder: Path, given: str) -> tuple[list[str], list[str]]:
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))

    def named(word: str) -> list[Path]:
        return [path for path in files if word in path.relative_to(folder).as_posix().lower()]

    train_files = named(TRAIN_FILE_WORD)
    val_files = next((found for found in map(named, VAL_FILE_WORDS) if found), [])
    if not train_files or not val_files:
        raise BadInput(
            f"dataset.path={given!r} holds no {'training' if not train_files else 'validation'} text; "
            f"name the files like wiki.train.raw and wiki.valid.raw (or *test*), or give a save_to_disk folder"
        )
    return _read_lines(train_files), _read_lines(val_files)


def _read_lines(files: list[Path]) -> list[str]:
    return [line for path in files for line in _read_text(path, "dataset.path").splitlines(keepends=True)]


def _hub_lines(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    dataset_dict, label = load_hub_dataset(cfg, *HUB_DEFAULTS[cfg.name], "a save_to_disk folder or raw text files")
    return _text_splits(dataset_dict, f"Hugging Face dataset {label!r}")


def load_hub_dataset(
    cfg: DatasetConfig, default_name: str, default_config: Optional[str], local_copy: str
) -> tuple[Any, str]:
    """``datasets.load_dataset`` of dataset.hf_name/hf_config (or the defaults), and its label.

    Offline and not cached, it fails at once with a BadInput that names ``local_copy``, the kind of
    dataset.path folder that replaces the hub.
    """
    hf_name, hf_config = cfg.hf_name or default_name, cfg.hf_config or default_config
    label = hf_name if hf_config is None else f"{hf_name}/{hf_config}"
    go_offline_unless_hub_reachable()
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset_dict = datasets.load_dataset(hf_name, hf_config)
    # datasets signals "not cached" and "no such dataset" with many unrelated exception types.
    except Exception as error:
        raise BadInput(_hub_failure(cfg.name, label, error, local_copy)) from error
    return dataset_dict, label


def _hub_failure(name: str, label: str, error: Exception, local_copy: str) -> str:
    fix = f"or download it and pass dataset.path=FOLDER ({local_copy})"
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


def _text_splits(dataset_dict: object, source: str) -> tuple[list[str], list[str]]:
    """The ``text`` column of the train split and of the first of validation/valid/test."""
    splits = list(dataset_dict.keys()) if hasattr(dataset_dict, "keys") else []
    val_split = next((split for split in VAL_SPLITS if split in splits), None)
    if "train" not in splits or val_split is None:
        raise BadInput(f"{source} has splits {splits}; it needs 'train' and one of {', '.join(VAL_SPLITS)}")
    columns = dataset_dict["train"].column_names
    if "text" not in columns:
        raise BadInput(f"{source} has columns {columns}; it needs a 'text' column")
    return list(dataset_dict["train"]["text"]), list(dataset_dict[val_split]["text"])


# ---- text_files: the user's own files ----


def _text_file_splits(cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    if not cfg.files:
        raise BadInput("dataset=text_files needs dataset.files: .txt files or folders, e.g. dataset.files=[notes.txt]")
    texts = [(str(path), _read_text(path, "dataset.files")) for path in _expand_files(cfg.files)]
    documents = [(name, text) for name, text in texts if text.strip()]
    if not documents:
        names = ", ".join(name for name, _ in texts)
        raise BadInput(f"dataset.files: every file is empty ({names}); give files with text")
    if len(documents) == 1:
        documents = _paragraphs(*documents[0])
    return split_by_name(documents, cfg.val_fraction)


def _expand_files(entries: list[str]) -> list[Path]:
    files = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.txt"))
            if not found:
                raise BadInput(f"dataset.files: the folder '{entry}' holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(
                f"dataset.files: no such file '{entry}'; give existing .txt files or folders "
                f"(relative paths start at {Path.cwd()})"
            )
    return files


def _paragraphs(name: str, text: str) -> NamedDocuments:
    """Split one file at blank lines so that a single file still yields a validation split."""
    paragraphs = [paragraph.strip() for paragraph in PARAGRAPH_BREAK.split(text) if paragraph.strip()]
    return [(f"{name}#{index}", paragraph) for index, paragraph in enumerate(paragraphs)]


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"{key}: '{path}' is not UTF-8 text; convert it to UTF-8") from error
