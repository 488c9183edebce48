"""Where a step's tensors live and at what precision: batches moved to the device, bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import torch

from tyingrun.contracts import Batch


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """hardware.precision=bf16 on a GPU: bf16 autocast; anything else computes in the weights' dtype."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def on_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
