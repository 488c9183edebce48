"""The synthetic reasoning tasks: p-hop induction, n-ary addition and parity (docs/reasoning.md).

Each task has a fixed vocabulary of symbol tokens (no tokenizer) and draws instances at a difficulty (hops,
operands or bits): a prompt, which starts with the difficulty's count token and ends with ``=``, and a fixed-width
answer. Draws are vectorised over numpy arrays of token ids, from a ``numpy.random.Generator`` the caller owns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Sequence, Tuple, cast

import numpy as np

from tyingrun.config import DatasetConfig

PAD, ANSWER_MARK = "<pad>", "="
REASONING_TASKS = ("phop", "addition", "parity")
# addition: the sums must fit int64.
MAX_DIGITS = 15

Instances = Tuple[np.ndarray, np.ndarray]  # prompts int64 [n, prompt_length], answers int64 [n, answer_length]
Candidates = Tuple[np.ndarray, np.ndarray, np.ndarray]  # bodies, answers, bool [n]: which are valid instances
# Candidates drawn at least per round of rejection sampling (phop), so that a few missing instances cost one round.
MIN_CANDIDATES = 16


class ReasoningTask(ABC):
    """A task's vocabulary (token id = index, PAD first), its training and test difficulties, and its draws."""

    difficulty_key: str  # the config key of the training difficulty (dataset.hops, ...)
    count_name: str  # what a difficulty counts, as its count token names it (<hops=2>)

    def __init__(self, train_difficulty: int, test_difficulties: Sequence[int], symbols: Sequence[str]):
        self.train_difficulty = train_difficulty
        self.test_difficulties = tuple(test_difficulties)
        difficulties = sorted({train_difficulty, *self.test_difficulties})
        self.vocabulary: List[str] = [PAD, ANSWER_MARK, *(self.count_token(d) for d in difficulties), *symbols]
        self.ids: Dict[str, int] = {token: index for index, token in enumerate(self.vocabulary)}

    def count_token(self, difficulty: int) -> str:
        return f"<{self.count_name}={difficulty}>"

    @property
    def answer_length(self) -> int:
        return 1

    @abstractmethod
    def prompt_length(self, difficulty: int) -> int:
        """Tokens in a prompt at ``difficulty``, its count token and ``=`` included."""

    @abstractmethod
    def distinct_prompts(self, difficulty: int) -> float:
        """How many different prompts the task can draw at ``difficulty`` (an upper bound where rejection applies)."""

    @abstractmethod
    def candidates(self, rng: np.random.Generator, difficulty: int, count: int) -> Candidates:
        """``count`` candidate bodies (the prompt between count token and ``=``), their answers, and which are valid."""

    def draw(self, rng: np.random.Generator, difficulty: int, count: int) -> Instances:
        """``count`` instances at ``difficulty``: whole prompts and answers, as token ids."""
        bodies, answers, kept = [], [], 0
        while kept < count:
            wanted = count - kept
            body, answer, valid = self.candidates(rng, difficulty, max(wanted, MIN_CANDIDATES))
            bodies.append(body[valid][:wanted])
            answers.append(answer[valid][:wanted])
            kept += len(bodies[-1])
        count_column = np.full((count, 1), self.ids[self.count_token(difficulty)], np.int64)
        mark_column = np.full((count, 1), self.ids[ANSWER_MARK], np.int64)
        prompts = np.concatenate([count_column, np.concatenate(bodies), mark_column], axis=1)
        return prompts, np.concatenate(answers)

    def tokens(self, ids: np.ndarray) -> List[str]:
        return [self.vocabulary[i] for i in ids]


class PHop(ReasoningTask):
    """p-hop induction (Sanford, Hsu & Telgarsky, 2024). With 1-based positions, ``find(i)`` is the largest
    ``j <= i`` with ``x_{j-1} = x_i`` (0 when there is none); the answer is ``x_{find^p(n)}``. Sequences whose
    chain reaches 0 within p hops are drawn again (at least the sequences ending in a repeated symbol are valid:
    there ``find(n) = n``, a fixed point, so every hop count can be made). Symbols are the tokens
    ``s0 .. s{alphabet-1}``."""

    difficulty_key = "dataset.hops"
    count_name = "hops"

    def __init__(self, alphabet: int, length: int, hops: int, test_hops: Sequence[int]):
        self.alphabet, self.length = alphabet, length
        super().__init__(hops, test_hops, [f"s{symbol}" for symbol in range(alphabet)])
        self.first_symbol = self.ids["s0"]

    def prompt_length(self, difficulty: int) -> int:
        return self.length + 2

    def distinct_prompts(self, difficulty: int) -> float:
        return float(self.alphabet) ** self.length

    def candidates(self, rng: np.random.Generator, difficulty: int, count: int) -> Candidates:
        symbols = rng.integers(self.alphabet, size=(count, self.length))
        position = hop_chain(symbols, difficulty)
        valid = position > 0
        answers = symbols[np.arange(count), np.maximum(position, 1) - 1]
        return symbols + self.first_symbol, (answers + self.first_symbol)[:, None], valid


def hop_chain(symbols: np.ndarray, hops: int) -> np.ndarray:
    """Per row of ``symbols`` (x_1..x_n), the 1-based position ``find^hops(n)``; 0 where the chain reaches 0."""
    count, length = symbols.shape
    rows = np.arange(count)
    # last[b, s]: the last 1-based position k < i holding symbol s (0: none yet); find(i) = last + 1 when k exists.
    last = np.zeros((count, int(symbols.max(initial=0)) + 1), np.int64)
    find = np.zeros((count, length + 1), np.int64)  # find[:, 0] = 0: once at 0 the chain stays there
    for i in range(1, length + 1):
        symbol = symbols[:, i - 1]
        previous = last[rows, symbol]
        find[:, i] = np.where(previous > 0, previous + 1, 0)
        last[rows, symbol] = i
    position = np.full(count, length, np.int64)
    for _ in range(hops):
        position = find[rows, position]
    return position


class Addition(ReasoningTask):
    """n-ary addition: ``operands`` numbers of ``digits`` digits each (0 .. 10^digits - 1, written with leading
    zeros), joined by ``+``; the answer is the sum's digits at the one width that holds the largest sum at any of
    the task's operand counts, most significant first (``reverse_answer``: least significant first)."""

    difficulty_key = "dataset.operands"
    count_name = "operands"

    def __init__(self, digits: int, operands: int, test_operands: Sequence[int], reverse_answer: bool):
        self.digits, self.reverse_answer = digits, reverse_answer
        super().__init__(operands, test_operands, ["+", *map(str, range(10))])
        most = max(self.train_difficulty, *self.test_difficulties)
        self.width = len(str(most * (10**digits - 1)))
        self.zero = self.ids["0"]

    @property
    def answer_length(self) -> int:
        return self.width

    def prompt_length(self, difficulty: int) -> int:
        return difficulty * (self.digits + 1) + 1

    def distinct_prompts(self, difficulty: int) -> float:
        return 10.0 ** (self.digits * difficulty)

    def candidates(self, rng: np.random.Generator, difficulty: int, count: int) -> Candidates:
        digits = rng.integers(10, size=(count, difficulty, self.digits))
        totals = (digits * 10 ** np.arange(self.digits - 1, -1, -1)).sum(axis=(1, 2))
        answer = (totals[:, None] // 10 ** np.arange(self.width - 1, -1, -1)) % 10
        if self.reverse_answer:
            answer = answer[:, ::-1]
        plus = np.full((count, difficulty, 1), self.ids["+"] - self.zero)
        body = np.concatenate([digits, plus], axis=2).reshape(count, -1)[:, :-1]
        return body + self.zero, answer + self.zero, np.ones(count, bool)


class Parity(ReasoningTask):
    """The parity (XOR) of a string of ``length`` bits, each a token ``0`` or ``1``; the answer is ``0`` or ``1``."""

    difficulty_key = "dataset.length"
    count_name = "length"

    def __init__(self, length: int, test_lengths: Sequence[int]):
        super().__init__(length, test_lengths, ["0", "1"])
        self.zero = self.ids["0"]

    def prompt_length(self, difficulty: int) -> int:
        return difficulty + 2

    def distinct_prompts(self, difficulty: int) -> float:
        return 2.0**difficulty

    def candidates(self, rng: np.random.Generator, difficulty: int, count: int) -> Candidates:
        bits = rng.integers(2, size=(count, difficulty))
        return bits + self.zero, (bits.sum(axis=1) % 2)[:, None] + self.zero, np.ones(count, bool)


def difficulties_of(given: object, train_difficulty: int) -> List[int]:
    """A test_* key's difficulties: the training one when unset (null or [])."""
    if given is None or (isinstance(given, (list, tuple)) and not given):
        return [train_difficulty]
    return [int(d) for d in given] if isinstance(given, (list, tuple)) else [int(cast(int, given))]


def build_task(cfg: DatasetConfig) -> ReasoningTask:
    """The task ``cfg.name`` (one of REASONING_TASKS) at the configured sizes; the config check has passed."""
    if cfg.name == "phop":
        return PHop(cfg.alphabet, cfg.length, cfg.hops, difficulties_of(cfg.test_hops, cfg.hops))
    if cfg.name == "addition":
        return Addition(cfg.digits, cfg.operands, difficulties_of(cfg.test_operands, cfg.operands),
                        cfg.reverse_answer)
    return Parity(cfg.length, difficulties_of(cfg.test_length, cfg.length))

