"""The evaluation protocol: no evaluation scores an untrained decision, a final evaluation on the whole val and
test splits, rewards paired with their own decisions in maps.jsonl, and independent random streams."""

import copy
import json
import shutil

import pytest
import torch

from tyingrun.data.lm import BlockSampler
from tyingrun.metrics.sinks import JsonlFile, decided_before
from tyingrun.run import build_data, build_model, run
from tyingrun.seeding import derive_seed
from tyingrun.train.trainer import Trainer

from .helpers import run_folder, small_lm_config

K = 4


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dynamic_q_run(tmp_path_factory, data_cache):
    """dynamic_q with K=4, and max_steps and eval_interval multiples of K: every evaluation falls on a decision step."""
    folder = tmp_path_factory.mktemp("dynamic-q-protocol")
    cfg = small_lm_config("dynamic_q", max_steps=24, policy_keys={"steps_per_decision": K, "reward": "neg_loss"},
                          train_keys={"eval_interval": 8, "eval_batches": 2, "log_interval": 4})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        summary = run(cfg, folder)
    return folder, summary


def map_trained_at(map_rows, step):
    """The map the optimizer step taking the model from ``step - 1`` to ``step`` trained: the last change before it."""
    return [row for row in map_rows if row["step"] < step][-1]


@pytest.mark.slow
def test_every_evaluated_map_trained_and_the_final_one_for_k_steps(dynamic_q_run):
    folder, summary = dynamic_q_run
    evals = [row for row in read_jsonl(folder / "metrics.jsonl") if "val_loss" in row]
    map_rows = read_jsonl(folder / "maps.jsonl")
    assert [row["step"] for row in evals] == [0, 8, 16, 24]
    for row in evals[1:]:
        assert row["map"] == map_trained_at(map_rows, row["step"])["map"]
    assert map_rows[-1]["step"] <= 24 - K  # no decision at the last step
    assert summary["final_map"] == evals[-1]["map"] == map_rows[-1]["map"]
    assert summary["independent_layers"] == evals[-1]["independent_layers"]


@pytest.mark.slow
def test_final_evaluation_scores_the_whole_val_and_test_splits(dynamic_q_run, data_cache):
    folder, summary = dynamic_q_run
    cfg = small_lm_config()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        data = build_data(cfg)
    assert summary["val_tokens"] == data.eval_items("val") > 0
    assert summary["test_tokens"] == data.eval_items("test") > 0
    assert summary["test_ppl"] == pytest.approx(torch.tensor(summary["test_loss"]).exp().item())
    final = read_jsonl(folder / "metrics.jsonl")[-1]
    assert final["test_loss"] == summary["test_loss"] and final["val_loss"] == summary["val_loss"]


@pytest.mark.slow
def test_maps_jsonl_pairs_each_reward_with_its_own_decision(dynamic_q_run):
    folder, summary = dynamic_q_run
    decisions = [row for row in read_jsonl(folder / "maps.jsonl") if "action" in row]
    assert [row["step"] for row in decisions] == list(range(K, 24, K))
    for row in decisions[:-1]:
        assert row["reward_step"] == row["step"] + K and row["reward"] < 0  # neg_loss: minus a cross-entropy
    assert decisions[-1]["reward"] is None and decisions[-1]["reward_step"] is None
    assert summary["decisions"] == len(decisions)
    # Layer 3 (of 4) was decided at step 12 and rewarded at 16, ending the first episode: one decay.
    assert summary["clipped_reward_fraction"] == 0.0 and summary["final_epsilon"] == pytest.approx(0.95)


@pytest.mark.slow
def test_paper_reward_counts_its_clipped_rewards(tmp_path):
    cfg = small_lm_config("dynamic_q", max_steps=12, policy_keys={"steps_per_decision": 2})
    summary = run(cfg, tmp_path)
    # A barely trained model's batch perplexity is far above 10: every paper reward sits at the -10 floor.
    assert summary["decisions"] == 5 and summary["clipped_reward_fraction"] == 1.0


def epoch_orders(seed, epochs=4, n_items=64):
    sampler = BlockSampler(torch.arange(n_items).unsqueeze(1).repeat(1, 3), batch_size=n_items, seed=seed)
    return [tuple(sampler.next_batch()["input_ids"][:, 0].tolist()) for _ in range(epochs)]


def test_seeds_share_no_epoch_order():
    orders = {seed: epoch_orders(seed) for seed in range(3)}
    for seed in orders:
        for other in orders:
            if other != seed:
                assert not set(orders[seed]) & set(orders[other])


def first_batches(sampler, n=6):
    return [sampler.next_batch()["input_ids"] for _ in range(n)]


@pytest.mark.slow
def test_reward_stream_is_no_training_stream(data_cache):
    cfg = small_lm_config("dynamic_q")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        data = build_data(cfg)
    model = build_model(cfg.model, data, cfg.policy.grad)
    trainers = {}
    for seed in range(3):
        cfg.train.seed = seed
        trainers[seed] = Trainer(cfg, model, model.stack, data, policy=None, device=torch.device("cpu"), sinks=None)
    training = [batch for trainer in trainers.values() for batch in first_batches(trainer.sampler)]
    for trainer in trainers.values():
        for reward_batch in first_batches(trainer.score_sampler):
            assert not any(torch.equal(reward_batch, batch) for batch in training)


def test_streams_are_keyed_by_seed_name_and_rank():
    seeds = {derive_seed(seed, name, rank) for seed in range(4) for name in ("dropout", "init") for rank in range(2)}
    assert len(seeds) == 16 and all(0 <= seed < 2**63 for seed in seeds)
    assert derive_seed(3, "dropout", 1) == derive_seed(3, "dropout", 1)


@pytest.mark.parametrize("resume_step, kept", [(10, 2), (8, 1), (14, 3)])
def test_resume_keeps_only_the_map_rows_written_by_the_checkpoint(tmp_path, resume_step, kept):
    """K=4 in a run of 14 steps. A learned decision's row is written when its reward is measured, by the decision
    taken after the step it is measured at, which comes after that step's checkpoint; the last decision (12) is
    written unrewarded when the run ends. So a checkpoint at step 10 holds the decision of step 8 as unrewarded (its
    row, written after step 12, would otherwise appear twice), one at step 8 holds the decision of step 4 (written
    after step 8), and resuming the finished run at 14 to extend it takes its last decision again, rewarded."""
    path = tmp_path / "maps.jsonl"
    rows = [{"step": 0}, {"step": 4, "reward": 1.0, "reward_step": 8}, {"step": 8, "reward": 2.0, "reward_step": 12},
            {"step": 12, "reward": None, "reward_step": None}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    JsonlFile(path, resume_step, decided_before).close()
    assert read_jsonl(path) == rows[:kept]


def test_resume_keeps_the_metrics_rows_through_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "train_loss": 1.0} for step in (5, 10, 15)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    JsonlFile(path, 10).close()
    assert read_jsonl(path) == rows[:2]




@pytest.mark.slow
def test_a_resume_at_a_decision_step_writes_every_map_row_once(tmp_path, data_cache):
    """K=1: a decision follows every step, so the checkpoint at step 3 comes just before the decision that writes
    the row of step 2's decision. A run killed later, its logs left as they were, resumes to the same maps.jsonl."""
    cfg = small_lm_config("dynamic_q", max_steps=6, policy_keys={"steps_per_decision": 1, "reward": "neg_loss"},
                          train_keys={"checkpoint_interval": 3, "keep_checkpoints": 2})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TYINGRUN_CACHE", str(data_cache))
        run_folder(cfg, whole)
        shutil.copytree(whole, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000006")
        (resumed / "summary.json").unlink()
        resumed_cfg = copy.deepcopy(cfg)
        resumed_cfg.train.resume = str(resumed)
        run(resumed_cfg, resumed)
    decisions = [row["step"] for row in read_jsonl(resumed / "maps.jsonl")]
    assert decisions == [0, 1, 2, 3, 4, 5]
    assert read_jsonl(resumed / "maps.jsonl") == read_jsonl(whole / "maps.jsonl")
