"""The reasoning study (--scale reasoning): its arms in k⊗L notation, one stage, and the report's accuracy by
difficulty, with intervals and paired differences against kL⊗1."""

import csv
import json

import pytest
from omegaconf import OmegaConf

from tyingrun.data_cli import compose_config
from tyingrun.report import write_report


def test_each_task_has_the_three_arms_at_matched_budgets():
    from tyingrun.ablations import REASONING_TASKS, STUDIES, reasoning_arms

    arms = reasoning_arms(k=2, loops=3)
    assert list(arms) == [f"{task}_{name}" for task in REASONING_TASKS for name in ("2x1", "2x3", "6x1")]
    assert arms["phop_2x1"][0] == ["dataset=phop", "policy=none", "model.n_layer=2"]
    assert arms["phop_2x3"][0] == ["dataset=phop", "policy=cyclic", "policy.n_sets=2", "model.n_layer=6"]
    assert arms["phop_6x1"][0] == ["dataset=phop", "policy=none", "model.n_layer=6"]
    study = STUDIES["reasoning"]
    assert study.source is None and study.stage_2 is None and study.one_thread_per_run
    # Every arm composes with the preset and passes the preflight; only the layers and the policy differ.
    for overrides, _ in study.stage_1.values():
        cfg = compose_config([f"+experiment={study.experiment}", *overrides])
        assert cfg.model.name == "gpt2" and cfg.train.max_steps == compose_config(
            [f"+experiment={study.experiment}", "dataset=addition"]).train.max_steps


def test_the_study_runs_one_stage_and_reports(tmp_path, monkeypatch):
    from tyingrun import ablations

    started, reported = [], []
    monkeypatch.setattr(ablations, "run_job", lambda job, *_, **__: started.append((job.arm, job.seed)) or 0)
    monkeypatch.setattr(ablations, "write_report", lambda paths, **options: reported.append(paths))
    assert ablations.run_ablations("reasoning", "0,1", tmp_path, [], jobs=1) == 0
    assert sorted(started) == sorted((arm, seed) for arm in ablations.STUDIES["reasoning"].stage_1
                                     for seed in ("0", "1"))
    assert reported == [[tmp_path]]


def make_run(folder, seed, n_layer, policy, by_difficulty):
    config = {"model": {"name": "gpt2", "n_layer": n_layer}, "dataset": {"name": "phop"},
              "policy": {"name": policy}, "train": {"seed": seed}}
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
    accuracy = sum(by_difficulty.values()) / len(by_difficulty)
    (folder / "summary.json").write_text(json.dumps({
        "seed": seed, "steps": 10, "val_loss": 1.0, "val_acc": accuracy, "test_acc": accuracy,
        "test_acc_by_difficulty": by_difficulty, "trainable_params": 100 * n_layer,
        "trainable_params_mean": 100 * n_layer, "train_flops_per_token": 10 * n_layer}))


def test_report_tables_accuracy_by_difficulty_with_intervals_and_draws_it(tmp_path):
    arms = {"1x1": (1, "none", 0.3), "1x4": (4, "cyclic", 0.6), "4x1": (4, "none", 0.7)}
    for name, (n_layer, policy, base) in arms.items():
        for seed, noise in enumerate((0.0, 0.02, 0.04)):
            make_run(tmp_path / name / str(seed), seed, n_layer, policy,
                     {"2": base + noise, "3": base - 0.1 + noise})
    write_report([tmp_path])
    report = (tmp_path / "report.md").read_text()
    table = report[report.index("## Test accuracy by hops: gpt2 on phop"):].splitlines()
    assert table[2] == "| group | layers | seeds | hops 2 | hops 3 |"
    # The 1-layer group: mean 0.32 at hops 2, std 0.02 over 3 seeds: half-width t(0.975, 2) * 0.02 / sqrt(3).
    assert table[4].startswith("| none model.n_layer=1 | 1 | 3 | 0.3200 ± 0.0497 | 0.2200 ± 0.0497 |")
    assert (tmp_path / "accuracy_by_difficulty_gpt2_phop.png").stat().st_size > 0
    with (tmp_path / "report.csv").open() as handle:
        rows = {(row["policy"], row["n_layer"]): row for row in csv.DictReader(handle)}
    # Paired against kL⊗1 (none, 4 layers: the reference) seed by seed: k⊗L is 0.1 below it, k⊗1 0.4 below.
    assert rows["none", "4"]["is_reference"] == "True"
    for arm, difference in ((("cyclic", "4"), -0.1), (("none", "1"), -0.4)):
        assert rows[arm]["paired_reference"] == "none model.n_layer=4" and rows[arm]["paired_metric"] == "test_acc"
        assert float(rows[arm]["paired_diff_mean"]) == pytest.approx(difference)


@pytest.mark.parametrize("dataset", ["phop", "addition"])
def test_the_preset_fits_the_model(dataset):
    cfg = compose_config(["+experiment=reasoning_cpu", f"dataset={dataset}", "model.n_layer=4"])
    assert cfg.dataset.name == dataset and cfg.model.n_layer == 4
