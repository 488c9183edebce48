"""train.tied_lr: the learning rate of a tensor that n layer slots use is lr, lr / n or lr / sqrt(n), on a stub
whose gradients are set by hand; the optimizer's groups follow the map and a resume finds them as saved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tyingrun.config import Config, HardwareConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.policies.looped import looped_map
from tyingrun.train.looped import prepare
from tyingrun.train.optim import build_optimizer, set_learning_rate, slots_using, sync_optimizer
from tyingrun.tying.stack import TiedStack
from tyingrun.tying.weights import storage_key

from .helpers import bad_input_line, tiny_gpt2

CPU = torch.device("cpu")
LR = 0.01
# Root 0 serves slots 0-3, root 4 only itself.
FOUR_AND_ONE = [0, 0, 0, 0, 4]


class LinearBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Stub(nn.Module):
    """An embedding table, a tied stack of five linear blocks and a per-model gain: everything but the stack is
    used once."""

    def __init__(self, grad_mode: str = "shared"):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(4, 3)
        self.stack = TiedStack([LinearBlock(3) for _ in range(5)], grad_mode=grad_mode)
        self.gain = nn.Parameter(torch.ones(3))


def optimizer_for(model: nn.Module, tied_lr: str) -> torch.optim.Optimizer:
    return build_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0, tied_lr=tied_lr), HardwareConfig(), CPU)


def stub(tied_lr: str, src=FOUR_AND_ONE, grad_mode: str = "shared"):
    model = Stub(grad_mode).double()
    optimizer = optimizer_for(model, tied_lr)
    model.stack.apply_map(src)
    sync_optimizer(optimizer, model)
    return model, optimizer


def step_with_gradients(model: Stub, optimizer: torch.optim.Optimizer, gradients: dict) -> dict:
    """One AdamW step at LR with each tensor's gradient set by hand (``gradients``: parameter -> value); returns
    how far each of those tensors moved, as its largest absolute change."""
    before = {param: param.detach().clone() for param in gradients}
    for param, value in gradients.items():
        param.grad = torch.full_like(param, value)
    set_learning_rate(optimizer, LR)
    optimizer.step()
    return {param: float((param.detach() - before[param]).abs().max()) for param in gradients}


def root_weight(model: Stub, slot: int) -> nn.Parameter:
    return model.stack.blocks[slot].proj.weight


def moves_of_the_two_roots(tied_lr: str):
    model, optimizer = stub(tied_lr)
    four, once = root_weight(model, 0), root_weight(model, 4)
    # Different sizes and signs: Adam's first step is lr * g / (|g| + eps), the same length for both.
    moved = step_with_gradients(model, optimizer, {four: 0.3, once: -2.0, model.gain: 5.0})
    return moved[four], moved[once], moved[model.gain]


@pytest.mark.parametrize("tied_lr, ratio", [("none", 1.0), ("linear", 0.25), ("sqrt", 0.5)])
def test_a_tensor_used_at_four_slots_steps_lr_over_n_or_sqrt_n(tied_lr, ratio):
    four, once, gain = moves_of_the_two_roots(tied_lr)
    assert once == pytest.approx(LR, rel=1e-6)
    assert gain == pytest.approx(LR, rel=1e-6)  # outside the stack: n = 1
    assert four / once == pytest.approx(ratio, rel=1e-6)


def test_slot_counts_follow_reads_and_count_tensors_outside_the_stack_once():
    model, optimizer = stub("linear")
    counts = slots_using(model)
    assert counts[storage_key(root_weight(model, 0))] == 4
    assert counts[storage_key(model.stack.blocks[0].proj.bias)] == 4
    assert counts[storage_key(root_weight(model, 4))] == 1
    assert storage_key(model.gain) not in counts and storage_key(model.tokens.weight) not in counts
    layout = [(len(group["params"]), group["slots"], group["lr_scale"], group["tied_lr"])
              for group in optimizer.param_groups]
    # matrices, embeddings and vectors at n = 1; then the 4-slot matrix and the 4-slot bias.
    assert layout == [(1, 1, 1.0, "linear"), (1, 1, 1.0, "linear"), (2, 1, 1.0, "linear"),
                      (1, 4, 0.25, "linear"), (1, 4, 0.25, "linear")]


def test_under_frozen_copy_a_root_counts_only_its_own_slot():
    model, optimizer = stub("linear", grad_mode="frozen_copy")
    assert not slots_using(model)
    assert [group["slots"] for group in optimizer.param_groups] == [1, 1, 1]


def test_none_keeps_the_plain_three_groups():
    model, optimizer = stub("none")
    plain = torch.optim.AdamW([{"params": [], "weight_decay": 0.0}], lr=LR)
    assert len(optimizer.param_groups) == 3
    for group in optimizer.param_groups:
        assert set(group) == set(plain.param_groups[0])
    assert [len(group["params"]) for group in optimizer.param_groups] == [2, 1, 3]


def test_partial_sharing_counts_the_shared_sublayer_only():
    model = tiny_gpt2(n_layer=4)
    model.stack.set_sharing("attention")
    model.stack.apply_map([0, 0, 0, 3])
    counts = slots_using(model)
    blocks = model.stack.blocks
    assert counts[storage_key(blocks[0].attn.c_attn.weight)] == 3
    assert counts[storage_key(blocks[3].attn.c_attn.weight)] == 1
    assert counts[storage_key(blocks[1].mlp.c_fc.weight)] == 1  # a tied slot's own MLP
    optimizer = build_optimizer(model, TrainConfig(tied_lr="sqrt"), HardwareConfig(), CPU)
    scaled = [group for group in optimizer.param_groups if group["slots"] == 3]
    assert [group["lr_scale"] for group in scaled] == [pytest.approx(1 / math.sqrt(3))] * 2
    attention = {id(param) for param in blocks[0].attn.parameters()}
    assert {id(param) for group in scaled for param in group["params"]} == attention


def test_a_looped_core_learns_at_lr_over_its_loops_and_the_loops_own_tensors_at_lr():
    cfg = Config(model=ModelConfig(n_layer=5, d_model=32, n_head=2),
                 policy=PolicyConfig(name="looped", prelude=1, core=1, coda=1, loops=3, inject="concat",
                                     loop_params="scale"),
                 train=TrainConfig(tied_lr="linear"))
    model = tiny_gpt2(n_layer=5)
    prepare(model.stack, cfg)
    model.stack.apply_map(looped_map(cfg.policy))
    optimizer = build_optimizer(model, cfg.train, HardwareConfig(), CPU)
    scale_of = {id(param): group["lr_scale"] for group in optimizer.param_groups for param in group["params"]}
    blocks, looping = model.stack.blocks, model.stack.looping
    assert {scale_of[id(param)] for param in blocks[1].parameters()} == {1 / 3}
    for part in (blocks[0], blocks[4], looping, model.tokens):
        assert {scale_of[id(param)] for param in part.parameters()} == {1.0}


def test_groups_follow_a_map_change_and_tensors_keep_their_adam_state():
    model, optimizer = stub("linear")
    four, once = root_weight(model, 0), root_weight(model, 4)
    step_with_gradients(model, optimizer, {four: 0.3, once: -2.0})
    saved = {param: {key: value.clone() for key, value in optimizer.state[param].items()} for param in (four, once)}
    # Slot 2 unties and takes slot 3 along: root 0 now serves two slots, root 2 two, root 4 one.
    model.stack.apply_map([0, 0, 2, 2, 4])
    sync_optimizer(optimizer, model)
    group_of = {param: group for group in optimizer.param_groups for param in group["params"]}
    assert (group_of[four]["slots"], group_of[four]["lr_scale"]) == (2, 0.5)
    assert group_of[root_weight(model, 2)] is group_of[four]
    assert (group_of[once]["slots"], group_of[once]["lr_scale"]) == (1, 1.0)
    for param in (four, once):
        assert all(torch.equal(optimizer.state[param][key], value) for key, value in saved[param].items())
    assert root_weight(model, 2) not in optimizer.state  # a new tensor starts afresh
    # The next step: root 0 at lr / 2 and the untied root 2, at its first step, lr / 2 as well.
    fresh = root_weight(model, 2)
    moved = step_with_gradients(model, optimizer, {fresh: 1.0, once: -2.0})
    assert moved[fresh] / moved[once] == pytest.approx(0.5, rel=1e-6)


def test_a_resumed_optimizer_finds_its_groups_and_state():
    model, optimizer = stub("linear", src=[0, 0, 2, 2, 0])
    step_with_gradients(model, optimizer, {root_weight(model, 0): 0.3, root_weight(model, 2): -2.0})
    saved = optimizer.state_dict()
    # What Trainer.restore does: a fresh model and optimizer, the checkpoint's map, then the optimizer state.
    resumed, resumed_optimizer = stub("linear", src=[0, 0, 2, 2, 0])
    resumed_optimizer.load_state_dict(saved)
    assert resumed_optimizer.state_dict()["param_groups"] == saved["param_groups"]
    assert [group["slots"] for group in saved["param_groups"]] == [1, 1, 1, 2, 3, 2, 3]
    restored = resumed_optimizer.state[root_weight(resumed, 0)]
    assert torch.equal(restored["exp_avg"], optimizer.state[root_weight(model, 0)]["exp_avg"])


def test_tied_lr_under_frozen_copy_is_refused_before_anything_is_built(tmp_path):
    line = bad_input_line(["policy=cyclic", "policy.grad=frozen_copy", "train.tied_lr=sqrt"], tmp_path / "run")
    assert "train.tied_lr=sqrt" in line and "policy.grad=frozen_copy" in line
    assert "set policy.grad=shared or train.tied_lr=none" in line
