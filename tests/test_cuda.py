"""What only a CUDA GPU shows (``make gpu-check`` runs these; without a GPU they skip): bf16 regional compile against
eager, a training loop whose only reads of the loss are its log points, and MFU in the summary."""

import dataclasses

import pytest
import torch

from tyingrun.metrics.mfu import peak_flops
from tyingrun.run import run
from tyingrun.train.compile import RegionalCompile

from .helpers import count_host_reads, lm_batch, small_lm_config, tiny_gpt2

STEPS, LOG_INTERVAL = 40, 10
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_config(policy, steps, **train_keys):
    cfg = small_lm_config(policy, steps, train_keys={"log_interval": LOG_INTERVAL, "checkpoint_interval": 0,
                                                     **train_keys})
    hardware = dataclasses.replace(cfg.hardware, name="gpu", device="cuda", precision="bf16", fused_adamw=True)
    return dataclasses.replace(cfg, hardware=hardware)


def test_bf16_regional_compile_follows_eager_through_map_changes():
    torch._dynamo.reset()
    eager, compiled = tiny_gpt2(grad_mode="frozen_copy").cuda(), tiny_gpt2(grad_mode="frozen_copy").cuda()
    regions = RegionalCompile(compiled)
    batch = {k: v.cuda() for k, v in lm_batch().items()}
    for src in ([0, 1, 2, 3], [0, 0, 2, 3], [0, 0, 0, 0], [0, 1, 0, 1]):
        losses = []
        for model, loss_of in ((eager, eager.loss), (compiled, regions.loss)):
            model.stack.apply_map(src)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses.append(loss_of(batch).loss.float())
        torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    assert regions.graphs["block:PreLNBlock"] <= 2


def test_a_cuda_run_reads_the_loss_only_at_log_points(tmp_path, monkeypatch):
    reads = count_host_reads(monkeypatch)
    run(cuda_config("none", STEPS), tmp_path)
    assert reads["training"] <= STEPS // LOG_INTERVAL and reads["optimizer"] == 0


def test_a_compiled_cuda_run_reports_mfu_and_its_recompiles(tmp_path):
    cfg = cuda_config("cyclic", 20)
    cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, compile=True, peak_flops=1e12))
    summary = run(cfg, tmp_path)
    assert 0 < summary["mfu"] == pytest.approx(summary["train_flops_per_token"] * summary["tokens_per_s"] / 1e12)
    assert summary["compile_recompiles"]["loss"] == 0
    assert peak_flops(torch.device("cuda"), None) is None or peak_flops(torch.device("cuda"), None) > 1e13
