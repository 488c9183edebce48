"""What ``tyingrun-data`` prints and dumps for a reasoning task (docs/reasoning.md#checking-the-generator).

Per split: its instances, its answer distribution and three examples. The train split is the first
``dataset.val_size`` instances of the run's training stream (drawn in batches of ``train.batch_size``, as the run
draws them), with how many draws were checked against the held-out
prompts and how many of them were drawn again. ``--dump DIR`` writes ``train.tsv``, ``val.tsv`` and ``test.tsv``:
one instance a line, ``prompt<TAB>answer``, tokens separated by single spaces as the model reads them.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

from tyingrun.data.reasoning import SPLITS, AnswerSampler, ReasoningData

EXAMPLES = 3
# Answers named in a split's distribution; the rest are summed up.
SHOWN_ANSWERS = 10

Rows = List[Tuple[str, str]]


def answer_distribution(rows: Rows) -> str:
    counts = Counter(answer for _, answer in rows)
    shown = ", ".join(f"{answer!r} {count / len(rows):.1%}" for answer, count in counts.most_common(SHOWN_ANSWERS))
    rest = len(counts) - SHOWN_ANSWERS
    return shown + (f" and {rest} more answers" if rest > 0 else "")


def training_rows(data: ReasoningData, count: int, seed: int, batch_size: int) -> Tuple[Rows, AnswerSampler]:
    """The first ``count`` instances the run of seed ``seed`` trains on, drawn batch by batch as it draws them, and
    the sampler that drew them (its counts)."""
    sampler = data.train_sampler(batch_size, seed)
    rows: Rows = []
    while len(rows) < count:
        rows += data.rows(*sampler.next_instances(batch_size))
    return rows[:count], sampler


def describe_reasoning(data: ReasoningData, train_count: int, seed: int,
                       batch_size: int) -> Tuple[List[str], Dict[str, str]]:
    """One line per split (and its examples), and each split's TSV text (``--dump`` writes it as ``<split>.tsv``);
    train: the first ``train_count`` instances of the run of ``seed``."""
    train_rows, sampler = training_rows(data, train_count, seed, batch_size)
    rows = {"train": train_rows}
    rows.update({split: data.rows(data.split(split).prompts, data.split(split).answers) for split in ("val", "test")})
    lines = []
    held = len(data.held_out_keys)
    for split in SPLITS:
        what = (f"the first {len(rows[split]):,} instances of the training stream ({sampler.drawn:,} draws checked "
                f"against the {held:,} held-out prompts, {sampler.redrawn:,} drawn again)" if split == "train" else
                f"{len(rows[split]):,} instances, difficulties {list(data.difficulties(split))}")
        lines.append(f"{data.name} {split}: {what}; answers: {answer_distribution(rows[split])}")
        lines += [f"  {prompt}  ->  {answer}" for prompt, answer in rows[split][:EXAMPLES]]
    tsv = {split: "".join(f"{prompt}\t{answer}\n" for prompt, answer in rows[split]) for split in SPLITS}
    return lines, tsv
