"""policy=looped: the layout's map, the same weights at other loop counts, sampled loop counts, truncated backprop and
its FLOPs, per-loop tensors that start as the plain looped model, export, resume and the refused configs."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tyingrun.config import PolicyConfig
from tyingrun.data_cli import compose_config
from tyingrun.policies import build_policy, stack_sharing
from tyingrun.run import build_model, prepare_policy_tensors
from tyingrun.train.looped import LoopCounts
from tyingrun.tying import counts
from tyingrun.tying.flops import train_flops_per_token
from tyingrun.tying.loops import counts_map

from .helpers import (
    TIMING_KEYS,
    TINY_RUN,
    bad_input_line,
    counted_flops_per_token,
    lm_batch,
    read_jsonl,
    run_folder,
    small_lm_config,
)

VOCAB = 64
D = 32


def expected_map(prelude, core, coda, loops):
    """Written from the definition: prelude and coda slots own their weights; core slot s reads core slot (s - prelude)
    mod core of the first loop."""
    slots = prelude + core * loops + coda
    return [s if s < prelude or s >= prelude + core * loops else prelude + (s - prelude) % core for s in range(slots)]


@pytest.mark.parametrize("prelude, core, coda, loops", [(0, 1, 0, 4), (1, 2, 1, 3), (2, 3, 1, 2), (1, 1, 0, 5),
                                                        (0, 2, 3, 1), (3, 1, 2, 6)])
def test_the_looped_map_ties_each_core_block_across_the_loops(prelude, core, coda, loops):
    slots = prelude + core * loops + coda
    policy = PolicyConfig(name="looped", prelude=prelude, core=core, coda=coda, loops=loops)
    decision = build_policy(policy, slots).start(slots)
    assert decision.src == expected_map(prelude, core, coda, loops)
    assert len(set(decision.src)) == prelude + core + coda


def test_per_layer_counts_run_each_layer_that_many_times_in_a_row():
    assert counts_map([4, 2, 1, 1]) == [0, 0, 0, 0, 4, 4, 6, 7]
    assert build_policy(PolicyConfig(name="looped", counts=[1, 3]), 4).start(4).src == [0, 1, 1, 1]


def looped_model(seed=0, n_layer=None, **policy):
    """A tiny GPT-2 under policy=looped (prelude 1, core 2, loops 2, coda 1 unless ``policy`` says otherwise), built and
    prepared as a run builds it, its map applied."""
    policy = {"prelude": 1, "core": 2, "loops": 2, "coda": 1, **policy}
    slots = policy["prelude"] + policy["core"] * policy["loops"] + policy["coda"]
    cfg = small_lm_config("looped", policy_keys=policy)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=n_layer or slots, d_model=D, n_head=2,
                                                             max_positions=32))
    torch.manual_seed(seed)
    model = build_model(cfg.model, SimpleNamespace(vocab_size=VOCAB), cfg.policy.grad, *stack_sharing(cfg.policy))
    prepare_policy_tensors(model, cfg)
    decision = build_policy(cfg.policy, len(model.stack)).start(len(model.stack))
    model.stack.apply_map(decision.src, decision.trainable)
    return model


def perturbed(model, scale=0.05):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in counts.unique_parameters(model.parameters()).values():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def test_the_same_weights_run_at_other_loop_counts_without_copying_anything():
    model = perturbed(looped_model()).eval()
    stack, ids = model.stack, lm_batch(VOCAB)["input_ids"]
    storages = sorted(counts.unique_parameters(model.parameters()))
    at_trained = model(ids)
    stack.looping = None  # the plain stack runs every slot once: the looped plan at its own loop count
    torch.testing.assert_close(model(ids), at_trained, rtol=0, atol=0)
    stack.looping = looped_model().stack.looping
    with stack.looping.at(4):
        at_four = model(ids)
        # By hand: the prelude, the two core blocks four times (slots 1 and 2 are the first loop's), the coda.
        x = model.drop(model.tokens.embed(ids) + model.wpe(torch.arange(ids.shape[1])))
        for block in [0, *[1, 2] * 4, 5]:
            x = stack.blocks[block](x)
        by_hand = model.tokens.project(model.ln_f(x))
    torch.testing.assert_close(at_four, by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(at_four, at_trained, atol=1e-3)
    assert sorted(counts.unique_parameters(model.parameters())) == storages
    torch.testing.assert_close(model(ids), at_trained, rtol=0, atol=0)  # back at the trained count after the block


# What each kind of per-loop tensor adds to the trainable parameters of 1 + 2 x 2 + 1 slots at width D.
PER_LOOP_PARAMS = {
    "scale": 2 * 2 * D,  # a per-channel scale per core slot: 2 blocks x 2 loops
    "adaln": 2 * 2 * 2 * D,  # the second loop's 2 core slots keep their 2 LayerNorms (weight and bias)
    # rank 4 on the second loop's 2 slots: A (4 x in) and B (out x 4) of c_attn, attn.c_proj, c_fc and mlp.c_proj
    "lora": 2 * 4 * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D)),
}


@pytest.mark.parametrize("loop_params", PER_LOOP_PARAMS)
def test_per_loop_tensors_start_as_the_plain_looped_model_and_count_as_trainable(loop_params):
    keys = {"loop_params": loop_params, **({"lora_rank": 4} if loop_params == "lora" else {})}
    plain, special = looped_model(), looped_model(**keys)
    ids = lm_batch(VOCAB)["input_ids"]
    assert torch.equal(plain.eval()(ids), special.eval()(ids))
    assert counts.trainable_params(special) - counts.trainable_params(plain) == PER_LOOP_PARAMS[loop_params]


def test_concatenated_injection_starts_as_added_injection_and_counts_its_matrix():
    added, concatenated = looped_model(loops=3, n_layer=8, inject="add"), looped_model(loops=3, n_layer=8,
                                                                                       inject="concat")
    ids = lm_batch(VOCAB)["input_ids"]
    torch.testing.assert_close(added.eval()(ids), concatenated.eval()(ids), rtol=0, atol=1e-5)
    assert counts.trainable_params(concatenated) - counts.trainable_params(added) == 2 * D * D
    assert not torch.allclose(added(ids), looped_model(loops=3, n_layer=8).eval()(ids), atol=1e-3)


def train_backward(model):
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(lm_batch(VOCAB)).loss.backward()


@pytest.mark.parametrize("inject", ["none", "add"])
def test_truncated_backprop_leaves_the_early_loops_without_gradient(inject):
    model = looped_model(loops=3, n_layer=8, loop_params="scale", backprop_loops=1, inject=inject)
    train_backward(model)
    scales = model.stack.looping.scales  # core slots 1..6: loops 1, 2, 3 of the 2 core blocks
    assert [scale.grad is None for scale in scales] == [True, True, True, True, False, False]
    prelude_grads = [p.grad for p in model.stack.blocks[0].parameters()]
    if inject == "none":  # nothing with a graph reads the prelude's output
        assert all(grad is None for grad in prelude_grads)
    else:
        assert all(grad is not None and grad.abs().sum() > 0 for grad in prelude_grads)
    whole = looped_model(loops=3, n_layer=8, loop_params="scale", inject=inject)
    train_backward(whole)
    core_root = dict(model.stack.blocks[1].named_parameters())["attn.c_attn.weight"].grad
    core_root_whole = dict(whole.stack.blocks[1].named_parameters())["attn.c_attn.weight"].grad
    assert core_root.abs().sum() > 0 and not torch.allclose(core_root, core_root_whole)


@pytest.mark.parametrize("policy, loops_now", [
    ({}, None), ({"backprop_loops": 1}, None), ({"backprop_loops": 2, "inject": "concat"}, None),
    ({"backprop_loops": 1, "loop_params": "lora", "lora_rank": 2}, None), ({"backprop_loops": 2}, 5), ({}, 1),
])
def test_flops_per_token_count_what_runs_forward_and_backward(policy, loops_now):
    model = looped_model(loops=3, n_layer=8, **policy).train()
    control = model.stack.looping
    with control.at(loops_now or control.plan.loops):
        counted = counted_flops_per_token(model, vocab=VOCAB)
        ours = train_flops_per_token(model, 32, batch_size=2)
    assert ours == pytest.approx(counted, rel=0.02)


def log_normal_poisson_pmf(loops, sigma, cap):
    """P(n = k), k = 1..cap, of n = min(cap, 1 + Poisson(lam)), log lam ~ N(log(loops - 1) - sigma^2/2, sigma), by
    Gauss-Hermite quadrature over the normal."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    lams = np.exp(math.log(loops - 1) - sigma ** 2 / 2 + sigma * nodes)
    weights = weights / weights.sum()
    pmf = [float(np.sum(weights * np.exp(-lams) * lams ** (k - 1) / math.factorial(k - 1))) for k in range(1, cap)]
    return [*pmf, 1 - sum(pmf)]


def loop_counts(seed=0, **policy):
    cfg = small_lm_config("looped", train_keys={"seed": seed}, policy_keys={"train_loops": "poisson", **policy})
    return LoopCounts(cfg, SimpleNamespace(looping=None))


def test_sampled_loop_counts_follow_the_log_normal_poisson_law():
    sampler = loop_counts(loops=4, max_loops=9)
    draws = np.array([sampler.next() for _ in range(40_000)])
    observed = np.bincount(draws, minlength=10)[1:] / len(draws)
    expected = log_normal_poisson_pmf(4, 0.5, 9)
    assert np.abs(observed - expected).max() < 0.01
    assert draws.min() >= 1 and draws.max() == 9
    uncapped = loop_counts(loops=4, max_loops=200)
    assert np.mean([uncapped.next() for _ in range(40_000)]) == pytest.approx(4, abs=0.05)


def test_sampled_loop_counts_are_one_stream_of_the_seed_and_resume_where_they_stopped():
    first, again, other = loop_counts(), loop_counts(), loop_counts(seed=1)
    drawn = [first.next() for _ in range(50)]
    assert drawn == [again.next() for _ in range(50)]  # every rank builds the same sampler and draws the same counts
    assert drawn != [other.next() for _ in range(50)]
    state = first.state_dict()
    resumed = loop_counts()
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(20)] == [first.next() for _ in range(20)]


LOOPED_RUN = [*TINY_RUN, "policy=looped", "policy.prelude=1", "policy.core=1", "policy.loops=2", "policy.coda=1",
              "train.eval_batches=2", "train.warmup_steps=2", "train.schedule=constant", "train.log_interval=2",
              "train.eval_interval=4", "train.checkpoint_interval=4"]
SAMPLED = ["policy.train_loops=poisson", "policy.max_loops=5", "train.eval_loops=[1,3,5]", "policy.loop_params=scale"]


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("looped") / "whole"
    return folder, run_folder(compose_config([*LOOPED_RUN, *SAMPLED, "train.max_steps=8"]), folder)


def test_a_run_scores_the_test_split_at_each_loop_count_and_states_the_depth(sampled_run):
    _, summary = sampled_run
    assert summary["loops"] == 2 and summary["looped"]["max_loops"] == 5
    assert set(summary["test_loss_by_loops"]) == {"1", "2", "3", "5"}
    assert summary["test_loss_by_loops"]["2"] == summary["test_loss"]  # the training-time evaluation, again
    assert summary["test_ppl_by_loops"]["2"] == summary["test_ppl"]
    assert len(set(summary["test_loss_by_loops"].values())) == 4
    flops = summary["train_flops_per_token_by_loops"]
    assert flops["1"] < flops["2"] < flops["3"] < flops["5"]
    assert 1 <= summary["train_loops_mean"] <= 5 and summary["train_loops_mean"] != 2


@pytest.mark.slow
def test_resume_with_sampled_loops_is_bit_identical(tmp_path, cli, sampled_run):
    whole, summary = sampled_run
    stopped = tmp_path / "stopped"
    assert cli(*LOOPED_RUN, *SAMPLED, "train.max_steps=4", f"hydra.run.dir={stopped}").returncode == 0
    assert cli(f"train.resume={stopped}", "train.max_steps=8").returncode == 0
    resumed = json.loads((stopped / "summary.json").read_text())
    # The stopped run's step 4 ended it (a final evaluation of whole splits); every step after comes from the resume.
    after = [[row for row in read_jsonl(run / "metrics.jsonl", drop=TIMING_KEYS) if row["step"] > 4]
             for run in (stopped, whole)]
    assert len(after[0]) == 3 and after[0] == after[1]
    assert read_jsonl(stopped / "maps.jsonl") == read_jsonl(whole / "maps.jsonl")
    for key in ("test_loss_by_loops", "train_loops_mean", "train_flops_per_token", "final_map"):
        assert resumed[key] == summary[key]


LOOPED_PARALLEL = ["model.n_layer=5", "policy=looped", "policy.loops=3"]


@pytest.mark.slow
@pytest.mark.parametrize("knobs", [
    # The ranks draw the same loop counts (else their losses would not be one process's).
    ["policy.train_loops=poisson", "policy.max_loops=6", "policy.loop_params=scale"],
    # Truncated backprop without injection: the prelude and the positions never get a gradient, so under DDP as in one
    # process the optimizer skips them (no zeros standing in for a gradient, no weight decay).
    ["policy.backprop_loops=1"],
], ids=["poisson", "truncated"])
def test_data_parallel_looped_runs_match_one_process(tmp_path, cli, knobs):
    from tyingrun.tying.weights import read_tensors

    from .helpers import parallel_run

    runs = [parallel_run(cli, tmp_path / "single", *LOOPED_PARALLEL, *knobs),
            parallel_run(cli, tmp_path / "ddp", *LOOPED_PARALLEL, *knobs, ranks=2)]
    single, parallel = (read_jsonl(run / "metrics.jsonl") for run in runs)
    for key in ("train_loss", "val_loss"):
        ours, theirs = ([row[key] for row in rows if key in row] for rows in (parallel, single))
        assert len(ours) == len(theirs) > 1
        assert ours == pytest.approx(theirs, abs=1e-5)
    if knobs == ["policy.backprop_loops=1"]:
        weights = [read_tensors(run / "checkpoints" / "step_00000012" / "model.safetensors") for run in runs]
        untrained = [name for name in weights[0] if name.startswith(("stack.blocks.0.", "wpe."))]
        assert untrained and all(torch.equal(weights[0][name], weights[1][name]) for name in untrained)


@pytest.mark.parametrize("overrides, expected", [
    (["policy.loops=0"], "policy.loops=0 must be a whole number of at least 1"),
    (["policy.core=2"], "= 1 + 2*2 + 1 = 6 slots but model.n_layer=4; set model.n_layer=6"),
    (["train.eval_loops=[2,9]", "policy.max_loops=4"], "asks for 9 loops, beyond policy.max_loops=4"),
    (["policy.backprop_loops=3"], "policy.backprop_loops=3 exceeds policy.loops=2"),
    (["policy.backprop_loops=1", "policy.grad=frozen_copy"], "needs policy.grad=shared"),
    (["policy.loop_params=lora"], "policy.loop_params=lora needs a rank: set policy.lora_rank"),
    (["policy.lora_rank=4"], "set policy.loop_params=lora or drop them"),
    (["policy.counts=[2,1]"], "policy.counts=[2, 1] runs 3 layer slots but model.n_layer=4"),
    (["policy.counts=[2,1,1]", "policy.loops=3"], "policy.loops belongs to the policy.prelude/core/coda/loops form"),
    (["policy.inject=sum"], "policy.inject='sum' is not an option; choose one of: none, add, concat"),
    (["policy=cyclic", "train.eval_loops=[2]"], "train.eval_loops scores a looped model at other loop counts"),
    (["policy.counts=[3,1]", "policy.loop_params=scale"], "policy.counts has no core loop"),
    (["policy.loops=1", "model.n_layer=3", "policy.loop_params=adaln"], "this layout repeats no block"),
    (["policy.train_loops=poisson", "policy.loop_sigma=0"],
     "policy.loop_sigma=0.0 is out of range; it must be a finite number in (0, 10)"),
])
def test_impossible_looped_configs_are_one_line_before_anything_is_built(tmp_path, overrides, expected):
    line = bad_input_line(["model=gpt2", "dataset=pydoc", "hardware=cpu", "policy=looped", *overrides],
                          tmp_path / "run")
    assert expected in line


def test_export_of_a_looped_model_reproduces_its_logits_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tyingrun.models.hf_gpt2 import to_hf

    model = perturbed(looped_model(loops=3, n_layer=8, loop_params="adaln")).eval()
    to_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = lm_batch(VOCAB)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)


def test_export_refuses_a_looped_run_whose_scales_hugging_face_cannot_hold(tmp_path, sampled_run, capsys):
    from tyingrun import export

    from .helpers import assert_one_line, call_main

    result = call_main(export.main, [str(sampled_run[0]), str(tmp_path / "hf")], capsys)
    assert_one_line(result, 2, "policy.loop_params=scale", program="tyingrun-export")
    assert not (tmp_path / "hf").exists()


def test_inspect_shows_the_layout_each_slots_part_and_rows_that_add_up(sampled_run, capsys):
    from tyingrun.inspect_run import load_run, main, storage_rows

    folder, summary = sampled_run
    _, _, model, optimizer = load_run(folder)
    rows = storage_rows(model, optimizer)
    assert sum(row["weights"] + row["grads"] + row["optimizer"] for row in rows) == summary["train_state_bytes"]
    assert [row for row in rows if row["slot"] == "loops"][0]["own_params"] == 2 * 64  # a scale per core slot
    main([str(folder)])
    out = capsys.readouterr().out
    assert "looped: prelude 1 + core 1 x 2 loops + coda 1  train loops poisson" in out
    assert [line.split()[-2:] for line in out.splitlines() if line.strip().startswith(("1 ", "2 "))] == [
        ["loop", "1"], ["loop", "2"]]


def test_init_from_a_looped_run_needs_its_per_loop_tensors_in_one_line(tmp_path, sampled_run):
    folder, _ = sampled_run
    without_scales = [*LOOPED_RUN, f"train.init_from={folder}"]
    assert "holds stack.looping.scales.0, a tensor of its policy.inject and policy.loop_params" in bad_input_line(
        without_scales, tmp_path / "run")
