"""hardware=fsdp: two gloo ranks of FSDP2 (helpers.parallel_run) against one process on the same global batch,
and the checks that refuse what FSDP cannot shard."""

import json
import shutil

import pytest
import torch

from tyingrun import export
from tyingrun.config import Config, HardwareConfig, check
from tyingrun.errors import BadInput
from tyingrun.run import build_data, load_run_config
from tyingrun.train.distributed import Mesh, mesh_for, rank_share

from .helpers import LAUNCHER, parallel_run, read_jsonl, small_lm_config

STEPS = ["train.max_steps=20", "train.eval_interval=5", "train.checkpoint_interval=10"]
POLICIES = {
    "none": ["policy=none"],
    "cyclic": ["policy=cyclic"],  # grad=shared: a tied slot runs its root's block
    "from_file": ["policy=from_file", "policy.map=[0,0,2,2]", "policy.grad=frozen_copy"],
    "dynamic_q": ["policy=dynamic_q", "policy.steps_per_decision=1"],  # its preset's grad=frozen_copy; K=1
    "llama_cyclic": ["model=llama", "policy=cyclic"],  # grouped-query attention, RoPE tables passed through the stack
}
TIMING_KEYS = ("tokens_per_s", "wall_time_s", "peak_memory_bytes")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli):
    """``runs(policy, ranks)``: the folder of a 20-step PARALLEL_RUN (checkpoints at 10 and 20), made once per module:
    one process, or two FSDP ranks."""
    made = {}

    def folder(policy, ranks):
        if (policy, ranks) not in made:
            run_dir = tmp_path_factory.mktemp(f"{policy}-{ranks}")
            made[policy, ranks] = parallel_run(cli, run_dir, *STEPS, *POLICIES[policy], ranks=ranks, parallel="fsdp")
        return made[policy, ranks]

    return folder


def without_timing(row):
    return {key: value for key, value in row.items() if key not in TIMING_KEYS}


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_sharded_losses_and_maps_match_one_process_on_the_same_global_batch(runs, policy):
    single, sharded = read_jsonl(runs(policy, 1) / "metrics.jsonl"), read_jsonl(runs(policy, 2) / "metrics.jsonl")
    assert [row["step"] for row in sharded] == [row["step"] for row in single]
    for key, count in (("train_loss", 20), ("val_loss", 5)):
        ours = [row[key] for row in sharded if key in row]
        theirs = [row[key] for row in single if key in row]
        assert len(ours) == len(theirs) == count
        assert ours == pytest.approx(theirs, abs=1e-5)
    applied = [(row["step"], row["map"], row["trainable"]) for row in read_jsonl(runs(policy, 2) / "maps.jsonl")]
    on_rank1 = [(row["step"], row["map"], row["trainable"])
                for row in read_jsonl(runs(policy, 2) / "ranks" / "rank1_maps.jsonl")]
    assert on_rank1 == applied == [(row["step"], row["map"], row["trainable"])
                                   for row in read_jsonl(runs(policy, 1) / "maps.jsonl")]
    if policy == "dynamic_q":
        assert len(applied) == 20 and len({tuple(src) for _, src, _ in applied}) > 2  # ties and unties


@pytest.mark.slow
def test_each_rank_holds_about_half_the_training_state_of_one_process(runs):
    single, sharded = summary(runs("none", 1)), summary(runs("none", 2))
    assert single["train_state_bytes_per_rank"] == [single["train_state_bytes"]] == [single["train_state_bytes_total"]]
    per_rank = sharded["train_state_bytes_per_rank"]
    assert len(per_rank) == 2 and sharded["train_state_bytes_total"] == sum(per_rank)
    assert sharded["train_state_bytes"] == max(per_rank) <= 0.55 * single["train_state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("hardware", ["fsdp", "cpu"])
def test_a_sharded_checkpoint_resumes_bit_identically_on_fsdp_and_also_in_one_process(runs, cli, tmp_path, hardware):
    whole = runs("dynamic_q", 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns(".tyingrun.lock", "summary.json", "step_00000020"))
    entry = (*LAUNCHER, "2", "-m", "tyingrun.cli") if hardware == "fsdp" else ("-m", "tyingrun.cli")
    cli(f"train.resume={resumed}", f"hardware={hardware}", entry=entry, expect=0, env={"OMP_NUM_THREADS": "1"})
    ours, theirs = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    if hardware == "fsdp":
        assert [without_timing(row) for row in ours] == [without_timing(row) for row in theirs]
        assert without_timing(summary(resumed)) == without_timing(summary(whole))
        return
    assert [row["step"] for row in ours] == [row["step"] for row in theirs]
    for key in ("train_loss", "val_loss"):
        assert [row[key] for row in ours if key in row] == pytest.approx([row[key] for row in theirs if key in row],
                                                                         abs=1e-5)


@pytest.mark.slow
def test_a_sharded_checkpoint_reloads_in_one_process_and_exports_with_its_tied_head(runs, tmp_path):
    run_dir = runs("none", 2)
    model = export.load_run_model(run_dir).eval()
    cfg = load_run_config(run_dir)
    total, items = 0.0, 0
    with torch.no_grad():
        for batch in build_data(cfg).eval_batches("val", cfg.train.batch_size, None):
            loss, n_items = model.loss(batch)[:2]
            total, items = total + loss.item() * n_items, items + n_items
    assert total / items == pytest.approx(summary(run_dir)["val_loss"], abs=1e-5)

    transformers = pytest.importorskip("transformers")
    export.main([str(run_dir), str(tmp_path / "hf")])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert model.tokens.tied and hf.config.tie_word_embeddings
    ids = torch.randint(0, model.tokens.wte.num_embeddings, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)


DECISION_CHECKS = """
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tyingrun.config import Config, DatasetConfig, HardwareConfig, LogConfig, ModelConfig, PolicyConfig, TrainConfig
from tyingrun.tying.weights import local_view, storage_key
from tyingrun.run import build_parts, execute
from tyingrun.train.optim import optimizer_parameters
from tyingrun.train.trainer import Trainer
from tyingrun.tying.counts import trainable_parameters

maps_seen = []


def check(trainer):
    held = optimizer_parameters(trainer.optimizer)
    assert held and all(isinstance(param, DTensor) for param in held)
    assert sorted(storage_key(p) for p in held) == sorted(storage_key(p) for p in trainable_parameters(trainer.model))
    for param in held:
        for value in trainer.optimizer.state.get(param, {}).values():
            assert value.dim() == 0 or local_view(value).shape == local_view(param).shape
    stack = trainer.stack
    for slot, root in enumerate(stack.src):
        if root == slot:
            assert stack.storage.holds(slot) > 0
            continue
        assert stack.storage.holds(slot) == 0
        root_params = dict(stack.blocks[root].named_parameters())
        for name, param in stack.blocks[slot].named_parameters():
            assert storage_key(param) == storage_key(root_params[name]) and not param.requires_grad
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (trainer.step, list(stack.src), list(stack.trainable)))
    assert all(applied == everyone[0] for applied in everyone)
    maps_seen.append(tuple(stack.src))


apply_decision = Trainer.apply_decision


def apply_and_check(trainer, decision):
    apply_decision(trainer, decision)
    check(trainer)


Trainer.apply_decision = apply_and_check
cfg = Config(
    model=ModelConfig(n_layer=4, d_model=64), dataset=DatasetConfig(block_size=64),
    policy=PolicyConfig(name="dynamic_q", steps_per_decision=1, grad="frozen_copy", freeze_at_init=False),
    hardware=HardwareConfig(name="fsdp", device="cpu", data_parallel=True, fsdp=True),
    train=TrainConfig(max_steps=10, batch_size=8, eval_batches=2, eval_interval=10, log_interval=10),
    log=LogConfig(progress="lines"),
)
execute(build_parts(cfg, Path(sys.argv[1])))
print(f"rank {dist.get_rank()}: {len(maps_seen)} decisions, {len(set(maps_seen))} maps checked", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_after_every_decision_each_rank_holds_only_its_shards_of_the_trainable_tensors(tmp_path, cli):
    script = tmp_path / "check_decisions.py"
    script.write_text(DECISION_CHECKS)
    result = cli(str(tmp_path / "run"), entry=(*LAUNCHER, "2", str(script)), expect=0)
    for rank in (0, 1):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"rank {rank}:"))
        decisions, maps = (int(word) for word in line.split() if word.isdigit())
        assert decisions == 10 and maps > 2


def fsdp_config(**policy_keys):
    cfg = small_lm_config(policy=policy_keys.pop("name", "cyclic"), policy_keys=policy_keys)
    return Config(**{**vars(cfg), "hardware": HardwareConfig(name="fsdp", data_parallel=True, fsdp=True)})


@pytest.mark.parametrize("policy_keys, problem", [
    ({"share": "attention"}, "hardware=fsdp shards whole blocks, so a tie must share a whole block; "
                             "policy.share=attention shares part of one - use hardware=ddp for it"),
    ({"name": "recursive"}, "policy=recursive shares part of one"),
])
def test_fsdp_refuses_ties_that_share_part_of_a_block(policy_keys, problem):
    with pytest.raises(BadInput, match=problem):
        check(fsdp_config(**policy_keys))


def test_fsdp_needs_data_parallel_ranks():
    cfg = fsdp_config()
    cfg.hardware.data_parallel = False
    with pytest.raises(BadInput, match=r"^hardware.fsdp=true shards over data-parallel ranks; use hardware=fsdp"):
        check(cfg)
    with pytest.raises(BadInput, match=r"^hardware=fsdp needs several processes: torchrun --nproc_per_node=N"):
        mesh_for(True, "auto", "fsdp")


def test_every_rank_runs_as_many_forwards_and_each_batch_counts_once():
    batches = list(range(5))
    shares = [list(rank_share(batches, Mesh(rank, 2))) for rank in (0, 1)]
    assert shares == [[(0, True), (2, True), (4, True)], [(1, True), (3, True), (4, False)]]
    assert list(rank_share(batches, Mesh())) == [(b, True) for b in batches]

