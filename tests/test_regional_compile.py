"""hardware.compile=true compiles per block: one graph per block kind that every slot and tying map reuses (a second
for slots whose weights need no gradient), never falling back to eager, with the losses of eager training."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from tyingrun.train.compile import RegionalCompile
from tyingrun.tying import maps

from .helpers import TINY_MODELS, parallel_run, read_jsonl, small_lm_config

pytestmark = [pytest.mark.compile, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N_LAYER = 4
# Ten different maps, each a tie pattern the policies produce (chains resolved by the stack).
MAPS = [maps.identity(N_LAYER), [0, 0, 2, 3], [0, 0, 0, 3], [0, 1, 1, 3], [0, 0, 0, 0], [0, 1, 0, 1],
        [0, 1, 2, 2], [0, 0, 2, 2], [0, 1, 1, 1], [0, 0, 1, 1]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()


def train_through_maps(model, batch, loss_of, trainable=None):
    """One SGD step under each of MAPS; the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for index, src in enumerate(MAPS):
        model.stack.apply_map(src, trainable(index) if trainable else [True] * N_LAYER)
        model.train()
        loss = loss_of(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_ten_maps_compile_each_block_kind_once_with_the_losses_of_eager(family):
    build, make_batch = TINY_MODELS[family]
    batch = make_batch()
    eager, compiled = build(n_layer=N_LAYER), build(n_layer=N_LAYER)
    regions = RegionalCompile(compiled)
    eager_losses = train_through_maps(eager, batch, eager.loss)
    compiled_losses = train_through_maps(compiled, batch, regions.loss)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=0, atol=1e-5)
    kind = type(compiled.stack.blocks[0]).__name__
    assert regions.graphs[f"block:{kind}"] == 1 and regions.recompiles[f"block:{kind}"] == 0
    assert regions.recompiles["loss"] == 0
    # What dynamo itself counts: every graph is one of ours, and every frame it was handed compiled (none ran eager).
    assert counters["stats"]["unique_graphs"] == sum(regions.graphs.values())
    assert counters["frames"]["ok"] == counters["frames"]["total"]


def test_frozen_copy_ties_and_frozen_slots_add_one_graph_and_evaluation_none():
    build, make_batch = TINY_MODELS["gpt2"]
    model = build(n_layer=N_LAYER, grad_mode="frozen_copy")
    regions = RegionalCompile(model)
    train_through_maps(model, make_batch(), regions.loss, trainable=lambda index: [index % 3 != 1] + [True] * 3)
    model.eval()
    with torch.no_grad():
        model.loss(make_batch())
    assert regions.graphs["block:PreLNBlock"] == 2 and regions.recompiles["block:PreLNBlock"] == 1


@pytest.mark.slow
def test_a_compiled_dynamic_q_run_records_its_graphs_and_recompiles(tmp_path):
    from tyingrun.run import run

    cfg = small_lm_config("dynamic_q", 24, policy_keys={"steps_per_decision": 2, "grad": "frozen_copy"})
    cfg.hardware.compile = True
    summary = run(cfg, tmp_path)
    assert summary["compile_graphs"]["block:PreLNBlock"] <= 2
    assert summary["compile_recompiles"]["block:PreLNBlock"] <= 1 and summary["compile_recompiles"]["loss"] == 0


def test_lora_relaxed_slots_and_looped_maps_train_compiled_with_the_losses_of_eager():
    build, make_batch = TINY_MODELS["gpt2"]
    batch = make_batch()
    models = []
    for _ in range(2):
        model = build(n_layer=N_LAYER)
        model.stack.set_sharing("matrices")
        model.stack.apply_map(maps.cyclic(N_LAYER, 2))  # slots 2 and 3 loop over the weights of 0 and 1
        model.stack.add_lora(range(N_LAYER), rank=2, alpha=2.0)
        with torch.no_grad():
            for corrections in model.stack.lora:
                for lora in corrections.values():
                    lora.B.normal_(generator=torch.Generator().manual_seed(5))
        models.append(model)
    eager, compiled = models
    regions = RegionalCompile(compiled)
    losses = []
    for model, loss_of in ((eager, eager.loss), (compiled, regions.loss)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses.append([])
        for _ in range(3):
            loss = loss_of(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    assert regions.graphs["block:PreLNBlock"] <= 2


@pytest.mark.slow
def test_fsdp_ranks_train_compiled_with_the_losses_of_eager_fsdp(tmp_path, cli):
    decisions = ("policy=dynamic_q", "policy.steps_per_decision=1")
    eager = read_jsonl(parallel_run(cli, tmp_path / "eager", *decisions, ranks=2, parallel="fsdp") / "metrics.jsonl")
    compiled_dir = parallel_run(cli, tmp_path / "compiled", *decisions, "hardware.compile=true", ranks=2,
                                parallel="fsdp")
    theirs = [row["train_loss"] for row in eager if "train_loss" in row]
    ours = [row["train_loss"] for row in read_jsonl(compiled_dir / "metrics.jsonl") if "train_loss" in row]
    assert len(ours) == len(theirs) == 12 and ours == pytest.approx(theirs, abs=1e-5)
    summary = json.loads((compiled_dir / "summary.json").read_text())
    assert summary["compile_graphs"]["block:PreLNBlock"] <= 2 and summary["compile_recompiles"]["loss"] == 0
