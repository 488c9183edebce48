"""The tied layer stack, proven with real tensors: storage, gradients, optimizer state and counts."""

import copy

import pytest
import torch

from tyingrun.config import HardwareConfig, TrainConfig
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.tying import counts, maps
from tyingrun.tying.stack import SlotStorage

from .helpers import TINY_MODELS, lm_batch, tiny_gpt2

CPU = torch.device("cpu")


def optimizer_for(model, weight_decay=0.1):
    return build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=weight_decay), HardwareConfig(), CPU)


def train_step(model, optimizer, seed=1, make_batch=lm_batch):
    loss = model.loss(make_batch(seed=seed)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def block_params(model, slot):
    return dict(model.stack.blocks[slot].named_parameters())


def grads_of(model, slot):
    return {name: p.grad.clone() for name, p in block_params(model, slot).items()}


@pytest.mark.parametrize("architecture", TINY_MODELS)
@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
def test_tied_slot_aliases_root_and_holds_no_grad_or_optimizer_state(grad_mode, architecture):
    make_model, make_batch = TINY_MODELS[architecture]
    model = make_model(grad_mode=grad_mode)
    optimizer = optimizer_for(model)
    model.stack.apply_map([0, 1, 0, 1])
    sync_optimizer(optimizer, model)
    train_step(model, optimizer, make_batch=make_batch)
    loss = model.loss(make_batch(seed=2)).loss
    loss.backward()
    optimized = {id(p) for p in optimizer_parameters(optimizer)}
    for slot, root in [(2, 0), (3, 1)]:
        for name, param in block_params(model, slot).items():
            root_param = block_params(model, root)[name]
            assert param.data_ptr() == root_param.data_ptr()
            assert param.untyped_storage().data_ptr() == root_param.untyped_storage().data_ptr()
            assert param is not root_param
            assert not param.requires_grad and param.grad is None
            assert param not in optimizer.state and id(param) not in optimized
            assert root_param.grad is not None and root_param in optimizer.state


def test_tied_slot_reads_the_roots_updated_weights():
    model = tiny_gpt2()
    optimizer = optimizer_for(model)
    model.stack.apply_map([0, 0, 2, 2])
    sync_optimizer(optimizer, model)
    before = block_params(model, 1)["mlp.c_fc.weight"].clone()
    train_step(model, optimizer)
    after = block_params(model, 1)["mlp.c_fc.weight"]
    assert not torch.equal(before, after)
    assert torch.equal(after, block_params(model, 0)["mlp.c_fc.weight"])


def untied_reference(model, src):
    """The same weights with every slot independent: slot i holds a copy of its root's weights."""
    reference = copy.deepcopy(model)
    reference.stack.apply_map(maps.identity(len(src)))
    for slot, root in enumerate(src):
        for name, param in block_params(reference, slot).items():
            param.data.copy_(block_params(model, root)[name].detach())
    return reference


def backward(model):
    loss = model.loss(lm_batch(seed=3)).loss
    loss.backward()


def test_frozen_copy_root_learns_from_its_own_position_only():
    src = [0, 1, 0, 1]
    model = tiny_gpt2(grad_mode="frozen_copy")
    model.stack.apply_map(src)
    reference = untied_reference(model, src)
    backward(model)
    backward(reference)
    for root in (0, 1):
        for name, grad in grads_of(model, root).items():
            torch.testing.assert_close(grad, grads_of(reference, root)[name], rtol=1e-5, atol=1e-7)
    # The gradient still flows through the tied slots into the embeddings below them.
    torch.testing.assert_close(model.tokens.wte.weight.grad, reference.tokens.wte.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.wpe.weight.grad, reference.wpe.weight.grad, rtol=1e-5, atol=1e-7)


def test_shared_root_gradient_is_the_sum_over_its_positions():
    src = [0, 1, 0, 1]
    model = tiny_gpt2(grad_mode="shared")
    model.stack.apply_map(src)
    reference = untied_reference(model, src)
    backward(model)
    backward(reference)
    for root, tied in [(0, 2), (1, 3)]:
        for name, grad in grads_of(model, root).items():
            expected = grads_of(reference, root)[name] + grads_of(reference, tied)[name]
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.wpe.weight.grad, reference.wpe.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
def test_tied_and_untied_models_compute_the_same_outputs(grad_mode):
    src = [0, 0, 2, 0]
    model = tiny_gpt2(grad_mode=grad_mode)
    model.stack.apply_map(src)
    reference = untied_reference(model, src)
    ids = lm_batch()["input_ids"]
    torch.testing.assert_close(model(ids), reference(ids))


def test_untying_copies_values_then_both_evolve_independently():
    model = tiny_gpt2()
    optimizer = optimizer_for(model)
    model.stack.apply_map([0, 0, 2, 3])
    sync_optimizer(optimizer, model)
    train_step(model, optimizer)
    computing_with = {n: p.detach().clone() for n, p in block_params(model, 0).items()}
    untouched = {slot: {n: p.detach().clone() for n, p in block_params(model, slot).items()} for slot in (0, 2, 3)}

    model.stack.apply_map([0, 1, 2, 3])
    sync_optimizer(optimizer, model)
    for name, param in block_params(model, 1).items():
        assert torch.equal(param, computing_with[name])
        assert param.untyped_storage().data_ptr() != block_params(model, 0)[name].untyped_storage().data_ptr()
        assert param.requires_grad and param not in optimizer.state
    for slot, values in untouched.items():
        for name, param in block_params(model, slot).items():
            assert torch.equal(param, values[name])

    train_step(model, optimizer, seed=5)
    for name, param in block_params(model, 1).items():
        assert param in optimizer.state
        if param.dim() >= 2:
            assert not torch.equal(param, block_params(model, 0)[name])


def test_re_tying_a_root_moves_its_dependents():
    model = tiny_gpt2()
    blocks = model.stack.blocks
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    model.stack.apply_map([0, 1, 1, 3])
    model.stack.apply_map(maps.assign(model.stack.src, 1, 0))
    for slot in (1, 2):
        for name, param in block_params(model, slot).items():
            assert param.data_ptr() == block_params(model, 0)[name].data_ptr()
            assert param.untyped_storage().data_ptr() == block_params(model, 0)[name].untyped_storage().data_ptr()
    with torch.no_grad():
        before = [block(x) for block in blocks]
        for param in blocks[0].parameters():
            param.add_(0.1)
        after = [block(x) for block in blocks]
    # Slot 1 gave up its own weights and slot 2 followed it: both now compute what slot 0 computes, before and
    # after slot 0 is written; slot 3 stays independent and does not change.
    for slot in (1, 2):
        assert torch.equal(before[slot], before[0]) and torch.equal(after[slot], after[0])
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[3], before[3]) and not torch.allclose(before[3], before[0])


class LoggedStorage(SlotStorage):
    """The default storage, recording what it is asked; a released tensor's values are gone at once (NaN), as the
    sharded storage of hardware=fsdp frees them."""

    def __init__(self):
        self.calls = []

    def own_copy(self, slot, name, shared):
        self.calls.append(("own_copy", slot))
        return super().own_copy(slot, name, shared)

    def release(self, slot, name, own):
        self.calls.append(("release", slot))
        with torch.no_grad():
            own.fill_(float("nan"))


def test_a_slot_that_unties_copies_its_root_before_that_root_ties_in_the_same_change():
    model = tiny_gpt2()
    model.stack.apply_map([0, 1, 1, 3])
    computing_with = {n: p.detach().clone() for n, p in block_params(model, 1).items()}
    model.stack.storage = LoggedStorage()
    model.stack.apply_map([0, 0, 2, 3])  # slot 2 leaves root 1, which ties to 0 in the same change
    calls = model.stack.storage.calls
    assert {call[0] for call in calls[:len(calls) // 2]} == {"own_copy"} and calls[-1] == ("release", 1)
    for name, param in block_params(model, 2).items():
        assert torch.equal(param, computing_with[name])


def test_frozen_layer_keeps_its_weights_and_holds_no_grad_or_state():
    model = tiny_gpt2()
    optimizer = optimizer_for(model)
    model.stack.apply_map(maps.identity(4), [True, False, True, True])
    sync_optimizer(optimizer, model)
    frozen = {n: p.detach().clone() for n, p in block_params(model, 1).items()}
    train_step(model, optimizer)
    for name, param in block_params(model, 1).items():
        assert torch.equal(param, frozen[name])
        assert param.grad is None and param not in optimizer.state
    assert model.stack.trainable_layers == 3 and model.stack.independent_layers == 4


def test_optimizer_state_released_on_tying_and_fresh_on_untying():
    model = tiny_gpt2()
    optimizer = optimizer_for(model)
    train_step(model, optimizer)
    old = list(block_params(model, 2).values())
    assert all(p in optimizer.state for p in old)
    model.stack.apply_map([0, 1, 0, 3])
    sync_optimizer(optimizer, model)
    assert not any(p in optimizer.state for p in old)
    assert {id(p) for p in optimizer_parameters(optimizer)} == {id(p) for p in counts.trainable_parameters(model)}
    model.stack.apply_map(maps.identity(4))
    sync_optimizer(optimizer, model)
    assert not any(p in optimizer.state for p in block_params(model, 2).values())


def test_cyclic_counts_equal_optimizer_and_none_minus_two_blocks():
    untied = tiny_gpt2()
    tied = tiny_gpt2()
    tied.stack.apply_map(maps.cyclic(4, 2))
    optimizer = optimizer_for(tied)
    block = sum(p.numel() for p in untied.stack.blocks[0].parameters())
    assert counts.trainable_params(tied) == counts.trainable_params(untied) - 2 * block
    assert counts.trainable_params(tied) == sum(p.numel() for p in optimizer_parameters(optimizer))
    assert counts.stored_params(tied) == counts.stored_params(untied) - 2 * block
    assert counts.total_params(tied) == counts.total_params(untied) == counts.stored_params(untied)
    assert tied.stack.independent_layers == 2 and tied.stack.trainable_layers == 2


def test_tied_embedding_counted_once():
    model = tiny_gpt2()
    assert model.tokens.lm_head.weight is model.tokens.wte.weight
    every_tensor = sum(p.numel() for p in model.parameters())
    assert counts.stored_params(model) == every_tensor


def test_train_state_bytes_near_physical_limit_with_a_quarter_independent():
    model = tiny_gpt2(n_layer=8, d_model=64, vocab=256)
    model.stack.apply_map([0, 0, 0, 0, 4, 4, 4, 4])
    optimizer = optimizer_for(model)
    train_step(model, optimizer)
    physical = sum(p.numel() for p in model.tokens.parameters()) + model.wpe.weight.numel()
    physical += sum(p.numel() for p in model.ln_f.parameters())
    physical += sum(p.numel() for slot in (0, 4) for p in model.stack.blocks[slot].parameters())
    limit = 4 * 4 * physical  # fp32 weights, gradients and AdamW's two moments
    measured = counts.train_state_bytes(model, optimizer)
    assert limit <= measured <= 1.05 * limit


def test_moving_the_model_keeps_the_ties():
    model = tiny_gpt2()
    model.stack.apply_map([0, 0, 2, 2])
    model.double()
    for name, param in block_params(model, 1).items():
        assert param.dtype == torch.float64
        assert param.data_ptr() == block_params(model, 0)[name].data_ptr()
    assert counts.stored_params(model) == counts.stored_params(tiny_gpt2()) - 2 * sum(
        p.numel() for p in model.stack.blocks[0].parameters()
    )
