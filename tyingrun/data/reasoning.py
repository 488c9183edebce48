"""Reasoning-task data (dataset=phop, addition, parity): fixed val and test sets and an unlimited training stream
that never yields a held-out prompt (docs/reasoning.md).

Everything is drawn from streams of the run's seed: val (``val_instances``) at the training difficulty, test
(``test_instances``) in equal shares at each test difficulty, both sets of distinct prompts (test shares none with
val), and the training stream (``data_order``, or the reward stream the trainer derives) at the training difficulty.
Each training draw whose prompt is a val or test prompt (compared by its bytes, in a hash set) is drawn again, and
counted.

A model sees an instance as ``prompt + answer`` shifted by one: ``input_ids`` is all of it but the last answer
token, ``labels`` the next tokens with every position that does not predict an answer token set to IGNORE_INDEX,
padded on the right (after the answer, which a causal model never looks at) to the split's longest instance.
Every batch carries each instance's difficulty (``contracts.DIFFICULTY``), which also tells the model that only
the answer is scored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch

from tyingrun.config import DatasetConfig
from tyingrun.contracts import DIFFICULTY, IGNORE_INDEX, Batch
from tyingrun.data.reasoning_tasks import MAX_DIGITS, PAD, Instances, ReasoningTask, build_task
from tyingrun.data.splits import spread_sample
from tyingrun.errors import BadInput
from tyingrun.seeding import derive_seed

SPLITS = ("train", "val", "test")
# A held-out set may take at most this share of the distinct prompts at a difficulty: training keeps the rest.
HELD_OUT_LIMIT = 0.5
# Candidates drawn (from a fixed seed) to estimate the share of valid p-hop sequences at a difficulty.
TRIAL_CANDIDATES = 4096
TRIAL_SEED = 0


@dataclass
class HeldOut:
    """A fixed split: its instances in order (grouped by difficulty) and their model tensors."""

    prompts: List[np.ndarray]  # one int64 row per instance (lengths differ between difficulties)
    answers: np.ndarray  # int64 [n, answer_length]
    difficulty: torch.Tensor  # int64 [n]
    input_ids: torch.Tensor  # int64 [n, width]
    labels: torch.Tensor  # int64 [n, width]

    def __len__(self) -> int:
        return len(self.answers)

    def batch(self, chosen: torch.Tensor | slice) -> Batch:
        return {"input_ids": self.input_ids[chosen], "labels": self.labels[chosen],
                DIFFICULTY: self.difficulty[chosen]}


def encode(prompts: Sequence[np.ndarray], answers: np.ndarray, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` of instances, padded on the right to the longest (see the module doc)."""
    answer_length = answers.shape[1]
    width = max(len(prompt) for prompt in prompts) + answer_length - 1
    input_ids = np.full((len(prompts), width), pad_id, np.int64)
    labels = np.full((len(prompts), width), IGNORE_INDEX, np.int64)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        sequence = np.concatenate([prompt, answer])
        input_ids[row, : len(sequence) - 1] = sequence[:-1]
        first = len(prompt) - 1  # the position that reads "=" predicts the first answer token
        labels[row, first : first + answer_length] = answer
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def key_of(prompt: np.ndarray) -> bytes:
    return np.ascontiguousarray(prompt, np.int64).tobytes()


class AnswerSampler:
    """The unlimited training stream: batches at the training difficulty, never a held-out prompt; resumable.

    Its state is the generator's position and the counts of draws and of draws redrawn for being held out.
    """

    def __init__(self, task: ReasoningTask, batch_size: int, seed: int, held_out: FrozenSet[bytes]):
        self.task, self.batch_size, self.held_out = task, batch_size, held_out
        self.generator = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0
        self.redrawn = 0

    def next_instances(self, count: int) -> Instances:
        prompts, answers, kept = [], [], 0
        while kept < count:
            drawn_prompts, drawn_answers = self.task.draw(self.generator, self.task.train_difficulty, count - kept)
            fresh = np.fromiter((key_of(row) not in self.held_out for row in drawn_prompts), bool, len(drawn_prompts))
            self.drawn += len(fresh)
            self.redrawn += int((~fresh).sum())
            prompts.append(drawn_prompts[fresh])
            answers.append(drawn_answers[fresh])
            kept += int(fresh.sum())
        return np.concatenate(prompts), np.concatenate(answers)

    def next_batch(self) -> Batch:
        prompts, answers = self.next_instances(self.batch_size)
        input_ids, labels = encode(list(prompts), answers, self.task.ids[PAD])
        difficulty = torch.full((self.batch_size,), self.task.train_difficulty, dtype=torch.int64)
        return {"input_ids": input_ids, "labels": labels, DIFFICULTY: difficulty}

    def state_dict(self) -> dict:
        return {"generator": self.generator.bit_generator.state, "drawn": self.drawn, "redrawn": self.redrawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.bit_generator.state = state["generator"]
        self.drawn, self.redrawn = int(state["drawn"]), int(state["redrawn"])


@dataclass
class ReasoningData:
    task: ReasoningTask
    name: str
    val: HeldOut
    test: HeldOut
    unit = "samples"

    @property
    def vocab_size(self) -> int:
        return len(self.task.vocabulary)

    @property
    def tokenizer_sha256(self) -> str:
        """What the token ids mean: the SHA-256 of the task's vocabulary in id order (checkpoints record it)."""
        return hashlib.sha256("\n".join(self.task.vocabulary).encode()).hexdigest()

    @property
    def block_size(self) -> int:
        """Tokens in a training sequence (the model's input)."""
        return self.task.prompt_length(self.task.train_difficulty) + self.task.answer_length - 1

    @property
    def held_out_keys(self) -> FrozenSet[bytes]:
        return frozenset(key_of(prompt) for split in (self.val, self.test) for prompt in split.prompts)

    def train_sampler(self, batch_size: int, seed: int) -> AnswerSampler:
        return AnswerSampler(self.task, batch_size, derive_seed(seed, "data_order"), self.held_out_keys)

    def eval_batches(self, split: str, batch_size: int, limit: Optional[int]) -> Iterator[Batch]:
        """The batches of ``split`` (val or test) in order: every instance when ``limit`` is None, else ``limit``
        full batches of evenly spaced instances, the same at every call."""
        held = self.split(split)
        chosen = torch.arange(len(held)) if limit is None else torch.as_tensor(
            spread_sample(len(held), limit * batch_size))
        for start in range(0, len(chosen), batch_size):
            yield held.batch(chosen[start : start + batch_size])

    def eval_items(self, split: str) -> int:
        return len(self.split(split))

    def difficulties(self, split: str) -> Tuple[int, ...]:
        return (self.task.train_difficulty,) if split == "val" else self.task.test_difficulties

    def split(self, name: str) -> HeldOut:
        if name not in ("val", "test"):
            raise ValueError(f"unknown held-out split {name!r}; they are val and test")
        return getattr(self, name)

    def items_in(self, batch: Batch) -> int:
        return len(batch["labels"])

    def describe(self) -> str:
        task = self.task
        return (f"{len(self.val):,} val / {len(self.test):,} test instances, training {task.count_name} "
                f"{task.train_difficulty}, test {task.count_name} {list(task.test_difficulties)}; answers of "
                f"{task.answer_length} token(s), vocabulary {self.vocab_size}")

    def rows(self, prompts: Sequence[np.ndarray] | np.ndarray, answers: np.ndarray) -> List[Tuple[str, str]]:
        """``(prompt, answer)`` as token strings separated by single spaces."""
        return [(" ".join(self.task.tokens(prompt)), " ".join(self.task.tokens(answer)))
                for prompt, answer in zip(prompts, answers, strict=True)]

def draw_distinct(task: ReasoningTask, rng: np.random.Generator, difficulty: int, count: int,
                  excluded: set) -> Instances:
    """``count`` instances at ``difficulty`` with distinct prompts none of which is in ``excluded`` (which gains
    them)."""
    prompts: List[np.ndarray] = []
    answers: List[np.ndarray] = []
    while len(prompts) < count:
        drawn_prompts, drawn_answers = task.draw(rng, difficulty, count - len(prompts))
        for prompt, answer in zip(drawn_prompts, drawn_answers, strict=True):
            key = key_of(prompt)
            if key not in excluded:
                excluded.add(key)
                prompts.append(prompt)
                answers.append(answer)
    return np.stack(prompts), np.stack(answers)


def held_out(task: ReasoningTask, shares: Sequence[Tuple[int, int]], seed: int, excluded: set) -> HeldOut:
    """A fixed split of ``(difficulty, count)`` shares, drawn in that order from one generator of ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    prompts: List[np.ndarray] = []
    answers, difficulty = [], []
    for level, count in shares:
        drawn_prompts, drawn_answers = draw_distinct(task, rng, level, count, excluded)
        prompts += list(drawn_prompts)
        answers.append(drawn_answers)
        difficulty += [level] * count
    answers_array = np.concatenate(answers)
    input_ids, labels = encode(prompts, answers_array, task.ids[PAD])
    return HeldOut(prompts, answers_array, torch.tensor(difficulty, dtype=torch.int64), input_ids, labels)


def test_shares(task: ReasoningTask, size: int) -> List[Tuple[int, int]]:
    """``size`` test instances in equal shares over the test difficulties (the first ones get the remainder)."""
    levels = task.test_difficulties
    return [(level, size // len(levels) + (index < size % len(levels))) for index, level in enumerate(levels)]


def build_reasoning_data(cfg: DatasetConfig, seed: int) -> ReasoningData:
    """The fixed val and test sets of task ``cfg.name`` for the run seed ``seed`` (the config check has passed)."""
    task = build_task(cfg)
    excluded: set = set()
    val = held_out(task, [(task.train_difficulty, cfg.val_size)], derive_seed(seed, "val_instances"), excluded)
    test = held_out(task, test_shares(task, cfg.test_size), derive_seed(seed, "test_instances"), excluded)
    return ReasoningData(task, cfg.name, val, test)


# ---- the config check (the preflight calls it before anything is built) ----


def _whole(key: str, value: object, low: int, high: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadInput(f"{key}={value!r} must be a whole number {bound}")


def _check_list(key: str, values: object, low: int, high: Optional[int] = None) -> None:
    for value in cast(Sequence[object], values or []):
        _whole(f"{key} entry", value, low, high)


def valid_share(task: ReasoningTask, difficulty: int) -> float:
    """The share of candidates that are valid instances at ``difficulty`` (p-hop chains that never reach 0)."""
    rng = np.random.Generator(np.random.PCG64(TRIAL_SEED))
    return float(task.candidates(rng, difficulty, TRIAL_CANDIDATES)[2].mean())


def check_reasoning_config(cfg: DatasetConfig, max_positions: int) -> None:
    """BadInput, in one line naming the key, for a reasoning dataset's value the generator cannot work with."""
    _whole("dataset.val_size", cfg.val_size, 1)
    _whole("dataset.test_size", cfg.test_size, 1)
    if cfg.name == "phop":
        _whole("dataset.alphabet", cfg.alphabet, 2)
        _whole("dataset.length", cfg.length, 2)
        _whole("dataset.hops", cfg.hops, 1)
        _check_list("dataset.test_hops", cfg.test_hops, 1)
    elif cfg.name == "addition":
        _whole("dataset.digits", cfg.digits, 1, MAX_DIGITS)
        _whole("dataset.operands", cfg.operands, 1)
        _check_list("dataset.test_operands", cfg.test_operands, 1)
    else:
        _whole("dataset.length", cfg.length, 1)
        _check_list("dataset.test_length", cfg.test_length, 1)
    task = build_task(cfg)
    test_key = {"phop": "dataset.test_hops", "addition": "dataset.test_operands"}.get(cfg.name, "dataset.test_length")
    longest = max(task.prompt_length(level) for level in (task.train_difficulty, *task.test_difficulties))
    if longest + task.answer_length - 1 > max_positions:
        raise BadInput(f"dataset={cfg.name}: the longest instance has {longest + task.answer_length - 1} tokens, more "
                       f"than the model's {max_positions} positions; raise model.max_positions or lower "
                       f"{task.difficulty_key} / {test_key}")
    held: Dict[int, int] = {task.train_difficulty: cfg.val_size}
    for level, count in test_shares(task, cfg.test_size):
        held[level] = held.get(level, 0) + count
    for level, count in held.items():
        key = task.difficulty_key if level == task.train_difficulty else test_key
        distinct = task.distinct_prompts(level) * (valid_share(task, level) if cfg.name == "phop" else 1.0)
        if count > HELD_OUT_LIMIT * distinct:
            raise BadInput(f"{key}: at {task.count_name} {level} there are about {distinct:,.0f} distinct prompts, too "
                           f"few for {count:,} held-out instances that training never sees (at most "
                           f"{HELD_OUT_LIMIT:.0%} of them); lower dataset.val_size / dataset.test_size or make the "
                           f"task larger")

