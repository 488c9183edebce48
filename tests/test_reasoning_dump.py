"""``tyingrun-data --dump`` on the reasoning tasks, checked line by line by a checker written from the task
definitions (docs/reasoning.md), not from the generator."""

import pytest

from tyingrun.config import DatasetConfig
from tyingrun.contracts import IGNORE_INDEX
from tyingrun.data.reasoning import build_reasoning_data

DATA_CLI = ("-m", "tyingrun.data_cli")
SIZES = ["dataset.val_size=200", "dataset.test_size=300"]


def phop_answer(symbols, hops):
    """x_{find^hops(n)} with find(i) = max{j <= i : x_{j-1} = x_i} (1-based), or None when the chain reaches 0."""
    x = [None, *symbols]
    position = len(symbols)
    for _ in range(hops):
        position = next((j for j in range(position, 1, -1) if x[j - 1] == x[position]), 0)
        if position == 0:
            return None
    return x[position]


def check_phop(prompt, answer, alphabet, length):
    count, *symbols, mark = prompt
    assert count.startswith("<hops=") and count.endswith(">") and mark == "="
    assert len(symbols) == length
    assert all(symbol in {f"s{k}" for k in range(alphabet)} for symbol in symbols)
    expected = phop_answer(symbols, int(count[len("<hops="):-1]))
    assert expected is not None and answer == [expected]
    return int(count[len("<hops="):-1])


def check_addition(prompt, answer, digits, width, reverse):
    count, *body, mark = prompt
    assert count.startswith("<operands=") and mark == "="
    operands = " ".join(body).split(" + ")
    assert len(operands) == int(count[len("<operands="):-1])
    numbers = []
    for operand in operands:
        written = operand.split(" ")
        assert len(written) == digits and all(d in "0123456789" and len(d) == 1 for d in written)
        numbers.append(int("".join(written)))
    assert len(answer) == width
    shown = "".join(reversed(answer) if reverse else answer)
    assert int(shown) == sum(numbers)
    return len(operands)


def check_parity(prompt, answer, length):
    count, *bits, mark = prompt
    assert count == f"<length={len(bits)}>" and mark == "="
    assert set(bits) <= {"0", "1"}
    assert answer == [str(bits.count("1") % 2)]
    return len(bits)


def read_tsv(path):
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        prompt, answer = line.split("\t")
        assert "  " not in prompt and "  " not in answer
        rows.append((prompt.split(" "), answer.split(" ")))
    return rows


CASES = {
    "phop": (["dataset=phop", "dataset.alphabet=5", "dataset.length=12", "dataset.test_hops=[1,2,3,4]"],
             lambda p, a: check_phop(p, a, alphabet=5, length=12), 2, [1, 2, 3, 4]),
    "addition": (["dataset=addition", "dataset.digits=3", "dataset.operands=3", "dataset.test_operands=[2,3,5]"],
                 lambda p, a: check_addition(p, a, digits=3, width=len(str(5 * 999)), reverse=False), 3, [2, 3, 5]),
    "addition_reversed": (["dataset=addition", "dataset.digits=2", "dataset.operands=4", "dataset.reverse_answer=true"],
                          lambda p, a: check_addition(p, a, digits=2, width=len(str(4 * 99)), reverse=True), 4, [4]),
    "parity": (["dataset=parity", "dataset.length=16", "dataset.test_length=[16,24]"],
               lambda p, a: check_parity(p, a, length=16), 16, [16, 24]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dump_agrees_with_an_independent_checker_on_every_line(tmp_path, cli, case):
    overrides, check, train_difficulty, test_difficulties = CASES[case]
    result = cli(*overrides, *SIZES, "--dump", str(tmp_path), entry=DATA_CLI)
    assert result.returncode == 0, result.stderr
    splits = {split: read_tsv(tmp_path / f"{split}.tsv") for split in ("train", "val", "test")}
    assert [len(splits[split]) for split in ("train", "val", "test")] == [200, 200, 300]
    for split, rows in splits.items():
        levels = [check(prompt, answer) for prompt, answer in rows]
        assert set(levels) == set(test_difficulties if split == "test" else [train_difficulty])
    held_out = {tuple(prompt) for split in ("val", "test") for prompt, _ in splits[split]}
    assert len(held_out) == 500
    assert not {tuple(prompt) for prompt, _ in splits["train"]} & held_out
    # Three examples and the answer distribution per split, as printed.
    for split in ("train", "val", "test"):
        assert any(line.startswith(f"{overrides[0].split('=')[1]} {split}:") and "answers:" in line
                   for line in result.stdout.splitlines())
    assert result.stdout.count("  ->  ") == 9


def test_train_tsv_is_the_start_of_the_runs_training_stream(tmp_path, cli):
    result = cli("dataset=phop", *SIZES, "train.batch_size=16", "train.seed=3", "--dump", str(tmp_path), entry=DATA_CLI)
    assert result.returncode == 0, result.stderr
    data = build_reasoning_data(DatasetConfig(name="phop", val_size=200, test_size=300), seed=3)
    sampler = data.train_sampler(16, seed=3)  # as the trainer makes it
    seen = []
    while len(seen) < 200:
        batch = sampler.next_batch()
        for input_ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            answer_at = (labels != IGNORE_INDEX).nonzero().flatten()
            prompt = input_ids[: answer_at[0] + 1]
            seen.append(f"{' '.join(data.task.tokens(prompt.tolist()))}\t"
                        f"{' '.join(data.task.tokens(labels[answer_at].tolist()))}")
    assert (tmp_path / "train.tsv").read_text().splitlines() == seen[:200]
