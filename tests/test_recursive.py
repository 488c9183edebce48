"""policy=recursive (Relaxed Recursive Transformers), with real tensors: exact conversion at full rank, strict tying
at rank 0, the layers each init picks, LoRA gradients and optimizer state, export to transformers, and the one-line
refusals."""

import copy
import json

import pytest
import torch

from tyingrun.config import HardwareConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.errors import BadInput
from tyingrun.models.hf_gpt2 import to_hf
from tyingrun.preflight import preflight
from tyingrun.train import recursive
from tyingrun.train.optim import build_optimizer, sync_optimizer
from tyingrun.tying import counts
from tyingrun.tying.flops import train_flops_per_token

from .helpers import bad_input_line, counted_flops_per_token, lm_batch, small_lm_config, tiny_gpt2

CPU = torch.device("cpu")
N_LAYER, WIDTH = 6, 32
PATTERNS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
INITS = ("stepwise", "average", "lower", "upper", "random")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 6-layer GPT-2 with every weight off its init, saved as a Hugging Face folder."""
    model = tiny_gpt2(n_layer=N_LAYER, d_model=WIDTH, seed=5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("source")
    to_hf(model, folder)
    return model.eval(), folder


def converted(folder, grad="shared", **keys):
    cfg = PolicyConfig(name="recursive", **{"n_sets": 2, **keys}, grad=grad)
    model = tiny_gpt2(n_layer=N_LAYER, d_model=WIDTH, seed=9, grad_mode=grad)
    model.stack.set_sharing(*recursive.stack_sharing(cfg))
    recursive.prepare(model, cfg)
    info, _ = recursive.convert(model, folder, cfg)
    return model.eval(), info


def logits(model, seed=1):
    with torch.no_grad():
        return model(lm_batch(seed=seed)["input_ids"])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("init", INITS)
def test_at_full_rank_the_converted_model_computes_the_source(source, pattern, init):
    model, folder = source
    ours, info = converted(folder, pattern=pattern, init=init, lora_rank=WIDTH)
    assert model.stack.src != ours.stack.src and info["init"] == init and info["lora_rank"] == WIDTH
    assert (logits(ours) - logits(model)).abs().max() <= 1e-4


@pytest.mark.parametrize("pattern", PATTERNS)
def test_at_rank_0_it_is_strict_tying(source, pattern):
    _, folder = source
    ours, _ = converted(folder, pattern=pattern, lora_rank=0)
    assert not ours.stack.has_lora and not any("lora" in name for name in ours.state_dict())
    for slot, root in enumerate(ours.stack.src):
        for (name, a), b in zip(ours.stack.blocks[slot].named_parameters(),
                                ours.stack.blocks[root].parameters(), strict=True):
            assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), (slot, name)
    untied = tiny_gpt2(n_layer=N_LAYER, d_model=WIDTH)
    assert counts.stored_params(ours) < counts.stored_params(untied)


# For 6 layers and 2 sets: {root: layers} of stepwise and of average.
PICKS = {
    "cycle": ({0: [0], 1: [3]}, {0: [0, 2, 4], 1: [1, 3, 5]}),
    "sequence": ({0: [0], 3: [3]}, {0: [0, 1, 2], 3: [3, 4, 5]}),
    "middle_cycle": ({1: [1], 2: [3]}, {1: [1, 3], 2: [2, 4]}),
    "middle_sequence": ({1: [1], 3: [3]}, {1: [1, 2], 3: [3, 4]}),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("init", ["stepwise", "average", "lower", "upper"])
def test_each_init_starts_a_block_from_exactly_the_layers_it_names(source, pattern, init):
    model, folder = source
    ours, info = converted(folder, pattern=pattern, init=init, lora_rank=0)
    stepwise, average = PICKS[pattern]
    offset, span = (1, N_LAYER - 2) if pattern.startswith("middle") else (0, N_LAYER)
    roots = sorted(stepwise)
    expected = {"stepwise": stepwise, "average": average,
                "lower": {root: [offset + i] for i, root in enumerate(roots)},
                "upper": {root: [offset + span - 2 + i] for i, root in enumerate(roots)}}[init]
    assert info["init_layers"] == {str(root): layers for root, layers in expected.items()}
    for root, layers in expected.items():
        for name, param in ours.stack.blocks[root].named_parameters():
            want = torch.stack([dict(model.stack.blocks[layer].named_parameters())[name] for layer in layers]).mean(0)
            torch.testing.assert_close(param, want, rtol=0, atol=1e-7)
    if pattern.startswith("middle"):  # the first and last slots stay the source's own
        for slot in (0, N_LAYER - 1):
            for a, b in zip(ours.stack.blocks[slot].parameters(), model.stack.blocks[slot].parameters(), strict=True):
                assert torch.equal(a, b)


@pytest.mark.parametrize("grad", ["shared", "frozen_copy"])
def test_lora_tensors_train_and_tied_weights_follow_policy_grad(source, grad):
    _, folder = source
    ours, _ = converted(folder, grad=grad, pattern="cycle", lora_rank=4)
    ours.train()
    lora = [p for name, p in ours.named_parameters() if ".lora." in name]
    # Every matrix of every shared slot (all 6 here), two factors each.
    assert len(lora) == N_LAYER * 4 * 2
    trainable = {id(p) for p in counts.trainable_parameters(ours)}
    assert all(id(p) in trainable for p in lora)
    optimizer = build_optimizer(ours, TrainConfig(lr=1e-3), HardwareConfig(), CPU)
    sync_optimizer(optimizer, ours)
    ours.loss(lm_batch()).loss.backward()
    assert all(p.grad is not None for p in lora)
    # Each correction learns (a slot whose source layer is its block's own starts with B = 0, A random: B learns).
    assert all(a.grad.abs().sum() + b.grad.abs().sum() > 0 for a, b in zip(lora[::2], lora[1::2], strict=True))
    optimizer.step()
    assert all(p in optimizer.state for p in lora)
    root_weight = ours.stack.blocks[0].attn.c_attn.weight
    tied_weight = ours.stack.blocks[2].attn.c_attn.weight
    if grad == "shared":
        assert tied_weight is root_weight
    else:
        assert tied_weight is not root_weight and not tied_weight.requires_grad
        assert tied_weight.untyped_storage().data_ptr() == root_weight.untyped_storage().data_ptr()
    # The per-slot biases and norms stay their own; LoRA counts in stored and trainable parameters.
    assert ours.stack.blocks[2].attn.c_attn.bias is not ours.stack.blocks[0].attn.c_attn.bias
    lora_count = sum(p.numel() for p in lora)
    assert counts.stored_params(ours) >= lora_count and counts.trainable_params(ours) >= lora_count


@pytest.mark.parametrize("grad", ["shared", "frozen_copy"])
@pytest.mark.parametrize("frozen", [False, True])
def test_train_flops_per_token_counts_the_lora_corrections(source, grad, frozen):
    _, folder = source
    ours, _ = converted(folder, grad=grad, pattern="cycle", lora_rank=4)
    ours.train()
    if frozen:
        ours.stack.apply_map(ours.stack.src, [slot == 0 for slot in range(N_LAYER)])
    # Without the corrections' weight gradients and factor products the count was 3% to 23% low here.
    assert train_flops_per_token(ours, 32, batch_size=2) == pytest.approx(counted_flops_per_token(ours), rel=0.01)


def test_a_frozen_slot_freezes_its_lora_too(source):
    _, folder = source
    ours, _ = converted(folder, pattern="cycle", lora_rank=4)
    # model.freeze=[1] clears slot 1's trainable flag in every decision (Trainer.apply_decision).
    ours.stack.apply_map(ours.stack.src, [slot != 1 for slot in range(N_LAYER)])
    optimizer = build_optimizer(ours, TrainConfig(lr=1e-3), HardwareConfig(), CPU)
    sync_optimizer(optimizer, ours)
    ours.loss(lm_batch()).loss.backward()
    optimizer.step()
    frozen = list(ours.stack.lora[1].parameters())
    assert frozen and not any(p.requires_grad or p.grad is not None or p in optimizer.state for p in frozen)
    assert all(p.requires_grad and p in optimizer.state for p in ours.stack.lora[0].parameters())


def test_a_merged_lora_model_reloads_in_transformers_with_equal_logits(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, folder = source
    ours, _ = converted(folder, pattern="middle_cycle", init="average", lora_rank=4)
    with torch.no_grad():  # move the LoRA off its SVD init so the merge must add it
        for name, param in ours.named_parameters():
            if ".lora." in name:
                param.add_(0.01)
    before = logits(ours)
    ours.stack.merge_lora()
    assert not ours.stack.has_lora
    torch.testing.assert_close(logits(ours), before, rtol=0, atol=1e-5)
    to_hf(ours, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(lm_batch()["input_ids"]).logits
    torch.testing.assert_close(theirs, before, rtol=0, atol=1e-4)


def recursive_config(**policy_keys):
    cfg = small_lm_config(policy="recursive", policy_keys=policy_keys)
    cfg.train.init_from = "/nonexistent"
    return cfg


@pytest.mark.parametrize("change, message", [
    (lambda cfg: setattr(cfg.train, "init_from", None),
     "policy=recursive converts a trained model; set train.init_from"),
    (lambda cfg: setattr(cfg.policy, "lora_rank", -1), "policy.lora_rank=-1 must be an integer from 0"),
    (lambda cfg: setattr(cfg.policy, "lora_rank", 65), "policy.lora_rank=65 must be an integer from 0"),
    (lambda cfg: setattr(cfg.policy, "n_sets", 3) or setattr(cfg.policy, "pattern", "sequence"),
     "policy.pattern=sequence cannot use policy.n_sets=3"),
    (lambda cfg: setattr(cfg.policy, "share", "mlp"), "policy=recursive does not use policy.share"),
])
def test_bad_input_is_refused_in_one_line(change, message):
    cfg = recursive_config()
    change(cfg)
    with pytest.raises(BadInput, match=message.replace(".", r"\.").replace("(", r"\(")) as err:
        preflight(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_keys, message", [
    ({"d_model": 64}, "has width 32 but model.d_model=64"),
    ({"vocab": 80}, "has a vocabulary of 64 tokens but this run's is 80"),
    ({"n_layer": 4}, "has 6 layers but model.n_layer=4"),
])
def test_a_source_of_another_shape_is_refused_in_one_line(source, model_keys, message):
    _, folder = source
    keys = {"n_layer": N_LAYER, "d_model": WIDTH, **model_keys}
    model = tiny_gpt2(**keys)
    with pytest.raises(BadInput, match=message):
        recursive.convert(model, folder, PolicyConfig(name="recursive", n_sets=2))


def test_n_sets_the_pattern_cannot_use_with_the_source_depth(source):
    _, folder = source
    with pytest.raises(BadInput, match="cannot use policy.n_sets=4 with the source's 6 layers"):
        recursive.convert(tiny_gpt2(n_layer=N_LAYER, d_model=WIDTH), folder,
                          PolicyConfig(name="recursive", n_sets=4, pattern="sequence"))


@pytest.fixture(scope="module")
def parent_and_child(tmp_path_factory, data_cache):
    """A 4-layer parent run on pydoc, and its recursive child (2 blocks, LoRA rank 8), both with checkpoints."""
    from .helpers import run_folder
    parent, child = tmp_path_factory.mktemp("parent"), tmp_path_factory.mktemp("child")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        run_folder(small_lm_config(policy="none", policy_keys={"n_sets": 2}, max_steps=4), parent)
        cfg = small_lm_config(policy="recursive", max_steps=4, policy_keys={"lora_rank": 8, "init": "average"},
                              train_keys={"checkpoint_interval": 2, "keep_checkpoints": 5})
        cfg.train.init_from = str(parent)
        summary = run_folder(cfg, child)
    return parent, child, summary, cfg


@pytest.mark.slow
def test_a_recursive_run_records_its_conversion_and_its_losses_before_training(parent_and_child):
    parent, _, summary, _ = parent_and_child
    assert summary["conversion"]["source"].startswith(str(parent))
    assert (summary["conversion"]["pattern"], summary["conversion"]["init"], summary["conversion"]["lora_rank"]) == (
        "cycle", "average", 8)
    assert summary["converted_val_loss"] > 0 and summary["converted_test_loss"] > 0
    # The source's own losses are measured on the final protocol (whole splits): they are the parent's final ones.
    parent_summary = json.loads((parent / "summary.json").read_text())
    for split in ("val", "test"):
        assert summary[f"source_{split}_loss"] == pytest.approx(parent_summary[f"{split}_loss"], abs=1e-6)


@pytest.mark.slow
def test_an_exported_lora_run_reloads_in_transformers_with_equal_logits(parent_and_child, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tyingrun import export
    from tyingrun.files import WEIGHTS_FILE
    from tyingrun.run import build_model
    from tyingrun.train.checkpoint import latest_checkpoint
    from tyingrun.train.init_from import init_from
    from tyingrun.tying.weights import read_tensors
    _, child, _, cfg = parent_and_child
    checkpoint = latest_checkpoint(child)
    vocab = len(read_tensors(checkpoint / WEIGHTS_FILE)["tokens.wte.weight"])
    relaxed = build_model(ModelConfig(**{**vars(cfg.model), "vocab_size": vocab}), None, cfg.policy.grad,
                          *recursive.stack_sharing(cfg.policy))
    recursive.prepare(relaxed, cfg.policy)
    init_from(relaxed, checkpoint)
    assert relaxed.stack.has_lora and relaxed.stack.src == [0, 1, 0, 1]
    export.main([str(child), str(tmp_path / "hf")])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, relaxed.eval()(ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_resumed_recursive_run_is_bit_identical(parent_and_child, tmp_path, data_cache, monkeypatch):
    import shutil

    from tyingrun.files import WEIGHTS_FILE
    from tyingrun.run import run
    from tyingrun.tying.weights import read_tensors
    _, child, summary, cfg = parent_and_child
    cfg = copy.deepcopy(cfg)
    folder = tmp_path / "resumed"
    shutil.copytree(child, folder)
    shutil.rmtree(folder / "checkpoints" / "step_00000004")
    (folder / "summary.json").unlink()
    monkeypatch.setenv("TYINGRUN_CACHE", str(data_cache))
    cfg.train.resume = str(folder)
    resumed = run(cfg, folder)
    whole = read_tensors(child / "checkpoints" / "step_00000004" / WEIGHTS_FILE)
    again = read_tensors(folder / "checkpoints" / "step_00000004" / WEIGHTS_FILE)
    assert any(".lora." in name for name in whole) and whole.keys() == again.keys()
    assert all(torch.equal(whole[name], again[name]) for name in whole)
    for key in ("conversion", "source_val_loss", "source_test_loss", "converted_val_loss", "converted_test_loss",
                "val_loss", "test_loss"):
        assert json.dumps(resumed[key]) == json.dumps(summary[key])


@pytest.mark.slow
def test_inspect_shows_each_slots_lora_and_the_rows_add_up(parent_and_child, capsys):
    from tyingrun.inspect_run import load_run, main, storage_rows
    _, child, summary, _ = parent_and_child
    _, _, model, optimizer = load_run(child)
    assert model.stack.share == "matrices" and model.stack.has_lora
    rows = storage_rows(model, optimizer)
    assert sum(row["weights"] + row["grads"] + row["optimizer"] for row in rows) == summary["train_state_bytes"]
    lora_per_slot = sum(p.numel() for p in model.stack.lora[2].parameters())
    assert lora_per_slot > 0 and rows[2]["own_params"] >= lora_per_slot
    main([str(child)])
    assert "+ own LoRA" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, expected", [
    (["policy=recursive"], "policy=recursive converts a trained model; set train.init_from="),
    (["policy=recursive", "train.init_from=/x", "policy.lora_rank=-2"], "policy.lora_rank=-2 must be an integer"),
])
def test_the_command_refuses_with_one_line(tmp_path, overrides, expected):
    assert expected in bad_input_line(overrides, tmp_path / "run")


def test_the_command_refuses_a_source_of_another_width_with_one_line(tmp_path, source):
    _, folder = source  # 6 layers, width 32, 64 tokens: the pydoc run's vocabulary (512, of 40 documents) differs first
    line = bad_input_line(["policy=recursive", f"train.init_from={folder}", "model.n_layer=6", "model.d_model=32",
                           "model.n_head=2", "dataset.vocab_size=512", "dataset.max_documents=40"], tmp_path / "run")
    assert "has a vocabulary of 64 tokens but this run's is" in line
