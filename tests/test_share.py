"""policy.share=attention|mlp, proven with real tensors: which tensors alias, gradients against an untied reference,
counts, training-state bytes, checkpoints, init_from, Hugging Face export, and training FLOPs per token."""

import copy

import pytest
import torch

from tyingrun.config import HardwareConfig, TrainConfig
from tyingrun.train.checkpoint import save_checkpoint
from tyingrun.train.init_from import init_from
from tyingrun.train.optim import build_optimizer, optimizer_parameters, sync_optimizer
from tyingrun.tying import counts, maps
from tyingrun.tying.flops import train_flops_per_token
from tyingrun.tying.stack import shared_names
from tyingrun.tying.weights import read_tensors, unique_weights

from .helpers import TINY_MODELS, counted_flops_per_token, lm_batch, tiny_gpt2

CPU = torch.device("cpu")
PART = {"attention": "attn.", "mlp": "mlp."}
OTHER = {"attention": "mlp.", "mlp": "attn."}
NORM = {"attention": "ln_1.", "mlp": "ln_2."}


def shared_model(share, grad_mode="shared", src=(0, 1, 0, 1), share_norms=False, make=tiny_gpt2, **keys):
    model = make(grad_mode=grad_mode, **keys)
    model.stack.set_sharing(share, share_norms)
    model.stack.apply_map(list(src))
    return model


def params(model, slot):
    return dict(model.stack.blocks[slot].named_parameters())


def same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def optimizer_for(model):
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2), HardwareConfig(), CPU)
    sync_optimizer(optimizer, model)
    return optimizer


def train_step(model, optimizer, make_batch=lm_batch, seed=1):
    model.loss(make_batch(seed=seed)).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("architecture", TINY_MODELS)
@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_exactly_the_shared_sublayer_aliases_the_root(share, grad_mode, architecture):
    make_model, make_batch = TINY_MODELS[architecture]
    model = shared_model(share, grad_mode, make=make_model)
    optimizer = optimizer_for(model)
    train_step(model, optimizer, make_batch)
    model.loss(make_batch(seed=2)).loss.backward()
    optimized = {id(p) for p in optimizer_parameters(optimizer)}
    for slot, root in [(2, 0), (3, 1)]:
        mine, roots = params(model, slot), params(model, root)
        assert {n for n in mine if same_storage(mine[n], roots[n])} == {n for n in mine if n.startswith(PART[share])}
        for name, param in mine.items():
            if name.startswith(PART[share]):
                # shared: the root's Parameter itself (gradients of both positions land in it); frozen_copy: an alias
                # that passes no gradient.
                assert (param is roots[name]) == (grad_mode == "shared")
                assert param.requires_grad == (grad_mode == "shared")
                assert roots[name].grad is not None and roots[name] in optimizer.state
            else:
                assert not same_storage(param, roots[name]), name
                assert param.requires_grad and param.grad is not None
                assert param in optimizer.state and id(param) in optimized
    assert model.stack.effective_trainable == [True] * 4


def test_share_norms_adds_the_sublayers_norm_and_block_is_everything():
    block = tiny_gpt2().stack.blocks[0]
    every = {n for n, _ in block.named_parameters()}
    assert shared_names(block, "block") == every
    for share in ("attention", "mlp"):
        assert shared_names(block, share) == {n for n in every if n.startswith(PART[share])}
        assert shared_names(block, share, True) == {n for n in every if n.startswith((PART[share], NORM[share]))}


def untied_reference(model, src):
    """Every slot independent, holding what it computes with: the root's tensors where shared, its own elsewhere."""
    reference = copy.deepcopy(model)
    reference.stack.set_sharing("block")
    reference.stack.apply_map(maps.identity(len(src)))
    for slot in range(len(src)):
        for name, source in model.stack.reads(slot).items():
            params(reference, slot)[name].data.copy_(params(model, source)[name].detach())
    return reference


def grads(model, slot):
    return {name: p.grad for name, p in params(model, slot).items()}


@pytest.mark.parametrize("share", ["attention", "mlp"])
@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
def test_gradients_match_an_untied_reference(share, grad_mode):
    src = [0, 1, 0, 1]
    model = shared_model(share, grad_mode, src)
    with torch.no_grad():  # own tensors of tied slots differ from their roots', so a misrouted tensor shows
        for slot in (2, 3):
            for name, param in params(model, slot).items():
                if not name.startswith(PART[share]):
                    param.add_(0.05 * torch.randn_like(param))
    reference = untied_reference(model, src)
    ids = lm_batch()["input_ids"]
    torch.testing.assert_close(model(ids), reference(ids))
    model.loss(lm_batch(seed=3)).loss.backward()
    reference.loss(lm_batch(seed=3)).loss.backward()
    close = dict(rtol=1e-5, atol=1e-7)
    for root, tied in [(0, 2), (1, 3)]:
        for name, grad in grads(model, root).items():
            expected = grads(reference, root)[name]
            if name.startswith(PART[share]) and grad_mode == "shared":
                expected = expected + grads(reference, tied)[name]
            torch.testing.assert_close(grad, expected, **close)
        for name, grad in grads(model, tied).items():
            if name.startswith(PART[share]):
                if grad_mode == "frozen_copy":
                    assert grad is None
            else:
                torch.testing.assert_close(grad, grads(reference, tied)[name], **close)
    torch.testing.assert_close(model.wpe.weight.grad, reference.wpe.weight.grad, **close)


@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_counts_and_train_state_bytes_equal_a_hand_computation(share, grad_mode):
    model = shared_model(share, grad_mode, [0, 0, 0, 3])
    block = params(model, 0)
    shared = sum(p.numel() for n, p in block.items() if n.startswith(PART[share]))
    per_block = sum(p.numel() for p in block.values())
    outside = sum(p.numel() for p in model.tokens.parameters()) + model.wpe.weight.numel()
    outside += sum(p.numel() for p in model.ln_f.parameters())
    expected = outside + 4 * per_block - 2 * shared  # slots 1 and 2 store all but the shared sublayer
    assert counts.stored_params(model) == counts.trainable_params(model) == expected
    assert counts.total_params(model) == outside + 4 * per_block
    optimizer = optimizer_for(model)
    train_step(model, optimizer)
    assert sum(p.numel() for p in optimizer_parameters(optimizer)) == expected
    # fp32 weights, gradients and AdamW's two moments, plus its 4-byte step counter per tensor
    tensors = len(optimizer_parameters(optimizer))
    assert counts.train_state_bytes(model, optimizer) == 4 * 4 * expected + 4 * tensors


@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_untying_and_retying_keep_the_slots_own_part(share, grad_mode):
    model = shared_model(share, grad_mode, [0, 1, 2, 3])
    optimizer = optimizer_for(model)
    own = {n: p for n, p in params(model, 2).items() if not n.startswith(PART[share])}
    model.stack.apply_map([0, 1, 0, 1])
    sync_optimizer(optimizer, model)
    train_step(model, optimizer)
    for name, param in own.items():
        assert params(model, 2)[name] is param and param in optimizer.state  # kept, and its state with it
    computing_with = {n: p.detach().clone() for n, p in params(model, 0).items()}
    model.stack.apply_map([0, 1, 2, 1])
    sync_optimizer(optimizer, model)
    for name, param in params(model, 2).items():
        if name.startswith(PART[share]):
            assert torch.equal(param, computing_with[name]) and not same_storage(param, params(model, 0)[name])
            assert param.requires_grad and param not in optimizer.state
        else:
            assert param is own[name] and param in optimizer.state


@pytest.mark.parametrize("grad_mode", ["shared", "frozen_copy"])
@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_checkpoint_stores_each_storage_once_and_reloads_the_same_aliasing(tmp_path, share, grad_mode):
    original = shared_model(share, grad_mode, maps.cyclic(4, 2))
    state = {"map": list(original.stack.src), "trainable": list(original.stack.trainable),
             "sharing": original.stack.sharing}
    checkpoint = save_checkpoint(tmp_path, 3, unique_weights(original), state, keep=1)
    stored = read_tensors(checkpoint / "model.safetensors")
    assert sum(t.numel() for t in stored.values()) == counts.stored_params(original)
    assert not any(name.startswith(f"stack.blocks.2.{PART[share]}") for name in stored)
    assert any(name.startswith(f"stack.blocks.2.{OTHER[share]}") for name in stored)
    for target_share in (share, "block"):
        loaded = tiny_gpt2(grad_mode=grad_mode, seed=1)
        loaded.stack.set_sharing(target_share)
        init_from(loaded, checkpoint)
        assert loaded.stack.share == target_share
        ids = lm_batch()["input_ids"]
        if target_share == share:
            assert sharing_of(loaded) == sharing_of(original)
            assert torch.equal(loaded(ids), original(ids))
        else:  # back to whole blocks: tied slots now compute with their roots' everything
            assert counts.stored_params(loaded) < counts.stored_params(original)


def sharing_of(model):
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(counts.storage_key(param), []).append(name)
    return sorted(groups.values())


@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_set_sharing_keeps_what_every_slot_computes(share):
    model = tiny_gpt2()
    model.stack.apply_map([0, 0, 2, 2])
    ids = lm_batch()["input_ids"]
    before = model(ids)
    model.stack.set_sharing(share)
    assert model.stack.src == [0, 0, 2, 2]
    torch.testing.assert_close(model(ids), before)
    assert not same_storage(params(model, 1)[f"{OTHER[share]}c_fc.weight" if share == "attention"
                                              else "attn.c_attn.weight"],
                            params(model, 0)[f"{OTHER[share]}c_fc.weight" if share == "attention"
                                             else "attn.c_attn.weight"])


@pytest.mark.parametrize("share", ["attention", "mlp"])
def test_hugging_face_export_reloads_with_equal_logits(tmp_path, share):
    transformers = pytest.importorskip("transformers")
    from tyingrun.models.hf_gpt2 import to_hf

    model = shared_model(share, "shared", maps.cyclic(4, 2))
    with torch.no_grad():
        for param in counts.unique_parameters(model.parameters()).values():
            param.add_(0.05 * torch.randn_like(param))
    to_hf(model, tmp_path)
    hf, loading = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model.eval()(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy, share, grad_mode", [
    ("none", "block", "shared"), ("cyclic", "block", "shared"), ("cyclic", "attention", "shared"),
    ("cyclic", "mlp", "frozen_copy"), ("cyclic", "block", "frozen_copy"),
])
def test_train_flops_per_token_agrees_with_a_counted_step(policy, share, grad_mode):
    src = maps.identity(4) if policy == "none" else maps.cyclic(4, 2)
    model = shared_model(share, grad_mode, src, vocab=256, d_model=64)
    counted = counted_flops_per_token(model, vocab=256)
    assert abs(train_flops_per_token(model, 32, batch_size=2) - counted) <= 0.10 * counted


def test_a_looped_block_costs_as_much_as_independent_ones():
    looped = shared_model("block", "shared", maps.sequential(4, 1))
    assert train_flops_per_token(looped, 16, 4) == train_flops_per_token(tiny_gpt2(), 16, 4)
    assert train_flops_per_token(tiny_gpt2(n_layer=2), 16, 4) < train_flops_per_token(looped, 16, 4)


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory, data_cache):
    """A finished GPT-2 run with cyclic ties that share attention only, with its checkpoint."""
    from .helpers import run_folder, small_lm_config

    folder = tmp_path_factory.mktemp("attention-run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        summary = run_folder(small_lm_config(policy_keys={"share": "attention"}), folder)
    return folder, summary


@pytest.mark.slow
def test_a_run_reports_unique_blocks_flops_and_its_sharing(attention_run, capsys):
    import json

    from tyingrun.inspect_run import load_run, main, storage_rows
    from tyingrun.report import write_report

    folder, summary = attention_run
    assert summary["unique_blocks"] == 2 and summary["final_map"] == [0, 1, 0, 1]
    _, _, model, optimizer = load_run(folder)
    assert summary["train_flops_per_token"] == train_flops_per_token(model, 64, batch_size=8)
    assert model.stack.share == "attention"
    rows = storage_rows(model, optimizer)
    assert sum(row["weights"] + row["grads"] + row["optimizer"] for row in rows) == summary["train_state_bytes"]
    assert rows[2]["own_params"] == rows[0]["own_params"] - sum(
        p.numel() for n, p in params(model, 0).items() if n.startswith("attn."))
    main([str(folder)])
    out = capsys.readouterr().out
    assert "final map [0, 1, 0, 1]" in out and "share attention" in out
    assert f"train_state_bytes {summary['train_state_bytes']:,}" in out

    write_report([folder], folder / "report")
    sharing = json.loads((folder / "sharing.json").read_text())
    assert sharing["share"] == "attention"
    for slot in sharing["slots"]:
        for tensor, source in slot["reads"].items():
            expected = slot["root"] if tensor.startswith("attn.") else slot["slot"]
            assert source == expected, (slot["slot"], tensor)
    report = (folder / "report" / "report.md").read_text()
    assert "2←0: attn" in report and (folder / "report" / "quality_vs_flops.png").is_file()


def test_inspect_of_a_folder_that_is_not_a_run_exits_2_with_one_line(tmp_path, capsys):
    from tyingrun.inspect_run import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tyingrun-inspect: error: ") and "not a tyingrun run folder" in err[0]
