"""hardware=ddp's gradient averaging: buckets all-reduced by post-accumulate-grad hooks while the backward runs,
re-armed when the trainable set changes, with the losses of one process."""

import pytest
import torch
import torch.distributed as dist

from tyingrun.train.grad_sync import OverlappedGradientAverage
from tyingrun.tying.counts import trainable_parameters

from .helpers import lm_batch, parallel_run, read_jsonl, tiny_gpt2


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_buckets_are_all_reduced_during_the_backward_and_follow_the_trainable_set(one_rank_group):
    model = tiny_gpt2(grad_mode="frozen_copy")
    sync = OverlappedGradientAverage(world_size=1, bucket_bytes=1)  # one tensor per bucket
    sync.arm(trainable_parameters(model))
    # The token embedding's gradient is the backward's last (the lookup is the first op of the forward).
    launched_before_embedding = []
    model.tokens.wte.weight.register_post_accumulate_grad_hook(
        lambda _: launched_before_embedding.append(sync.launched_in_backward))
    reference = tiny_gpt2(grad_mode="frozen_copy")
    for net in (model, reference):
        net.loss(lm_batch()).loss.backward()
    sync.finish()
    assert launched_before_embedding[0] > 0
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
    model.stack.apply_map([0, 0, 2, 2])
    sync.arm(trainable_parameters(model))
    assert sum(len(bucket.params) for bucket in sync.buckets) == len(trainable_parameters(model))
    assert not any(p.requires_grad for p in model.stack.blocks[1].parameters())


@pytest.mark.slow
def test_two_gloo_ranks_train_with_the_losses_of_one_process_through_decisions(tmp_path, cli):
    decisions = ("policy=dynamic_q", "policy.steps_per_decision=2")
    single = read_jsonl(parallel_run(cli, tmp_path / "single", *decisions) / "metrics.jsonl")
    parallel = read_jsonl(parallel_run(cli, tmp_path / "ddp", *decisions, ranks=2) / "metrics.jsonl")
    ours = [row["train_loss"] for row in parallel if "train_loss" in row]
    theirs = [row["train_loss"] for row in single if "train_loss" in row]
    assert len(ours) == len(theirs) == 12
    assert ours == pytest.approx(theirs, abs=1e-6)
