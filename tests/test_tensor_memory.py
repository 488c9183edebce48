"""Peak tensor memory: hand counts for activations and optimizer state, views, frees, and no trace after exit."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from tyingrun.metrics.tensor_memory import TensorMemoryTracker, measure_steps, training_state

FP32 = 4
MIB = 2**20


def two_layer_mlp(d_in, hidden, d_out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, d_out, bias=False))


def train_step(model, optimizer, batch, d_in):
    def step():
        optimizer.zero_grad()  # set_to_none: each step's backward allocates the gradients afresh
        model(torch.randn(batch, d_in)).sum().backward()
        optimizer.step()
    return step


def test_activation_peak_matches_a_hand_count():
    B, D, H, C = 4096, 64, 256, 64
    model = two_layer_mlp(D, H, C)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no state, updates in place
    measured = measure_steps(train_step(model, sgd, B, D), 2, lambda: training_state(model, sgd))
    weights = H * D + C * H
    # The peak is in backward, as ReLU's backward writes the gradient of the first layer's output:
    #   weights, the input batch, ReLU's output saved for backward, the gradient arriving at it and the one
    #   leaving it, and the second layer's weight gradient, already made by the mm backward before.
    # (The first layer's output died once ReLU consumed it; sum's gradient is an expanded scalar.)
    hand = FP32 * (weights + B * D + 3 * B * H + C * H)
    assert measured["peak_tensor_bytes"] == pytest.approx(hand, rel=0.05)
    assert measured["peak_state_bytes"] == pytest.approx(FP32 * (weights + C * H), rel=0.05)
    assert measured["peak_other_bytes"] == measured["peak_tensor_bytes"] - measured["peak_state_bytes"]


def test_optimizer_peak_matches_a_hand_count():
    B, D = 16, 512
    model = two_layer_mlp(D, D, D)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)  # CUDA's default path, pinned for CPU
    measured = measure_steps(train_step(model, adamw, B, D), 2, lambda: training_state(model, adamw))
    weights = 2 * D * D
    # The peak is in AdamW's step: weights, gradients, exp_avg and exp_avg_sq (the state, 4 weights) and
    # the square roots of every exp_avg_sq at once, the foreach path's one big temporary (1 weights).
    # Activations died in backward; the per-parameter step counters are scalars.
    assert measured["peak_tensor_bytes"] == pytest.approx(FP32 * 5 * weights, rel=0.05)
    assert measured["peak_state_bytes"] == pytest.approx(FP32 * 4 * weights, rel=0.05)
    assert measured["peak_other_bytes"] == pytest.approx(FP32 * weights, rel=0.05)


def test_a_storage_counts_once_however_many_tensors_view_it():
    D = 256
    first, second = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
    second.weight = first.weight
    tied = lambda: [first.weight, second.weight, first.weight.T, first.weight.view(-1), first.weight[::2]]  # noqa: E731
    with TensorMemoryTracker(tied) as tracker:
        tracker.reclassify()
        assert tracker.live_bytes == FP32 * D * D
        base = torch.empty(1024, 256)
        views = [base.view(256, 1024), base[::2], base.T, base.reshape(-1), base.detach(), *base.split(128)]
        tracker.track(views)
        assert tracker.live_bytes == FP32 * (D * D + base.numel())
        del base, views
        assert tracker.live_bytes == FP32 * D * D
    assert tracker.state_bytes_at_peak == FP32 * D * D


def test_freeing_is_seen():
    with TensorMemoryTracker() as tracker:
        for _ in range(100):
            torch.ones(MIB // FP32).sum()
    assert MIB <= tracker.peak_bytes < MIB + 64
    assert tracker.live_bytes == 0


def test_what_existed_before_counts_only_when_yielded_or_tracked():
    corpus = torch.zeros(4 * MIB // FP32)
    batch = torch.zeros(MIB // FP32)
    with TensorMemoryTracker() as tracker:
        window = corpus[:1024]  # a view of the corpus allocates nothing
        tracker.track([batch])
        assert tracker.live_bytes == MIB
        (window * 2).sum()
    assert tracker.peak_bytes == MIB + FP32 * 1024 + FP32


def test_every_way_of_making_a_tensor_counts():
    a = torch.ones(1000)
    with TensorMemoryTracker() as tracker:
        made = [torch.empty(1000), torch.tensor([0.5] * 1000), a.clone(), a.to(torch.float64), a * 2]
        assert tracker.live_bytes == FP32 * 1000 * 6
        del made
        out = torch.empty(0)
        torch.add(a, a, out=out)
        assert tracker.live_bytes == FP32 * 1000
        out.resize_(2000)
        assert tracker.live_bytes == FP32 * 2000
        assert tracker.peak_bytes == FP32 * 1000 * 6


def test_a_device_filter_counts_only_that_device():
    with TensorMemoryTracker(device="meta") as tracker:
        torch.ones(1000)
    assert tracker.peak_bytes == 0


def test_nothing_outlives_the_region():
    with TensorMemoryTracker() as tracker:
        kept = torch.ones(1000)
    assert _get_current_dispatch_mode() is None
    del kept  # freed after exit: no callback reaches the tracker
    torch.ones(1000).sum()
    assert (tracker.live_bytes, tracker.peak_bytes) == (FP32 * 1000, FP32 * 1000)
    with pytest.raises(RuntimeError, match="one region"), tracker:
        pass
    alive = weakref.ref(tracker)
    del tracker
    gc.collect()
    assert alive() is None


def test_an_exception_in_the_region_still_leaves_no_mode_behind():
    with pytest.raises(RuntimeError), TensorMemoryTracker():
        torch.ones(3) @ torch.ones(4)
    assert _get_current_dispatch_mode() is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with the CUDA caching allocator")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cuda_peak_matches_max_memory_allocated(optimizer):
    B, D, H = (4096, 64, 256) if optimizer == "sgd" else (16, 512, 512)
    model = two_layer_mlp(D, H, D).cuda()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step():
        opt.zero_grad()
        model(torch.randn(B, D, device="cuda")).sum().backward()
        opt.step()

    step()  # cuBLAS workspaces and optimizer state exist before either measurement starts
    torch.cuda.synchronize()
    state = lambda: training_state(model, opt)  # noqa: E731
    with TensorMemoryTracker(state) as at_entry:
        not_tensors = torch.cuda.memory_allocated() - at_entry.live_bytes
    torch.cuda.reset_peak_memory_stats()
    measured = measure_steps(step, 2, state, device="cuda")
    torch.cuda.synchronize()
    assert measured["peak_tensor_bytes"] == pytest.approx(torch.cuda.max_memory_allocated() - not_tensors, rel=0.02)
