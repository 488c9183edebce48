"""Model FLOPs utilisation: the training FLOP/s a run achieved over its device's peak dense bf16 FLOP/s."""

from __future__ import annotations

from typing import Optional

import torch

# Peak dense bf16 FLOP/s by the vendors' datasheets (SXM parts), matched against torch.cuda.get_device_name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device, configured: Optional[float] = None) -> Optional[float]:
    """``hardware.peak_flops`` when set, else the device's peak bf16 FLOP/s by name; None off a GPU we know."""
    if configured is not None:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first, so "L40S" is not read as "L40" nor "GH200" as "H200".
    return next((flops for key, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0]))
                 if key in name), None)


def mfu(train_flops_per_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Achieved training FLOP/s (``train_flops_per_token``, counted per slot as the model runs) over ``peak``."""
    if peak is None or peak <= 0:
        return None
    return train_flops_per_token * tokens_per_s / peak
