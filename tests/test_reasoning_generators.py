"""The reasoning generators on hand-worked instances, their seed streams, the held-out check, the answer-only loss,
and the bad values refused before anything is built."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tyingrun.config import Config, DatasetConfig, ModelConfig
from tyingrun.contracts import IGNORE_INDEX
from tyingrun.data.reasoning import build_reasoning_data
from tyingrun.data.reasoning_tasks import Addition, Parity, PHop, hop_chain
from tyingrun.errors import BadInput
from tyingrun.models.gpt2 import GPT2
from tyingrun.preflight import preflight


class Preset:
    """Stands in for a numpy Generator: ``integers`` returns the given values (tiled to the asked shape)."""

    def __init__(self, values):
        self.values = np.asarray(values)

    def integers(self, high, size):
        return np.broadcast_to(self.values, size).copy()


def tokens(task, ids):
    return " ".join(task.tokens(ids))


def test_hop_chain_follows_find_on_a_written_out_sequence():
    # x = b a c a b c a (positions 1..7). find(7): x_7 = a, last earlier a at 4, so find = 5 (x_5 = b).
    # find(5): x_5 = b, last earlier b at 1, so find = 2 (x_2 = a). find(2): no a before 2, so 0.
    sequence = np.array([[1, 0, 2, 0, 1, 2, 0]])
    assert hop_chain(sequence, 1).tolist() == [5]
    assert hop_chain(sequence, 2).tolist() == [2]
    assert hop_chain(sequence, 3).tolist() == [0]
    # x_{n-1} = x_n makes find(n) = n: a fixed point, whatever the hops.
    assert hop_chain(np.array([[2, 1, 1]]), 7).tolist() == [3]


def test_phop_instance_is_its_sequence_between_count_and_mark_and_its_hop_answer():
    task = PHop(alphabet=3, length=7, hops=2, test_hops=[1, 2])
    prompts, answers = task.draw(Preset([1, 0, 2, 0, 1, 2, 0]), 2, 1)
    assert tokens(task, prompts[0]) == "<hops=2> s1 s0 s2 s0 s1 s2 s0 ="
    assert tokens(task, answers[0]) == "s0"  # x_{find^2(7)} = x_2 = a
    prompts, answers = task.draw(Preset([1, 0, 2, 0, 1, 2, 0]), 1, 1)
    assert tokens(task, answers[0]) == "s1"  # x_{find(7)} = x_5 = b


def test_carry_heavy_sum_fixed_width_both_orders():
    # 999 + 999 + 999 = 2997: a carry out of every column; the width holds 4 * 999 = 3996 (test_operands 2 and 4).
    task = Addition(digits=3, operands=3, test_operands=[2, 4], reverse_answer=False)
    prompts, answers = task.draw(Preset(9), 3, 1)
    assert tokens(task, prompts[0]) == "<operands=3> 9 9 9 + 9 9 9 + 9 9 9 ="
    assert tokens(task, answers[0]) == "2 9 9 7"
    reverse = Addition(digits=3, operands=3, test_operands=[4], reverse_answer=True)
    assert tokens(reverse, reverse.draw(Preset(9), 3, 1)[1][0]) == "7 9 9 2"
    # Two operands of 500 make 1000, at the same width: 1 0 0 0.
    assert tokens(task, task.draw(Preset([5, 0, 0]), 2, 1)[1][0]) == "1 0 0 0"


def test_parity_counts_the_ones():
    task = Parity(length=7, test_lengths=[7])
    prompts, answers = task.draw(Preset([1, 0, 1, 1, 0, 1, 1]), 7, 1)
    assert tokens(task, prompts[0]) == "<length=7> 1 0 1 1 0 1 1 ="
    assert tokens(task, answers[0]) == "1"
    assert tokens(task, task.draw(Preset([1, 1, 0, 0, 0, 0, 0]), 7, 1)[1][0]) == "0"


def phop_config(**changes):
    values = {"name": "phop", "val_size": 300, "test_size": 300, **changes}
    return DatasetConfig(**values)


def prompts_of(split):
    return [prompt.tolist() for prompt in split.prompts]


def test_same_seed_same_instances_other_seed_other_ones():
    cfg = phop_config(test_hops=[2, 3])
    first, again, other = (build_reasoning_data(cfg, seed) for seed in (0, 0, 1))
    for split in ("val", "test"):
        assert prompts_of(first.split(split)) == prompts_of(again.split(split))
        assert prompts_of(first.split(split)) != prompts_of(other.split(split))
    streams = [data.train_sampler(8, seed).next_batch()["input_ids"] for data, seed in
               ((first, 0), (again, 0), (other, 1))]
    assert torch.equal(streams[0], streams[1]) and not torch.equal(streams[0], streams[2])
    assert [int(level) for level in first.test.difficulty.unique()] == [2, 3]


@pytest.mark.parametrize("cfg", [
    DatasetConfig(name="parity", length=12, val_size=500, test_size=500),
    DatasetConfig(name="phop", alphabet=2, length=13, hops=1, val_size=500, test_size=500),
], ids=["parity", "phop"])
def test_training_stream_never_yields_a_held_out_prompt(cfg):
    data = build_reasoning_data(cfg, seed=0)
    held = {tuple(prompt.tolist()) for split in (data.val, data.test) for prompt in split.prompts}
    assert len(held) == 1000  # distinct, and test shares none with val
    sampler = data.train_sampler(1000, seed=0)
    drawn = set()
    for _ in range(100):
        prompts, _ = sampler.next_instances(1000)
        drawn |= {tuple(row) for row in prompts.tolist()}
    assert not drawn & held
    # A few thousand prompts in all: about a quarter (parity) or more of the raw draws were held out, and redrawn.
    assert sampler.drawn - sampler.redrawn == 100_000
    assert sampler.redrawn > 10_000


def test_the_loss_counts_answer_tokens_only():
    torch.manual_seed(0)
    data = build_reasoning_data(DatasetConfig(name="addition", digits=2, operands=3, val_size=50, test_size=50), 0)
    batch = data.train_sampler(4, seed=0).next_batch()
    answered = batch["labels"] != IGNORE_INDEX
    assert answered.sum(dim=1).tolist() == [data.task.answer_length] * 4
    model = GPT2(ModelConfig(n_layer=2, d_model=32, n_head=2), data.vocab_size).eval()
    base = model.loss(batch)

    def changing(positions):
        def hook(module, args, logits):
            return logits + 5.0 * torch.randn_like(logits) * positions[..., None]
        return hook

    handle = model.register_forward_hook(changing(~answered))
    unchanged = model.loss(batch)
    handle.remove()
    handle = model.register_forward_hook(changing(answered))
    changed = model.loss(batch)
    handle.remove()
    assert torch.equal(base.loss, unchanged.loss) and torch.equal(base.n_correct, unchanged.n_correct)
    assert not torch.isclose(base.loss, changed.loss)
    assert base.n_items == 4 * data.task.answer_length
    logits = model(batch["input_ids"])
    by_hand = torch.nn.functional.cross_entropy(logits[answered], batch["labels"][answered])
    assert torch.isclose(base.loss, by_hand)
    exact = [(logits[row].argmax(-1)[answered[row]] == batch["labels"][row][answered[row]]).all() for row in range(4)]
    assert base.exact.tolist() == [bool(value) for value in exact]


def config_with(dataset_name, model="gpt2", **dataset):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name": model}, "dataset": {"name": dataset_name, **dataset}, "policy": {"name": "none"},
        "hardware": {"name": "cpu"}}))
    return cfg


@pytest.mark.parametrize("dataset, changes, says", [
    ("phop", {"alphabet": 1}, "dataset.alphabet=1 must be a whole number at least 2"),
    ("phop", {"hops": 0}, "dataset.hops=0 must be a whole number at least 1"),
    ("phop", {"test_hops": [2, 0]}, "dataset.test_hops entry=0"),
    ("phop", {"val_size": 0}, "dataset.val_size=0"),
    ("addition", {"test_size": 0}, "dataset.test_size=0"),
    ("addition", {"digits": 0}, "dataset.digits=0"),
    ("parity", {"test_length": [0]}, "dataset.test_length entry=0"),
    # Difficulties the generator cannot make: too few distinct prompts to hold out, or longer than the model.
    ("parity", {"test_length": [4], "test_size": 100}, "at length 4 there are about 16 distinct prompts"),
    ("phop", {"alphabet": 2, "length": 6}, "dataset.hops: at hops 2"),
    ("addition", {"test_operands": [80]}, "more than the model's 256 positions"),
])
def test_bad_reasoning_values_are_refused_by_the_preflight(dataset, changes, says):
    with pytest.raises(BadInput, match=None) as refused:
        preflight(config_with(dataset, **changes))
    assert says in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("model", ["bert", "vit"])
def test_bert_and_vit_refuse_reasoning_datasets(model):
    with pytest.raises(BadInput, match=f"dataset=phop does not suit model={model}"):
        preflight(config_with("phop", model=model))


def test_a_bad_value_exits_2_with_one_line_before_anything_is_written(tmp_path, cli):
    run_dir = tmp_path / "run"
    result = cli("dataset=phop", "dataset.hops=0", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["tyingrun: error: dataset.hops=0 must be a whole number at least 1"]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "summary.json").exists()
