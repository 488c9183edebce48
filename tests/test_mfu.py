"""MFU: the device's peak bf16 FLOP/s by name (or hardware.peak_flops) and the achieved training FLOP/s."""

import pytest
import torch

from tyingrun.metrics import mfu as mfu_module
from tyingrun.metrics.mfu import mfu, peak_flops


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA GH200 480GB", 989e12), ("Some Future GPU", None)])
def test_the_peak_is_found_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(mfu_module.torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak


def test_a_configured_peak_wins_and_the_cpu_has_none():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 5e12) == 5e12


def test_mfu_is_achieved_flops_over_the_peak():
    # GPT-2 124M at ~0.85 GFLOP per token and 400k tokens/s on a 989 TFLOP/s device: 34%.
    assert mfu(850e6, 400e3, 989e12) == pytest.approx(850e6 * 400e3 / 989e12)
    assert mfu(850e6, 400e3, None) is None
