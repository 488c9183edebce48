"""Checkpoints keep ties: tied tensors are stored once, loading restores them as shared storage, untying after
train.init_from copies, and nothing is ever unpickled."""

import json
import pickle

import pytest
import torch

from tyingrun.errors import BadInput
from tyingrun.train.checkpoint import save_checkpoint
from tyingrun.train.init_from import init_from, init_source
from tyingrun.tying import counts, maps
from tyingrun.tying.weights import unique_weights

from .helpers import lm_batch, run_folder, small_lm_config, tiny_gpt2


def saved(model, run_dir):
    state = {"map": list(model.stack.src), "trainable": list(model.stack.trainable)}
    return save_checkpoint(run_dir, 7, unique_weights(model), state, keep=1)


def sharing(model):
    """Parameter names grouped by the storage they use."""
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(counts.storage_key(param), []).append(name)
    return sorted(groups.values())


def test_checkpoint_of_a_tied_model_holds_each_storage_once(tmp_path):
    # Large enough that the safetensors header (about 100 bytes a tensor) is far below 1%.
    model = tiny_gpt2(d_model=128, vocab=512)
    model.stack.apply_map(maps.cyclic(4, 2))
    unique_bytes = sum(p.numel() * p.element_size() for p in counts.unique_parameters(model.parameters()).values())
    size = (saved(model, tmp_path) / "model.safetensors").stat().st_size
    assert unique_bytes <= size <= 1.01 * unique_bytes
    every_slot_bytes = 4 * counts.total_params(model)
    assert size < 0.75 * every_slot_bytes


@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
def test_init_from_a_checkpoint_restores_ties_as_shared_storage(tmp_path, grad_mode):
    original = tiny_gpt2(grad_mode=grad_mode, seed=0)
    original.stack.apply_map([0, 1, 0, 1], [True, False, True, True])
    loaded = tiny_gpt2(grad_mode=grad_mode, seed=1)
    init_from(loaded, saved(original, tmp_path))
    assert loaded.stack.src == original.stack.src and loaded.stack.trainable == original.stack.trainable
    assert sharing(loaded) == sharing(original)
    assert loaded.tokens.lm_head.weight is loaded.tokens.wte.weight
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    batch = lm_batch()
    assert torch.equal(loaded(batch["input_ids"]), original(batch["input_ids"]))


def test_untying_after_init_from_gives_separate_storage_with_equal_values(tmp_path):
    original = tiny_gpt2()
    original.stack.apply_map(maps.cyclic(4, 2))
    loaded = tiny_gpt2(tie=False, seed=1)
    init_from(loaded, saved(original, tmp_path))
    head, embedding = loaded.tokens.lm_head.weight, loaded.tokens.wte.weight
    assert counts.storage_key(head) != counts.storage_key(embedding)
    assert torch.equal(head, original.tokens.wte.weight) and torch.equal(embedding, original.tokens.wte.weight)
    loaded.stack.apply_map(maps.identity(4))
    for slot, root in [(2, 0), (3, 1)]:
        for (name, param), root_param in zip(loaded.stack.blocks[slot].named_parameters(),
                                             loaded.stack.blocks[root].parameters(), strict=True):
            assert counts.storage_key(param) != counts.storage_key(root_param), name
            assert torch.equal(param, root_param), name


def test_an_untied_checkpoint_cannot_start_a_tied_model(tmp_path):
    checkpoint = saved(tiny_gpt2(tie=False), tmp_path)
    with pytest.raises(BadInput, match="tokens.lm_head.weight apart from tokens.wte.weight.*cannot be merged"):
        init_from(tiny_gpt2(), checkpoint)


def test_checkpoints_are_safetensors_and_json_and_load_without_unpickling(tmp_path, monkeypatch):
    checkpoint = saved(tiny_gpt2(), tmp_path)
    assert {path.suffix for path in checkpoint.iterdir()} == {".safetensors", ".json"}

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    init_from(tiny_gpt2(seed=1), checkpoint)


def test_init_source_names_what_it_cannot_start_from(tmp_path):
    with pytest.raises(BadInput, match="neither a tyingrun run or checkpoint folder nor a Hugging Face"):
        init_source(str(tmp_path / "nowhere"))
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(BadInput, match="run folder without checkpoints"):
        init_source(str(tmp_path / "run"))


@pytest.mark.slow
def test_a_run_started_from_a_finished_run_continues_from_its_weights(tmp_path, cyclic_gpt2_run):
    # Untied head and no layer tying: every copy starts from the finished run's values, so the first
    # evaluation (of the whole val split, as the final one is) repeats the finished run's last one.
    cfg = small_lm_config("none", max_steps=2, model_keys={"tie_embeddings": False, "freeze": ["head"]},
                          train_keys={"init_from": str(cyclic_gpt2_run), "eval_batches": "all"})
    run_folder(cfg, tmp_path)
    first_eval = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    finished = json.loads((cyclic_gpt2_run / "summary.json").read_text())
    assert first_eval["step"] == 0
    assert first_eval["val_loss"] == pytest.approx(finished["val_loss"], abs=1e-5)
