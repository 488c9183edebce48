"""Embedding tying: the optimizer holds a tied matrix once and decays it once, untying copies, freezing by
config, and tied models under torch.compile."""

import json
import logging
import warnings

import pytest
import torch

from tyingrun.config import HardwareConfig, ModelConfig, TrainConfig, check_freeze
from tyingrun.errors import BadInput
from tyingrun.models.blocks import PreLNBlock
from tyingrun.train.freeze import freeze_tensors
from tyingrun.train.optim import build_optimizer, optimizer_parameters
from tyingrun.tying import counts

from .helpers import TINY_MODELS, lm_batch, run_folder, small_lm_config, tiny_gpt2

CPU = torch.device("cpu")


def optimizer_for(model, **train_keys):
    return build_optimizer(model, TrainConfig(**train_keys), HardwareConfig(), CPU)


def train_step(model, optimizer, seed=1):
    model.loss(lm_batch(seed=seed)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def same_storage(a, b):
    return counts.storage_key(a) == counts.storage_key(b)


@pytest.mark.parametrize("architecture", ["gpt2", "bert"])
def test_optimizer_holds_the_tied_matrix_once(architecture):
    model = TINY_MODELS[architecture][0]()
    model.stack.apply_map([0, 1, 0, 1])
    params = optimizer_parameters(optimizer_for(model))
    assert model.tokens.lm_head.weight is model.tokens.wte.weight
    assert len({counts.storage_key(p) for p in params}) == len(params)
    assert sum(p is model.tokens.wte.weight for p in params) == 1
    assert sum(p.numel() for p in params) == counts.trainable_params(model)
    untied = TINY_MODELS[architecture][0]()
    untied.tokens.untie()
    untied.stack.apply_map([0, 1, 0, 1])
    extra = sum(p.numel() for p in optimizer_parameters(optimizer_for(untied))) - sum(p.numel() for p in params)
    assert extra == model.tokens.wte.weight.numel()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_scales_every_matrix_exactly_once_per_step(tie, decay_embeddings):
    lr, weight_decay = 0.1, 0.5
    model = tiny_gpt2(tie=tie)
    optimizer = optimizer_for(model, lr=lr, weight_decay=weight_decay, decay_embeddings=decay_embeddings)
    before = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    for param in optimizer_parameters(optimizer):
        # With a zero gradient Adam's own update is exactly zero: only the decoupled decay moves a weight.
        param.grad = torch.zeros_like(param)
    optimizer.step()
    decayed, embedding = 1 - lr * weight_decay, (1 - lr * weight_decay) if decay_embeddings else 1.0
    factors = {
        "tokens.wte.weight": embedding, "wpe.weight": embedding,
        "tokens.lm_head.weight": embedding if tie else decayed,
        "stack.blocks.0.mlp.c_fc.weight": decayed, "stack.blocks.3.attn.c_attn.bias": 1.0, "ln_f.weight": 1.0,
    }
    after = dict(model.named_parameters(remove_duplicate=False))
    for name, factor in factors.items():
        assert torch.equal(after[name], before[name] * factor), name


def test_untie_starts_the_head_from_a_copy_that_then_trains_on_its_own():
    model = tiny_gpt2()
    embedding = model.tokens.wte.weight
    model.tokens.untie()
    head = model.tokens.lm_head.weight
    assert not model.tokens.tied and not same_storage(head, embedding) and torch.equal(head, embedding)
    optimizer = optimizer_for(model)
    assert any(p is head for p in optimizer_parameters(optimizer))
    train_step(model, optimizer)
    assert not torch.equal(model.tokens.lm_head.weight, model.tokens.wte.weight)


def test_freezing_the_embeddings_freezes_a_tied_head_with_them():
    model = tiny_gpt2()
    freeze_tensors(model, ["embeddings"])
    optimizer = optimizer_for(model)
    frozen = {"wte": model.tokens.wte.weight, "wpe": model.wpe.weight}
    before = {name: t.detach().clone() for name, t in frozen.items()}
    train_step(model, optimizer)
    assert not model.tokens.lm_head.weight.requires_grad
    for name, tensor in frozen.items():
        assert torch.equal(tensor, before[name]) and tensor.grad is None and tensor not in optimizer.state
    everything = tiny_gpt2()
    assert counts.trainable_params(model) == counts.trainable_params(everything) - sum(
        t.numel() for t in frozen.values())


def test_freezing_an_untied_head_leaves_the_embedding_training():
    model = tiny_gpt2(tie=False)
    freeze_tensors(model, ["head"])
    optimizer = optimizer_for(model)
    head, embedding = model.tokens.lm_head.weight.detach().clone(), model.tokens.wte.weight.detach().clone()
    train_step(model, optimizer)
    assert torch.equal(model.tokens.lm_head.weight, head)
    assert not torch.equal(model.tokens.wte.weight, embedding)


@pytest.mark.parametrize("keys, message", [
    ({"freeze": ["head"]}, "the head is tied"),
    ({"freeze": [4]}, "no layer 4"),
    ({"freeze": [-1]}, "no layer -1"),
    ({"freeze": ["wte"]}, "not a part"),
    ({"freeze": [True]}, "not a part"),
    ({"freeze": ["embeddings"], "name": "vit"}, "no token embedding"),
])
def test_freeze_lists_that_cannot_work_are_refused(keys, message):
    with pytest.raises(BadInput, match=message):
        check_freeze(ModelConfig(n_layer=4, **keys))


@pytest.mark.slow
def test_layers_frozen_by_config_stay_frozen_whatever_the_policy_decides(tmp_path):
    # policy=none makes every layer trainable; layer 2 and the embeddings must still never train.
    cfg = small_lm_config("none", model_keys={"freeze": [2, "embeddings"]})
    summary = run_folder(cfg, tmp_path)
    decisions = [json.loads(line) for line in (tmp_path / "maps.jsonl").read_text().splitlines()]
    assert [row["trainable"] for row in decisions] == [[True, True, False, True]]
    block = sum(p.numel() for p in PreLNBlock(64, 4, 0.0, True, causal=True).parameters())
    assert summary["trainable_params"] == 3 * block + 2 * 64  # three blocks and the final LayerNorm


@pytest.mark.compile
# Raised by torch's own modules as torch.compile imports them; nothing to do with tying.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_tied_model_compiles_once_per_distinct_map_without_tie_warnings(caplog):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt2(n_layer=2, d_model=16, vocab=32)
    compiled = torch.compile(model.loss)
    states = [([0, 1], [True, True]), ([0, 0], [True, True]), ([0, 1], [True, False]), ([0, 1], [True, True])]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for src, trainable in states:
            model.stack.apply_map(src, trainable)
            batch = lm_batch(vocab=32, length=8)
            grads = []
            for loss in (compiled, model.loss):
                model.zero_grad(set_to_none=True)
                value = loss(batch).loss
                value.backward()
                grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            assert [g is None for g in grads[0]] == [g is None for g in grads[1]]
            for a, b in zip(*grads, strict=True):
                assert a is None or torch.allclose(a, b, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3  # the last state was seen before: its graph is reused
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "tied" in m.lower() or "alias" in m.lower()]
