"""What one loop is worth (tyingrun/report/loops.py) on hand-made run folders: untied arms at 1, 2, 4 and 8 unique
blocks with losses L(n) = a + b n^-alpha, looped arms whose losses are L(prelude + coda + core r^phi) for a known phi;
the report must give phi back, at the trained and at every evaluated loop count, and bounds outside the untied
range."""

from __future__ import annotations

import csv
import json
import math

import pytest
from omegaconf import OmegaConf

from tyingrun.report.loops import DepthCurve, Reading, Shape

from .helpers import report

A, B, ALPHA = 2.0, 1.0, 0.5
# Per seed, an offset shared by every arm of that seed (what the per-seed curves must cancel).
OFFSETS = {0: 0.0, 1: 0.013, 2: -0.021}
DEPTHS = (1, 2, 4, 8)


def loss_at(blocks: float, seed: int) -> float:
    return A + B * blocks ** -ALPHA + OFFSETS[seed]


def write_run(folder, seed, policy, summary, model=None, train=None):
    """A finished run folder: its config.yaml (``policy``, ``model`` and ``train`` keys) and its summary.json."""
    n_layer = (model or {}).get("n_layer", summary["unique_blocks"])
    config = {"model": {"name": "gpt2", "n_layer": n_layer, **(model or {})}, "dataset": {"name": "phop"},
              "policy": policy, "train": {"seed": seed, "max_steps": 8, **(train or {})}}
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({
        "seed": seed, "steps": 8, "policy": policy["name"], "n_layer": n_layer, "val_loss": summary["test_loss"],
        "trainable_params": 1000 * summary["unique_blocks"],
        "trainable_params_mean": 1000 * summary["unique_blocks"], "train_state_bytes": 2**20,
        "peak_state_bytes": 2**20, "peak_other_bytes": 2**20, "train_flops_per_token": 6000 * n_layer, **summary}))


def untied_arms(root, **model):
    for blocks in DEPTHS:
        for seed in OFFSETS:
            write_run(root / f"none_{blocks}" / str(seed), seed, {"name": "none"},
                      {"test_loss": loss_at(blocks, seed), "unique_blocks": blocks}, {"n_layer": blocks, **model})


def looped_arm(root, name, prelude, core, coda, loops, phi_by_seed, eval_loops, extra=None, **policy):
    """A looped arm whose loss at r loops is L(prelude + coda + core r^phi) (its seed's phi), or ``extra`` per r."""
    shape = dict(prelude=prelude, core=core, coda=coda, loops=loops, **policy)
    for seed, phi in phi_by_seed.items():
        def loss(r, seed=seed, phi=phi):
            return extra(r, seed) if extra else loss_at(prelude + coda + core * r ** phi, seed)

        by_loops = {str(r): loss(r) for r in sorted({loops, *eval_loops})}
        summary = {
            "test_loss": loss(loops), "unique_blocks": prelude + core + coda, "loops": loops,
            "looped": {**shape, "counts": None, "train_loops": policy.get("train_loops", "fixed"),
                       "max_loops": 2 * loops, "backprop_loops": None, "inject": policy.get("inject", "none"),
                       "loop_params": "none"},
            "test_loss_by_loops": by_loops, "train_loops_mean": float(loops),
            "test_acc_by_loops": {r: 0.5 + 0.05 * math.log2(int(r)) for r in by_loops},
            "test_acc_by_difficulty_by_loops": {r: {"2": 0.8, "3": 0.2 + 0.1 * int(r)} for r in by_loops},
        }
        write_run(root / name / str(seed), seed, {"name": "looped", **shape}, summary,
                  {"n_layer": prelude + core * loops + coda}, {"eval_loops": list(eval_loops)})


def loop_rows(out):
    with (out / "loops.csv").open() as handle:
        return {"{prelude}+{core}x{loops}+{coda}".format(**row): row for row in csv.DictReader(handle)}


@pytest.fixture()
def study(tmp_path):
    root = tmp_path / "runs"
    untied_arms(root)
    # Seeds of one arm differ in phi (mean 0.46, sample std 0.01): the interval is over seeds.
    looped_arm(root, "wide", 1, 2, 1, 3, {0: 0.45, 1: 0.46, 2: 0.47}, (1, 2, 4, 6))
    looped_arm(root, "narrow", 0, 1, 0, 4, dict.fromkeys(OFFSETS, 0.3), (1, 2, 8), inject="add")
    # Better than the deepest untied arm: only a lower bound on phi, log((8 - 2) / 2) / log 4.
    looped_arm(root, "beyond", 1, 2, 1, 4, dict.fromkeys(OFFSETS, 0.0), (), extra=lambda r, s: loss_at(8, s) - 0.05)
    # Worse than the shallowest: fewer than 1 effective block, at most prelude + coda.
    looped_arm(root, "below", 1, 1, 1, 2, dict.fromkeys(OFFSETS, 0.0), (), extra=lambda r, s: loss_at(1, s) + 0.1)
    return root


def test_phi_comes_back_from_losses_built_with_it(study, tmp_path):
    rows, markdown, console = report(study, tmp_path / "out")
    arms = loop_rows(tmp_path / "out")
    assert set(arms) == {"1+2x3+1", "0+1x4+0", "1+2x4+1", "1+1x2+1"}
    wide, narrow = arms["1+2x3+1"], arms["0+1x4+0"]
    assert float(wide["phi_mean"]) == pytest.approx(0.46, abs=0.02)
    assert float(narrow["phi_mean"]) == pytest.approx(0.3, abs=0.02)
    # The seeds' phi 0.45, 0.46, 0.47: half-width t(0.975, 2) * 0.01 / sqrt(3) = 0.0248.
    assert float(wide["phi_ci_high"]) - float(wide["phi_mean"]) == pytest.approx(0.0248, abs=0.003)
    assert float(wide["effective_blocks"]) == pytest.approx(2 + 2 * 3 ** 0.46, abs=0.1)
    # The same weights evaluated at other loop counts: phi at each r > 1 from test_loss_by_loops.
    for loops in (2, 4, 6):
        assert float(wide[f"phi_at_{loops}_mean"]) == pytest.approx(0.46, abs=0.02)
    for loops in (2, 8):
        assert float(narrow[f"phi_at_{loops}_mean"]) == pytest.approx(0.3, abs=0.02)
    assert "phi_at_1_mean" not in wide and wide["published_phi"] == "0.46"
    section = markdown[markdown.index("## What one loop is worth"):]
    assert f"| {wide['group']} | 1/2/1 | 3 | fixed | none | none |" in section
    assert f"| {narrow['group']} | 0/1/0 | 4 | fixed | add | none |" in section
    assert "What one loop is worth: gpt2 on phop" in console
    assert f"{float(wide['phi_mean']):.3f} ± {float(wide['phi_ci_high']) - float(wide['phi_mean']):.3f}" in section


def test_a_loss_outside_the_untied_range_gives_a_bound_not_a_number(study, tmp_path):
    _, markdown, _ = report(study, tmp_path / "out")
    arms = loop_rows(tmp_path / "out")
    beyond, below = arms["1+2x4+1"], arms["1+1x2+1"]
    assert beyond["phi_mean"] == "" and beyond["phi_of_mean_loss_relation"] == ">"
    assert float(beyond["phi_of_mean_loss"]) == pytest.approx(math.log(3) / math.log(4))
    assert beyond["effective_blocks_relation"] == ">" and float(beyond["effective_blocks"]) == 8
    assert "| > 0.792 (better than the deepest untied arm, 8 blocks) | 3 |" in markdown
    assert below["phi_mean"] == "" and below["phi_of_mean_loss"] == ""
    assert below["effective_blocks_relation"] == "<" and float(below["effective_blocks"]) == 1
    assert "effective core blocks ≤ 0: effective unique blocks < 1 ≤ prelude + coda" in below["phi_of_mean_loss_note"]
    assert "| < 1.00 (worse than the shallowest untied arm, 1 block) | effective core blocks ≤ 0" in markdown


def test_quality_at_each_loop_count_with_the_difficulty_breakdown(study, tmp_path):
    _, markdown, _ = report(study, tmp_path / "out")
    wide = loop_rows(tmp_path / "out")["1+2x3+1"]["group"]
    quality = markdown[markdown.index("### Quality against loops evaluated: gpt2 on phop"):].splitlines()
    assert quality[2] == "| group | trained at | metric | 1 loops | 2 loops | 3 loops | 4 loops | 6 loops | 8 loops |"
    # Arms scored at their trained loop count only are left out: the two with eval_loops, loss and acc each.
    assert len([line for line in quality[4:] if line.startswith("| looped")]) == 4
    # Every seed has the same accuracy: intervals of width 0.
    assert (f"| {wide} | 3 loops (fixed) | test acc | 0.5000 ± 0.0000 | 0.5500 ± 0.0000 | 0.5792 ± 0.0000 | "
            "0.6000 ± 0.0000 | 0.6292 ± 0.0000 |  |") in quality
    breakdown = markdown[markdown.index(f"### Test accuracy by hops and loops: {wide}"):].splitlines()
    assert breakdown[2:5] == ["| loops | hops 2 | hops 3 |", "|---|---|---|",
                              "| 1 | 0.8000 ± 0.0000 | 0.3000 ± 0.0000 |"]
    assert "| 3 (trained) | 0.8000 ± 0.0000 | 0.5000 ± 0.0000 |" in breakdown
    with (tmp_path / "out" / "quality_by_loops.csv").open() as handle:
        cells = [row for row in csv.DictReader(handle) if row["group"] == wide]
    hardest = next(row for row in cells if row["difficulty"] == "3" and row["loops"] == "6")
    assert float(hardest["value_mean"]) == pytest.approx(0.8) and hardest["n"] == "3"
    loss = next(row for row in cells if row["metric"] == "test_loss" and row["loops"] == "2")
    phis = (0.45, 0.46, 0.47)
    assert float(loss["value_mean"]) == pytest.approx(
        sum(loss_at(2 + 2 * 2 ** phi, seed) for seed, phi in zip(OFFSETS, phis, strict=True)) / 3)
    assert float(loss["value_ci_high"]) > float(loss["value_mean"])


def test_the_figures_are_drawn(study, tmp_path):
    report(study, tmp_path / "out", figures=True)
    for name in ("quality_vs_loops_gpt2_phop.png", "loss_vs_cost_gpt2_phop.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    # By difficulty against loops: the two arms scored at several loop counts.
    assert len(list((tmp_path / "out").glob("accuracy_by_difficulty_by_loops_gpt2_phop_arm*.png"))) == 2


def test_no_section_without_looped_runs_and_no_phi_without_matching_untied_arms(tmp_path):
    untied_arms(tmp_path / "untied")
    _, markdown, _ = report(tmp_path / "untied", tmp_path / "out")
    assert "What one loop is worth" not in markdown and not (tmp_path / "out" / "loops.csv").exists()
    # Untied arms of another width are not read against.
    untied_arms(tmp_path / "other", d_model=64)
    looped_arm(tmp_path / "other", "looped", 1, 2, 1, 3, {0: 0.46}, ())
    _, markdown, _ = report(tmp_path / "other", tmp_path / "out2")
    assert "No untied arms (policy=none) of these settings" in markdown
    assert "| no untied arms of these settings |  | 1 |" in markdown


def test_the_curve_refuses_losses_that_do_not_fall_with_depth_and_counts_have_no_phi():
    curve = DepthCurve((1, 2, 4), (3.0, 2.5, 2.6))
    assert curve.blocks_at(2.55) == Reading(None, why="the untied arms' test loss does not fall with depth")
    falling = DepthCurve((1, 2, 4, 8), tuple(A + B * n ** -ALPHA for n in DEPTHS))
    assert [falling.blocks_at(A + B * n ** -ALPHA).value for n in DEPTHS] == pytest.approx(DEPTHS)
    counts = Shape(0, 0, 0, 1, (4, 2, 1, 1), "fixed", "none", "none")
    assert counts.phi(Reading(3.0), 1).why == "per-layer counts: no single loop count"
